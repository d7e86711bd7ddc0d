"""Unit tests for evaluators.pruning: group discovery, channel counts, criteria and replay."""
from __future__ import annotations

import copy
import math

import optuna
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from evaluators import pruning
from evaluators.models import MLP, DigitsCNN
from evaluators.pruning import PruningError, apply, channels_to_keep, discover_groups
from spaces import Policy, RatioRange, SearchSpace, SpaceConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)

X8 = torch.zeros(1, 1, 8, 8)
CNN_GROUPS = ["features.0", "features.3", "features.7", "classifier.1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cnn(width: int = 8, seed: int = 0) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN(width=width)
    # non-trivial BN statistics so that eval-mode outputs depend on which channels survive
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


# --------------------------------------------------------------------------- discover_groups


@pytest.mark.parametrize("width", [32, 8])
def test_discover_groups_on_digits_cnn(width):
    model = DigitsCNN(width=width)
    groups = discover_groups(model, X8)
    assert [g.name for g in groups] == CNN_GROUPS  # module order, output layer classifier.3 left out
    assert [g.kind for g in groups] == ["conv", "conv", "conv", "linear"]
    assert [g.size for g in groups] == [width, 2 * width, 2 * width, 4 * width]
    for g in groups:
        layer = _module(model, g.name)
        out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        assert g.size == out
        assert g.modules == (g.name,)


def test_discover_groups_does_not_modify_the_model():
    model = _cnn()
    before = copy.deepcopy(model.state_dict())
    model.train()
    discover_groups(model, X8)
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_discover_groups_on_mlp():
    groups = discover_groups(MLP(in_features=64, hidden=(32, 16)), X8)
    assert [(g.name, g.kind, g.size) for g in groups] == [("net.1", "linear", 32), ("net.3", "linear", 16)]


def test_output_layer_cannot_be_pruned():
    with pytest.raises(PruningError, match="classifier.3"):
        apply(Policy(criterion="l1", ratios={"classifier.3": 0.5}), _cnn(), X8)


# --------------------------------------------------------------------------- channels_to_keep


def test_channels_to_keep_examples_from_definition():
    # keep = size - floor(size * ratio), rounded up to round_to, within [max(min_channels, 1), size]
    assert channels_to_keep(32, 0.5) == 16
    assert channels_to_keep(64, 0.3) == 45  # floor(19.2) = 19 removed
    assert channels_to_keep(64, 0.3, round_to=8) == 48
    assert channels_to_keep(10, 0.3) == 7  # 10 * 0.3 is 3.0000000000000004 in floats: still 3 removed
    assert channels_to_keep(10, 0.1, round_to=4) == 10  # 9 -> 12, capped at size
    assert channels_to_keep(4, 0.9) == 1
    assert channels_to_keep(16, 0.9, min_channels=4) == 4
    assert channels_to_keep(3, 0.5, min_channels=8) == 3
    assert channels_to_keep(16, 0.0) == 16


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 2048),
    # ratios within 1e-9/size of 1 hit a separate bug, see test_channels_to_keep_near_one_honours_round_to
    ratio=st.floats(0.0, 0.999),
    round_to=st.integers(1, 64),
)
def test_channels_to_keep_properties(size, ratio, round_to):
    keep = channels_to_keep(size, ratio, round_to=round_to)
    assert 1 <= keep <= size
    assert keep % round_to == 0 or keep == size
    # never keeps fewer than the ratio asks for (rounding only ever keeps more)
    assert keep >= size - math.floor(size * ratio + 1e-9)


@pytest.mark.parametrize("size, ratio, round_to", [(2, 0.9999999999999998, 2), (64, 1 - 1e-12, 8)])
def test_channels_to_keep_near_one_honours_round_to(size, ratio, round_to):
    keep = channels_to_keep(size, ratio, round_to=round_to)
    assert keep % round_to == 0 or keep == size


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 1024),
    r1=st.floats(0.0, 1.0, exclude_max=True),
    r2=st.floats(0.0, 1.0, exclude_max=True),
    round_to=st.integers(1, 32),
    min_channels=st.integers(1, 64),
)
def test_channels_to_keep_monotone_and_respects_min_channels(size, r1, r2, round_to, min_channels):
    lo, hi = sorted((r1, r2))
    keep_lo = channels_to_keep(size, lo, round_to, min_channels)
    keep_hi = channels_to_keep(size, hi, round_to, min_channels)
    assert keep_hi <= keep_lo
    assert keep_hi >= min(min_channels, size)
    assert 1 <= keep_hi <= size


# --------------------------------------------------------------------------- apply on DigitsCNN / MLP


def test_apply_prunes_each_group_to_channels_to_keep_and_keeps_model_consistent():
    width = 16
    model = _cnn(width)
    policy = Policy(
        criterion="l1",
        ratios={"features.0": 0.5, "features.3": 0.3, "features.7": 0.6, "classifier.1": 0.45},
        round_to=4,
        min_channels=2,
    )
    sizes = {"features.0": width, "features.3": 2 * width, "features.7": 2 * width, "classifier.1": 4 * width}
    expected = {n: channels_to_keep(sizes[n], r, 4, 2) for n, r in policy.ratios.items()}
    assert all(expected[n] < sizes[n] for n in expected)  # every group really shrinks

    out = apply(policy, model, X8)
    assert out is model  # pruned in place

    f, c = model.features, model.classifier
    assert f[0].out_channels == expected["features.0"]
    assert f[3].out_channels == expected["features.3"]
    assert f[7].out_channels == expected["features.7"]
    assert c[1].out_features == expected["classifier.1"]
    # coupled layers follow
    assert f[1].num_features == f[1].running_mean.numel() == f[1].weight.numel() == f[0].out_channels
    assert f[3].in_channels == f[0].out_channels
    assert f[4].num_features == f[4].running_var.numel() == f[3].out_channels
    assert f[7].in_channels == f[3].out_channels
    assert f[8].num_features == f[7].out_channels
    assert c[1].in_features == f[7].out_channels * 2 * 2
    assert c[3].in_features == c[1].out_features
    assert c[3].out_features == 10
    for conv in (f[0], f[3], f[7]):
        assert tuple(conv.weight.shape) == (conv.out_channels, conv.in_channels, 3, 3)

    model.train()
    x = torch.randn(5, 1, 8, 8)
    y = model(x)
    assert y.shape == (5, 10)
    y.sum().backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.shape == p.shape
        assert torch.isfinite(p.grad).all()


def test_apply_leaves_unnamed_groups_whole():
    width = 8
    model = _cnn(width)
    apply(Policy(criterion="l2", ratios={"features.3": 0.5}), model, X8)
    assert model.features[0].out_channels == width
    assert model.features[3].out_channels == width  # 2*width halved
    assert model.features[7].out_channels == 2 * width
    assert model.classifier[1].out_features == 4 * width


def test_apply_with_empty_policy_is_identity():
    model = _cnn()
    before = copy.deepcopy(model.state_dict())
    apply(Policy(criterion="l1", ratios={}), model, X8)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_apply_on_mlp_prunes_linear_groups():
    torch.manual_seed(0)
    model = MLP(in_features=64, hidden=(32, 16), num_classes=10)
    apply(Policy(criterion="l2", ratios={"net.1": 0.5, "net.3": 0.25}), model, X8)
    net = model.net
    assert net[1].out_features == channels_to_keep(32, 0.5) == 16
    assert net[1].bias.numel() == 16
    assert net[3].in_features == 16
    assert net[3].out_features == channels_to_keep(16, 0.25) == 12
    assert net[5].in_features == 12
    assert net[5].out_features == 10
    y = model(torch.randn(3, 1, 8, 8))
    assert y.shape == (3, 10)
    y.sum().backward()


@settings(max_examples=15, deadline=None)
@given(
    r1=st.floats(0.0, 0.95),
    r2=st.floats(0.0, 0.95),
    criterion=st.sampled_from(["l1", "l2", "random"]),
    round_to=st.sampled_from([1, 2, 4]),
)
def test_apply_on_mlp_matches_channels_to_keep_for_any_ratios(r1, r2, criterion, round_to):
    model = MLP(in_features=64, hidden=(24, 12), num_classes=10)
    apply(Policy(criterion=criterion, ratios={"net.1": r1, "net.3": r2}, round_to=round_to), model, X8)
    assert model.net[1].out_features == channels_to_keep(24, r1, round_to)
    assert model.net[3].out_features == channels_to_keep(12, r2, round_to)
    assert model(torch.zeros(2, 64)).shape == (2, 10)


def test_policy_sampled_from_a_search_space_applies():
    model = _cnn(8)
    groups = discover_groups(model, X8)
    space = SearchSpace(SpaceConfig(ratio=RatioRange(0.1, 0.7, 0.2), round_to=2), groups)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    constants = space(trial)
    policy = space.policy({**trial.params, **constants})
    apply(policy, model, X8)
    for g in groups:
        layer = _module(model, g.name)
        out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        assert out == channels_to_keep(g.size, policy.ratios[g.name], 2)


# --------------------------------------------------------------------------- criteria


def _hand_built(filters: list[torch.Tensor]) -> nn.Sequential:
    """Conv(1 -> n, 2x2) -> ReLU -> Conv(n -> 2, 1x1); the second conv is the output layer.

    Every weight of the second conv has magnitude 1, so its in-channel slices contribute the
    same to every channel's group score: the ranking is the first conv's filter norms.
    """
    n = len(filters)
    model = nn.Sequential(nn.Conv2d(1, n, 2, bias=True), nn.ReLU(), nn.Conv2d(n, 2, 1, bias=False))
    with torch.no_grad():
        for i, f in enumerate(filters):
            model[0].weight[i, 0] = f.reshape(2, 2)
        model[0].bias.copy_(torch.arange(n, dtype=torch.float32) + 100.0)
        signs = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, -1.0], [1.0, -1.0, 1.0, -1.0, -1.0, 1.0]])[:, :n]
        model[2].weight.copy_(signs.reshape(2, n, 1, 1))
    return model.eval()


def _check_kept(model: nn.Sequential, original: nn.Sequential, kept: list[int]) -> None:
    assert model[0].out_channels == len(kept)
    assert torch.equal(model[0].weight, original[0].weight[kept])
    assert torch.equal(model[0].bias, original[0].bias[kept])
    assert torch.equal(model[2].weight, original[2].weight[:, kept])


def test_l1_removes_the_filters_with_the_smallest_l1_norm():
    filters = [
        torch.full((4,), 3.0),  # L1 12
        torch.full((4,), -0.5),  # L1 2   <- smallest
        torch.tensor([2.0, -2.0, 2.0, -2.0]),  # L1 8
        torch.tensor([0.1, 0.0, 0.0, -0.3]),  # L1 0.4 <- smallest
        torch.tensor([5.0, 0.0, 0.0, 0.0]),  # L1 5
    ]
    model = _hand_built(filters)
    original = copy.deepcopy(model)
    assert [g.name for g in discover_groups(model, torch.zeros(1, 1, 4, 4))] == ["0"]
    apply(Policy(criterion="l1", ratios={"0": 0.4}), model, torch.zeros(1, 1, 4, 4))
    _check_kept(model, original, [0, 2, 4])


def test_l1_and_l2_rank_spread_and_peaked_filters_differently():
    filters = [
        torch.full((4,), 1.5),  # L1 6, L2 3
        torch.tensor([4.0, 0.0, 0.0, 0.0]),  # L1 4, L2 4
    ]
    l1 = _hand_built(filters)
    original = copy.deepcopy(l1)
    l2 = copy.deepcopy(l1)
    apply(Policy(criterion="l1", ratios={"0": 0.5}), l1, torch.zeros(1, 1, 3, 3))
    apply(Policy(criterion="l2", ratios={"0": 0.5}), l2, torch.zeros(1, 1, 3, 3))
    _check_kept(l1, original, [0])
    _check_kept(l2, original, [1])


def _pruned_state(seed: int, criterion: str = "random") -> dict[str, torch.Tensor]:
    model = _cnn(8, seed=0)
    apply(Policy(criterion=criterion, ratios={"features.0": 0.5, "classifier.1": 0.5}, seed=seed), model, X8)
    return model.state_dict()


def test_random_criterion_is_seeded_by_the_policy():
    a, b, c = _pruned_state(1), _pruned_state(1), _pruned_state(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["features.0.weight"].shape == c["features.0.weight"].shape
    # choosing the same 4 of 8 filters and the same 16 of 32 neurons by chance: ~1e-10
    assert not (torch.equal(a["features.0.weight"], c["features.0.weight"])
                and torch.equal(a["classifier.1.weight"], c["classifier.1.weight"]))


def test_apply_does_not_disturb_the_global_rng():
    model = _cnn(8)
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    apply(Policy(criterion="random", ratios={"features.3": 0.5}, seed=9), model, X8)
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.parametrize("criterion", ["l1", "l2", "random"])
def test_replay_on_two_copies_of_the_same_dense_weights_is_identical(criterion):
    dense = _cnn(8, seed=4).state_dict()
    policy = Policy(criterion=criterion, ratios={"features.0": 0.5, "features.3": 0.25, "features.7": 0.75,
                                                 "classifier.1": 0.5}, seed=3)
    models = []
    for init_seed in (10, 20):  # different random inits, then the same dense weights
        torch.manual_seed(init_seed)
        m = DigitsCNN(width=8)
        m.load_state_dict(dense)
        m.eval()
        models.append(apply(policy, m, X8))
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(models[0](x), models[1](x))
    sa, sb = models[0].state_dict(), models[1].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pruning_changes_outputs_of_a_dense_model():
    # guards the replay test: it would pass vacuously if apply did nothing
    dense = _cnn(8, seed=4)
    pruned = apply(Policy(criterion="l1", ratios={"features.3": 0.5}), copy.deepcopy(dense), X8)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert not torch.equal(dense(x), pruned(x))


# --------------------------------------------------------------------------- errors


def test_unknown_group_raises_listing_available_groups():
    with pytest.raises(PruningError) as info:
        apply(Policy(criterion="l1", ratios={"features.1": 0.5}), _cnn(), X8)
    message = str(info.value)
    assert "features.1" in message
    for name in CNN_GROUPS:
        assert name in message


def test_unknown_group_leaves_the_model_unmodified():
    model = _cnn(8)
    with pytest.raises(PruningError):
        apply(Policy(criterion="l1", ratios={"features.0": 0.5, "nope": 0.5}), model, X8)
    assert model.features[0].out_channels == 8


def test_unknown_criterion_lists_valid_ones():
    model = _cnn()
    with pytest.raises(PruningError, match="'l3'") as info:
        apply(Policy(criterion="l3", ratios={"features.0": 0.5}), model, X8)
    for name in ("l1", "l2", "random", "taylor", "bn_scale", "lamp", "fpgm", "wanda"):
        assert name in str(info.value)
    assert model.features[0].out_channels == 8  # rejected before anything was pruned
    assert set(pruning.CRITERIA) == {"l1", "l2", "random", "taylor", "bn_scale", "lamp", "fpgm", "wanda"}
