"""Every zoo model under every granularity that applies to it: the pruned model runs forward and
backward, shrinks as the policy says, reports the sparsity its weights have, replays identically,
and reloads from (policy, weights) into an identical module."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from evaluators import measure, pruning, zoo
from evaluators.batches import Calibration
from evaluators.models import MLP
from evaluators.pruning import channels_to_keep
from evaluators.units.weights import targets
from spaces import Policy


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n=6, classes=10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def _tokens(n=6):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 40, (n, 10), generator=g)
    x[0, 7:] = 0  # padding
    return x, torch.randint(0, 2, (n,), generator=g)


MODELS = {
    "resnet20": (lambda: zoo.resnet20(width=4), _images),
    "resnet56": (lambda: zoo.resnet56(width=4), _images),
    "mobilenetv2": (lambda: zoo.MobileNetV2Cifar(width_mult=0.25, last_channels=64), _images),
    "vgg": (lambda: zoo.VGGCifar(layers=(8, "M", 16, "M", 16), hidden=16), _images),
    "mlp": (lambda: MLP(in_features=192, hidden=(32, 16)), _images),
    "vit": (lambda: zoo.VisionTransformer(image_size=8, patch=4, embed_dim=16, num_heads=4, ff_dim=32), _images),
    "transformer": (lambda: zoo.TextTransformer(40, max_len=10, embed_dim=16, num_heads=4, ff_dim=32), _tokens),
    "lstm": (lambda: zoo.TextLSTM(40, embed_dim=8, hidden_size=12, head_size=8), _tokens),
    "bilstm": (lambda: zoo.TextLSTM(40, embed_dim=8, hidden_size=12, head_size=8, bidirectional=True), _tokens),
}
CASES = [(m, g) for m in MODELS for g in ("channel", "structured", "unstructured", "nm")]


def _dense(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    build, data = MODELS[name]
    torch.manual_seed(0)
    model = build()
    for m in model.modules():  # non-trivial BN statistics so that outputs depend on the channels kept
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    x, y = data()
    return model.eval(), x, y


def _policy(model, x, granularity: str, criterion: str = "l1", seed: int = 0) -> Policy:
    groups = pruning.discover_groups(model, x[:1], [granularity])
    assert groups, f"no {granularity} groups"
    ratios = [0.5, 0.25, 0.6, 0.4]
    return Policy(criterion=criterion, granularity=granularity, seed=seed,
                  ratios={g.name: ratios[i % 4] for i, g in enumerate(groups)})


def _unit_count(model: nn.Module, kind: str, name: str) -> int:
    m = model.get_submodule(name)
    if kind == "attention-heads":
        return m.num_heads
    if kind == "rnn-hidden":
        return m.hidden_size
    if isinstance(m, nn.Embedding):
        return m.embedding_dim
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_discovered_groups_say_which_granularities_prune_them():
    model, x, _ = _dense("transformer")
    groups = pruning.discover_groups(model, x[:1], ["structured", "unstructured"])
    assert {g.kind: g.granularities for g in groups if g.kind != "weight"} == {
        "linear": ("channel", "structured"), "attention-heads": ("structured",)}
    cnn, images, _ = _dense("resnet20")
    weights = {g.name: g.granularities for g in pruning.discover_groups(cnn, images[:1], ["unstructured"])}
    assert weights["stem.0.weight"] == ("unstructured",)  # 3 inputs: no N:M blocks of 4
    assert weights["layer1.0.conv1.weight"] == ("unstructured", "nm")


def test_a_residual_stream_is_named_after_what_starts_it():
    def groups(name):
        model, x, _ = _dense(name)
        return {g.name: g for g in pruning.discover_groups(model, x[:1], ["structured"])}

    vit, text = groups("vit"), groups("transformer")
    # the residual width: written by the embedding and every block, named after the embedding
    assert vit["patch_embed"].size == 16 and set(vit["patch_embed"].modules) >= {"patch_embed", "encoder.layers.1.linear2"}
    assert text["embedding"].kind == "linear" and "encoder.layers.0.linear2" in text["embedding"].modules
    assert not any(n.endswith("linear2") for n in [*vit, *text])
    resnet = groups("resnet20")  # stage streams start at the stem and at each stage's shortcut projection
    assert {"stem.0", "layer2.0.shortcut.0", "layer3.0.shortcut.0"} <= set(resnet)
    assert set(resnet["layer2.0.shortcut.0"].modules) >= {"layer2.0.conv2", "layer2.2.conv2"}
    mobilenet = groups("mobilenetv2")  # at this width the stem's 8 channels run through stage 2's stream
    assert {"features.2.block.6", "features.3.block.6"} <= set(mobilenet["features.0.0"].modules)
    assert {"features.5.block.6", "features.6.block.6"} <= set(mobilenet["features.4.block.6"].modules)  # stage 3's stream
    assert "features.2.block.3" in mobilenet  # a chain without a residual add keeps its name (the depthwise conv)
    assert list(groups("mobilenetv2")) == list(mobilenet)  # deterministic


@pytest.mark.parametrize("name, granularity", CASES)
def test_every_model_and_granularity(name, granularity):
    dense, x, y = _dense(name)
    groups = {g.name: g for g in pruning.discover_groups(dense, x[:1], [granularity])}
    policy = _policy(dense, x, granularity)
    model = copy.deepcopy(dense)
    dense_macs, dense_params = measure.macs_and_params(dense, x[:1])
    report = pruning.prune(policy, model, x[:1])
    assert report.model is model and set(report.groups) == set(policy.ratios)

    model.train()
    out = model(x)
    assert out.shape == dense(x).shape and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())

    macs, params = measure.macs_and_params(model, x[:1])
    eff_macs, eff_params = pruning.effective_macs_and_params(model, x[:1])
    if granularity in ("channel", "structured"):
        for group, ratio in policy.ratios.items():
            g = groups[group]
            size, removed = report.groups[group]
            assert size == g.size
            if g.kind != "attention-heads":
                # the residual width of a transformer (named after its embedding) stays a multiple of its 4 heads
                multiple = 4 if group in ("embedding", "patch_embed") else 1
                assert size - removed == channels_to_keep(g.size, ratio, multiple)
            else:
                assert size - removed == g.size - math.floor(g.size * ratio)
            assert _unit_count(model, g.kind, group) == size - removed
        assert params == _numel(model) < dense_params and macs < dense_macs
        assert (eff_macs, eff_params) == (macs, params)  # no zeros: nothing more to count off
    else:
        sized = {t.name: t.weight for t in targets(model)}
        zeros = sum(int((sized[n] == 0).sum()) for n in policy.ratios)
        total = sum(sized[n].numel() for n in policy.ratios)
        assert report.sparsity == pytest.approx(zeros / total)  # reported = measured on the weights
        for n, ratio in policy.ratios.items():
            w = sized[n]
            expected = (math.floor(w.numel() * ratio + 1e-9) if granularity == "unstructured"
                        else w.numel() // 4 * math.floor(ratio * 4 + 1e-9))
            assert int((w == 0).sum()) == report.groups[n][1] == expected
        assert (macs, params) == (dense_macs, dense_params)  # dense kernels: same shapes
        assert eff_params == dense_params - zeros and eff_macs < dense_macs


@pytest.mark.parametrize("name, granularity", CASES)
def test_rebuild_from_dense_and_policy_and_reload_from_weights(name, granularity):
    dense, x, y = _dense(name)
    policy = _policy(dense, x, granularity, criterion="taylor", seed=5)
    state = copy.deepcopy(dense.state_dict())
    built = []
    for init in (1, 2):  # two differently initialised models given the same dense weights
        torch.manual_seed(init)
        m = MODELS[name][0]()
        m.load_state_dict(state)
        built.append(pruning.apply(policy, m.eval(), x[:1], calibration=Calibration.from_tensors(x, y)))
    with torch.no_grad():
        assert torch.equal(built[0](x), built[1](x))
        assert not torch.equal(built[0](x), dense(x))  # pruning did something

    buffer = io.BytesIO()  # policy + weights, no pickled code
    torch.save({"policy": policy.to_dict(), "state_dict": built[0].state_dict()}, buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    torch.manual_seed(3)
    fresh = MODELS[name][0]().eval()
    reloaded = pruning.restore(Policy.from_dict(saved["policy"]), fresh, x[:1], saved["state_dict"])
    with torch.no_grad():
        assert torch.equal(reloaded(x), built[0](x))
    assert {k: v.shape for k, v in reloaded.state_dict().items()} == {k: v.shape for k, v in built[0].state_dict().items()}


@settings(max_examples=12, deadline=None)
@given(
    ratios=st.lists(st.floats(0.0, 0.9), min_size=12, max_size=12),
    round_to=st.sampled_from([1, 2, 4]),
    min_channels=st.sampled_from([1, 3]),
)
def test_resnet20_any_ratios_keep_channel_counts(ratios, round_to, min_channels):
    model, x, _ = _dense("resnet20")
    groups = pruning.discover_groups(model, x[:1])
    policy = Policy(criterion="l2", ratios={g.name: r for g, r in zip(groups, ratios)}, round_to=round_to,
                    min_channels=min_channels)
    pruning.apply(policy, model, x[:1])
    for g in groups:
        kept = _unit_count(model, g.kind, g.name)
        assert kept == channels_to_keep(g.size, policy.ratios.get(g.name, 0.0), round_to, min_channels)
    assert model(x).shape == (len(x), 10)


@settings(max_examples=12, deadline=None)
@given(ratio=st.floats(0.0, 0.95), granularity=st.sampled_from(["unstructured", "nm"]))
def test_reported_sparsity_is_measured_sparsity_for_any_ratio(ratio, granularity):
    model, x, _ = _dense("transformer")
    policy = _policy(model, x, granularity)
    policy = Policy(criterion="l1", granularity=granularity, ratios={n: ratio for n in policy.ratios})
    report = pruning.prune(policy, model, x[:1])
    weights = {t.name: t.weight for t in targets(model)}
    zeros = sum(int((weights[n] == 0).sum()) for n in policy.ratios)
    assert report.sparsity == zeros / sum(weights[n].numel() for n in policy.ratios)


def test_global_structured_pool_removes_the_summed_budget_with_one_ranking():
    model, x, _ = _dense("resnet20")
    groups = pruning.discover_groups(model, x[:1])
    policy = Policy(criterion="l1", ratios={g.name: 0.5 for g in groups}, global_groups=[g.name for g in groups], min_channels=2)
    report = pruning.prune(policy, model, x[:1])
    removed = sum(r for _, r in report.groups.values())
    assert removed == sum(math.floor(g.size * 0.5) for g in groups)  # round_to 1: the budget exactly
    assert len({r / s for s, r in report.groups.values()}) > 1  # not a uniform 50 %: ranked across groups
    for g in groups:
        assert _unit_count(model, g.kind, g.name) == g.size - report.groups[g.name][1] >= 2
