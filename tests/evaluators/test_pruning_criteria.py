"""The criteria registry: each criterion's scores checked against its definition on small hand-built
layers, and clear errors where a criterion does not apply or lacks calibration data."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evaluators import pruning, zoo
from evaluators.batches import Calibration
from evaluators.criteria import CRITERIA, calibrate
from evaluators.models import MLP, DigitsCNN
from evaluators.pruning import PruningError
from spaces import Policy, PrunableGroup
from tests.models import TokenClassifier

CHANNELS = ("channel", "structured")  # granularities of conv/linear groups, as discover_groups gives them
WEIGHTS_ONLY = ("unstructured",)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _two_layer(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _data(seed: int = 1, n: int = 20):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) * torch.tensor([5.0, 0.1, 1.0, 3.0, 0.2, 1.0])  # very unequal inputs
    return x, torch.randint(0, 3, (n,), generator=g)


def _zeroed(weight: torch.Tensor) -> set[int]:
    return set(torch.nonzero(weight.flatten() == 0).flatten().tolist())


def _lowest(scores: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(scores.flatten(), stable=True)[:k].tolist())


def test_taylor_masks_the_weights_with_smallest_weight_times_gradient():
    model, (x, y) = _two_layer(), _data()
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y).backward()  # the definition: mean cross-entropy on the calibration data
    expected = (reference[0].weight * reference[0].weight.grad).abs()
    pruning.apply(Policy("taylor", {"0.weight": 0.5}, granularity="unstructured"), model, x[:1], calibration=Calibration.from_tensors(x, y))
    assert _zeroed(model[0].weight) == _lowest(expected, 24)
    assert _lowest(expected, 24) != _lowest(reference[0].weight.abs(), 24)  # differs from magnitude here
    assert all(p.grad is None for p in model.parameters())  # calibration gradients are cleared


def test_wanda_masks_by_weight_magnitude_times_input_norm():
    model, (x, _) = _two_layer(), _data()
    dense_weight = model[0].weight.detach().clone()
    expected = dense_weight.abs() * x.norm(dim=0)[None]  # |W_ij| * ||X_j||
    pruning.apply(Policy("wanda", {"0.weight": 0.5}, granularity="unstructured"), model, x[:1], calibration=Calibration.from_tensors(x))
    assert _zeroed(model[0].weight) == _lowest(expected, 24)
    assert _lowest(expected, 24) != _lowest(dense_weight.abs(), 24)


def test_wanda_channel_scores_neurons_by_activation_weighted_rows():
    model, (x, _) = _two_layer(), _data()
    dense = copy.deepcopy(model)
    pruning.apply(Policy("wanda", {"0": 0.5}), model, x[:1], calibration=Calibration.from_tensors(x))
    hidden = torch.relu(dense[0](x))
    w0, w2 = dense[0].weight.detach().abs(), dense[2].weight.detach().abs()
    # the group: neuron o's row in layer 0 (inputs x) and column o of layer 2 (inputs hidden_o), each mean-normalised
    out_scores = (w0 * x.norm(dim=0)).sum(1)
    in_scores = w2.sum(0) * hidden.norm(dim=0)
    score = (out_scores / out_scores.mean() + in_scores / in_scores.mean()) / 2
    kept = torch.argsort(score, stable=True)[4:].sort().values
    assert torch.equal(model[0].weight, dense[0].weight[kept])


def test_bn_scale_removes_channels_with_smallest_gamma():
    torch.manual_seed(0)
    model = DigitsCNN(width=4).eval()
    gammas = torch.tensor([0.9, -0.05, 0.5, 0.2])
    model.features[1].weight.data.copy_(gammas)
    dense = copy.deepcopy(model)
    pruning.apply(Policy("bn_scale", {"features.0": 0.5}), model, torch.zeros(1, 1, 8, 8))
    assert torch.equal(model.features[1].weight, dense.features[1].weight[[0, 2]])  # |gamma| 0.9 and 0.5 kept


def test_bn_scale_without_batchnorm_names_the_group():
    with pytest.raises(PruningError, match="'net.1'.*no BatchNorm"):
        pruning.apply(Policy("bn_scale", {"net.1": 0.5}), MLP(64, (8,)), torch.zeros(1, 64))


def test_fpgm_removes_the_filter_nearest_the_others_even_if_larger():
    conv = nn.Conv2d(1, 3, (1, 2), bias=False)
    # |w|^2 rows: A=(16, 0), B=(0, 16), C=(9, 9): C is nearest both others though its L2 norm is the largest
    conv.weight.data.copy_(torch.tensor([[4.0, 0.0], [0.0, 4.0], [3.0, 3.0]]).view(3, 1, 1, 2))
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(3, 2, 1, bias=False)).eval()
    model[2].weight.data.fill_(1.0)  # equal in-channel columns add nothing to the ranking
    l2 = copy.deepcopy(model)
    x = torch.zeros(1, 1, 2, 3)
    pruning.apply(Policy("fpgm", {"0": 0.34}), model, x)
    pruning.apply(Policy("l2", {"0": 0.34}), l2, x)
    assert model[0].weight.flatten(1).tolist() == [[4.0, 0.0], [0.0, 4.0]]
    assert l2[0].weight.flatten(1).tolist() == [[0.0, 4.0], [3.0, 3.0]]  # l2 drops A (16 <= 18), keeps C


def test_lamp_scores_follow_the_definition():
    w = torch.tensor([3.0, -1.0, 2.0, 0.5])
    # squared: 9, 1, 4, 0.25; each over the sum of those not smaller than it
    expected = torch.tensor([9 / 9, 1 / (1 + 4 + 9), 4 / (4 + 9), 0.25 / 14.25])
    assert torch.allclose(CRITERIA["lamp"].weight_scores(w, None, None), expected)
    assert torch.allclose(CRITERIA["lamp"].unit_scores(w[:, None], None), expected)  # one weight per unit: the same


def test_global_lamp_spreads_sparsity_where_global_magnitude_empties_a_small_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    model[0].weight.data.mul_(0.01)  # a layer of tiny weights
    pol = {"0.weight": 0.9, "2.weight": 0.9}  # budget: floor(57.6) + floor(28.8) = 85 of 96 weights
    by_l1 = pruning.prune(Policy("l1", pol, granularity="unstructured", global_groups=list(pol)), copy.deepcopy(model), None)
    by_lamp = pruning.prune(Policy("lamp", pol, granularity="unstructured", global_groups=list(pol)), copy.deepcopy(model), None)
    assert by_l1.groups == {"0.weight": (64, 63), "2.weight": (32, 22)}  # the tiny layer keeps only its best weight
    assert by_lamp.groups["0.weight"][1] < 63 and by_lamp.sparsity == by_l1.sparsity == 85 / 96


def test_random_criterion_is_seeded_and_differs_between_seeds():
    masks = []
    for seed in (1, 1, 2):
        model = _two_layer()
        pruning.apply(Policy("random", {"0.weight": 0.5}, granularity="unstructured", seed=seed), model, None)
        masks.append(_zeroed(model[0].weight))
    assert masks[0] == masks[1] != masks[2]


def test_head_and_hidden_unit_criteria_use_the_units_weights():
    torch.manual_seed(0)
    model = zoo.TextLSTM(30, embed_dim=4, hidden_size=6, head_size=0, num_layers=1).eval()
    with torch.no_grad():
        model.lstm.weight_hh_l0[:, 2].mul_(50.0)  # unit 2's recurrent column: by far the largest weights
        model.lstm.weight_ih_l0[[1, 7, 13, 19]] = 0.0  # unit 1 owns only tiny weights now
        model.lstm.weight_hh_l0[[1, 7, 13, 19]] = 0.0
        model.lstm.weight_hh_l0[:, 1] = 0.0
    dense = copy.deepcopy(model)
    pruning.apply(Policy("l1", {"lstm": 0.2}, granularity="structured"), model, torch.ones(1, 5, dtype=torch.long))
    assert model.lstm.hidden_size == 5
    kept = [0, 2, 3, 4, 5]
    rows = [g * 6 + j for g in range(4) for j in kept]
    assert torch.equal(model.lstm.weight_hh_l0, dense.lstm.weight_hh_l0[rows][:, kept])


@pytest.mark.parametrize("criterion, granularity, group, kind", [
    ("fpgm", "unstructured", "0.weight", "weight"),
    ("bn_scale", "nm", "2.weight", "weight"),
    ("wanda", "structured", "lstm", "rnn-hidden"),
])
def test_criterion_that_does_not_apply_names_those_that_do(criterion, granularity, group, kind):
    model = zoo.TextLSTM(30, embed_dim=8, hidden_size=8, head_size=8) if kind == "rnn-hidden" else _two_layer()
    x = torch.ones(2, 5, dtype=torch.long) if kind == "rnn-hidden" else _data()[0]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match=f"criterion '{criterion}' does not apply to {kind} group '{group}'") as info:
        pruning.apply(Policy(criterion, {group: 0.5}, granularity=granularity), model, x[:1], calibration=Calibration.from_tensors(x))
    assert "l1" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_check_space_rejects_criterion_granularity_pairs_that_cannot_apply():
    groups = [PrunableGroup("a", "conv", 8, granularities=CHANNELS), PrunableGroup("a.weight", "weight", 8, granularities=WEIGHTS_ONLY)]
    pruning.check_space(["channel", "unstructured"], ["l1", "taylor", "lamp"], groups)
    with pytest.raises(PruningError, match="'bn_scale' does not apply to granularity 'unstructured'"):
        pruning.check_space(["channel", "unstructured"], ["bn_scale"], groups)
    with pytest.raises(PruningError, match="unknown criterion 'l3'"):
        pruning.check_space(["channel"], ["l3"], groups)
    # a group kind no registered unit kind prunes is refused, naming the valid ones
    with pytest.raises(PruningError, match="'x' has kind 'attention'.*valid kinds: attention-heads, conv, hf-heads, hf-neurons, linear"):
        pruning.check_space(["structured"], ["l1"], [PrunableGroup("x", "attention", 4, granularities=("structured",))])


def test_data_criteria_without_calibration_say_what_to_pass():
    for name, calibration, message in [("taylor", None, "needs calibration"), ("wanda", None, "needs calibration"),
                                       ("taylor", Calibration.from_tensors(torch.randn(4, 6)), "needs targets")]:
        with pytest.raises(PruningError, match=message):
            pruning.apply(Policy(name, {"0": 0.5}), _two_layer(), torch.zeros(1, 6), calibration=calibration)


def test_calibration_leaves_buffers_and_mode_alone():
    torch.manual_seed(0)
    model = DigitsCNN(width=4).train()
    before = copy.deepcopy(model.state_dict())
    calibrate(model, Calibration.from_tensors(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))), gradients=True, activations=True)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_registry_entries_declare_where_they_apply():
    assert {n for n, c in CRITERIA.items() if "weight" in c.kinds} == {"l1", "l2", "random", "taylor", "lamp", "wanda"}
    assert {n for n, c in CRITERIA.items() if "attention-heads" in c.kinds} == {"l1", "l2", "random", "taylor", "lamp", "fpgm"}


def test_wanda_sees_the_attention_output_that_multihead_attention_feeds_out_proj():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(5, 6, 8)

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, t):
            return self.attn(t, t, t, need_weights=False)[0]

    model = SelfAttention()
    stats = calibrate(model, Calibration.from_tensors(x), gradients=False, activations=True)
    assert isinstance(model.attn, nn.MultiheadAttention)  # put back after calibration
    with torch.no_grad():  # out = Z W^T + b, with W square and invertible: Z = (out - b) W^-T
        out = mha(x, x, x, need_weights=False)[0]
        z = torch.linalg.solve(mha.out_proj.weight, (out - mha.out_proj.bias).reshape(-1, 8).T).T
    assert torch.allclose(stats.input_norms[(mha.out_proj, "input")], z.norm(dim=0), rtol=1e-4)
    assert torch.allclose(stats.input_norms[(mha, "query")], x.reshape(-1, 8).norm(dim=0))


@pytest.mark.parametrize("criterion, granularity, group", [("taylor", "channel", "fc"), ("wanda", "channel", "fc"),
                                                            ("taylor", "unstructured", "fc.weight")])
def test_tuple_and_dict_inputs_and_batches_prune_alike(criterion, granularity, group):
    torch.manual_seed(0)
    dense = TokenClassifier(num_classes=3).eval()
    g = torch.Generator().manual_seed(2)
    ids, mask, y = torch.randint(0, 20, (12, 5), generator=g), torch.ones(12, 5, dtype=torch.long), torch.randint(0, 3, (12,), generator=g)
    mask[3, 2:] = 0
    as_tuple = Calibration(((ids[:6], mask[:6], y[:6]), (ids[6:], mask[6:], y[6:])))  # (inputs..., targets)
    as_dict = Calibration(({"input_ids": ids, "attention_mask": mask, "labels": y},))
    policy = Policy(criterion, {group: 0.5}, granularity=granularity)
    pruned = []
    for example, calibration in (((ids[:1], mask[:1]), as_tuple), ({"input_ids": ids[:1], "attention_mask": mask[:1]}, as_dict)):
        assert group in [g.name for g in pruning.discover_groups(dense, example, [granularity])]
        pruned.append(pruning.apply(policy, copy.deepcopy(dense), example, calibration=calibration))
    assert pruned[0].fc.weight.shape == pruned[1].fc.weight.shape
    assert torch.allclose(pruned[0].fc.weight, pruned[1].fc.weight)  # the same units, whichever form the data took
    assert pruned[0](ids, mask).shape == (12, 3)
    if granularity == "channel":
        assert pruned[0].fc.out_features == 8
