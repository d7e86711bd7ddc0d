"""Unstructured and N:M masks: which weights go, that they stay zero through fine-tuning, the sparse
file format, effective MACs, and the errors of structured pruning on models it cannot handle."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from evaluators import pruning, zoo
from evaluators.measure import state_dict_bytes
from evaluators.sparsity import load_sparse_state_dict, nm_keep_mask, sparse_state_dict_bytes
from evaluators.train import FinetuneConfig, train
from spaces import Policy


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_unstructured_per_layer_zeroes_the_smallest_magnitudes_of_each_tensor():
    model, dense = _mlp(), _mlp()
    pruning.apply(Policy("l1", {"1.weight": 0.3, "3.weight": 0.75}, granularity="unstructured"), model, None)
    for name, ratio in (("1", 0.3), ("3", 0.75)):
        w, d = model.get_submodule(name).weight, dense.get_submodule(name).weight
        k = math.floor(w.numel() * ratio)
        assert int((w == 0).sum()) == k
        assert d.abs()[w == 0].max() <= d.abs()[w != 0].min()  # every removed weight is smaller than every kept one
        assert torch.equal(w[w != 0], d[w != 0])  # the others are untouched
    assert model.get_submodule("5").weight.ne(0).all()  # not named: left whole


def test_global_unstructured_uses_one_threshold_across_tensors():
    model, dense = _mlp(), _mlp()
    with torch.no_grad():
        model[3].weight.mul_(0.5)
        dense[3].weight.mul_(0.5)
    ratios = {"1.weight": 0.5, "3.weight": 0.5, "5.weight": 0.5}
    report = pruning.prune(Policy("l1", ratios, granularity="unstructured", global_groups=list(ratios)), model, None)
    weights = [model.get_submodule(n).weight for n in ("1", "3", "5")]
    denses = [dense.get_submodule(n).weight for n in ("1", "3", "5")]
    removed = torch.cat([d[w == 0].abs() for w, d in zip(weights, denses)])
    kept = torch.cat([d[w != 0].abs() for w, d in zip(weights, denses)])
    assert removed.numel() == 96 + 48 + 12 and removed.max() <= kept.min()
    assert report.groups["3.weight"][1] > 48  # the small layer gives more than half
    assert all(int((w != 0).sum()) >= 1 for w in weights)


@pytest.mark.parametrize("ratio, zeros", [(0.5, 2), (0.25, 1), (0.75, 3), (0.3, 1)])
def test_nm_masks_every_block_of_four_inputs(ratio, zeros):
    model, dense = _mlp(), _mlp()
    pruning.apply(Policy("l2", {"1.weight": ratio, "3.weight": ratio}, granularity="nm"), model, None)
    for name in ("1", "3"):
        blocks = model.get_submodule(name).weight.view(-1, 4)
        dense_blocks = dense.get_submodule(name).weight.view(-1, 4)
        assert ((blocks == 0).sum(1) == zeros).all()
        for b, d in zip(blocks, dense_blocks):  # the zeros are each block's smallest |w|
            assert set(torch.argsort(d.abs(), stable=True)[:zeros].tolist()) == set(torch.nonzero(b == 0).flatten().tolist())


def test_nm_on_conv_blocks_input_channels_at_each_position():
    scores = torch.arange(2 * 8 * 3 * 3, dtype=torch.float).view(2, 8, 3, 3).flip(1)  # input channel 7 scores lowest
    keep = nm_keep_mask(scores, block=4, zeros=2)
    assert keep.shape == scores.shape
    assert keep[:, [0, 1, 4, 5]].all() and not keep[:, [2, 3, 6, 7]].any()


def test_nm_refuses_weights_whose_inputs_do_not_fill_blocks():
    torch.manual_seed(0)
    model = zoo.mobilenetv2_cifar(width_mult=0.25).eval()
    groups = [g.name for g in pruning.discover_groups(model, torch.zeros(1, 3, 8, 8), ["nm"])]
    assert "features.0.0.weight" not in groups and "features.1.block.0.weight" not in groups  # 3 inputs; depthwise
    with pytest.raises(pruning.PruningError, match="features.0.0.weight.*multiple of 4"):
        pruning.apply(Policy("l1", {"features.0.0.weight": 0.5}, granularity="nm"), model, None)


def test_masks_stay_zero_through_fine_tuning():
    model = _mlp()
    pruning.apply(Policy("l1", {"1.weight": 0.6, "3.weight": 0.5}, granularity="nm"), model, None)
    zeros = {n: model.get_submodule(n).weight == 0 for n in ("1", "3")}
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(32, 1, 4, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    before = copy.deepcopy(model.state_dict())
    train(model, data, FinetuneConfig(epochs=2, lr=0.1, batch_size=8, weight_decay=1e-3))
    assert not torch.equal(before["5.weight"], model.state_dict()["5.weight"])  # it did train
    for n, mask in zeros.items():
        assert (model.get_submodule(n).weight[mask] == 0).all()


def test_sparse_file_is_smaller_and_loads_back_exactly():
    model = _mlp()
    dense_bytes = len(sparse_state_dict_bytes(model))
    pruning.apply(Policy("l1", {"1.weight": 0.8, "3.weight": 0.8}, granularity="unstructured"), model, None)
    blob = sparse_state_dict_bytes(model)
    assert len(blob) < len(state_dict_bytes(model)) and len(blob) < dense_bytes
    state = load_sparse_state_dict(blob)  # torch.load(weights_only=True) inside
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    restored = _mlp(seed=5)
    restored.load_state_dict(state)
    x = torch.randn(4, 1, 4, 4)
    assert torch.equal(restored(x), model(x))


def test_effective_macs_and_params_count_only_nonzero_weights():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.Flatten(), nn.Linear(18, 4, bias=False))
    x = torch.zeros(1, 1, 5, 5)
    assert pruning.effective_macs_and_params(model, x) == (2 * 3 * 3 * 9 + 18 * 4, 2 * 9 + 18 * 4)
    pruning.apply(Policy("l1", {"0.weight": 0.5, "2.weight": 0.5}, granularity="unstructured"), model, None)
    # 9 of 18 conv weights and 36 of 72 linear weights are zero: half of each layer's MACs
    assert pruning.effective_macs_and_params(model, x) == (81 + 36, 9 + 36)


# --------------------------------------------------------------------------- bad input


class _Scale(nn.Module):
    """A custom layer with its own weight, used functionally: torch-pruning has no pruner for it."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n))

    def forward(self, x):
        return F.linear(x, self.weight)


class _WithCustom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.s, self.b = nn.Linear(4, 8), _Scale(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.s(self.a(x)))


def test_a_layer_with_no_pruner_is_named_with_what_to_do():
    model = _WithCustom()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(pruning.PruningError, match=r"'a'.*s\.weight.*'s' \(_Scale\).*exclude.*register_pruner"):
        pruning.apply(Policy("l1", {"a": 0.5}), model, torch.zeros(1, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # never silently half-pruned
    # unstructured masks need no graph: the custom layer is not a target, the Linear layers are
    pruning.apply(Policy("l1", {"a.weight": 0.5}, granularity="unstructured"), model, torch.zeros(1, 4))


def test_registering_a_pruner_makes_the_custom_layer_prunable():
    import torch_pruning as tp

    class ScalePruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            keep = [i for i in range(layer.weight.shape[0]) if i not in idxs]
            layer.weight = nn.Parameter(layer.weight.data[keep])
            return layer

        def prune_in_channels(self, layer, idxs):
            keep = [i for i in range(layer.weight.shape[1]) if i not in idxs]
            layer.weight = nn.Parameter(layer.weight.data[:, keep])
            return layer

        def get_out_channels(self, layer):
            return layer.weight.shape[0]

        def get_in_channels(self, layer):
            return layer.weight.shape[1]

    pruning.register_pruner(_Scale, ScalePruner())
    try:
        model = _WithCustom()
        pruning.apply(Policy("l1", {"a": 0.5}), model, torch.zeros(1, 4))
        assert model.a.out_features == 4 and model.s.weight.shape == (8, 4)
        assert model(torch.zeros(2, 4)).shape == (2, 3)
    finally:
        from evaluators.units import graph
        graph.PRUNERS.pop(_Scale)


def test_a_model_that_cannot_be_traced_is_refused():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            raise RuntimeError("needs a mask argument")

    with pytest.raises(pruning.PruningError, match="cannot trace Broken.*granularity unstructured or nm"):
        pruning.discover_groups(Broken(), torch.zeros(1, 4))


def test_policy_naming_heads_under_channel_granularity_points_to_structured():
    model = zoo.TextTransformer(30, max_len=8, embed_dim=8, num_heads=2, ff_dim=8).eval()
    with pytest.raises(pruning.PruningError, match="'encoder.layers.0.self_attn'.*granularity 'structured'"):
        pruning.apply(Policy("l1", {"encoder.layers.0.self_attn": 0.5}), model, torch.ones(1, 8, dtype=torch.long))


def test_restore_refuses_weights_of_another_policy():
    model = _mlp()
    state = pruning.apply(Policy("l1", {"1": 0.5}), copy.deepcopy(model), torch.zeros(1, 1, 4, 4)).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with pytest.raises(pruning.PruningError, match="do not fit"):
        pruning.restore(Policy("l1", {"3": 0.5}), model, torch.zeros(1, 1, 4, 4), torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
