"""Pruning criteria: one registry, each criterion usable by every granularity where it makes sense.

A criterion scores three kinds of things: the coupled channels of a torch-pruning group (through
torch-pruning's importance classes where one fits), whole units given as weight vectors (attention
heads, recurrent hidden units), and single weights (unstructured and N:M masks). Criteria that need
data (``taylor``: gradients, ``wanda``: input activations) get it from :func:`calibrate`.

>>> sorted(CRITERIA)
['bn_scale', 'fpgm', 'l1', 'l2', 'lamp', 'random', 'taylor', 'wanda']
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function as tp_fn

from evaluators import rnn_pruning
from evaluators.attention_pruning import PrunedMultiheadAttention, replace_module
from evaluators.prune_base import PruningError

CALIBRATION_SAMPLES = 256  # at most this many calibration samples are used (a fixed-seed draw)
CALIBRATION_BATCH = 64
_WEIGHTED = [nn.modules.conv._ConvNd, nn.Linear]
ALL_KINDS = ("conv", "linear", "attention-heads", "rnn-hidden", "weight")


@dataclasses.dataclass
class Stats:
    """What calibration measured: the L2 norm of each input feature over the calibration samples,
    keyed by ``(module, role)``: role ``input`` for Linear/Conv, ``query``/``key``/``value`` for
    attention, the weight's name (``weight_hh_l1``...) for recurrent layers. Gradients are left on
    the parameters' ``.grad``."""

    input_norms: dict[tuple[nn.Module, str], torch.Tensor] = dataclasses.field(default_factory=dict)

    def norm(self, module: nn.Module, role: str, what: str) -> torch.Tensor:
        if (module, role) not in self.input_norms:
            raise PruningError(f"criterion 'wanda' has no input activations for {what}: its {role} was not seen during "
                               "calibration (exclude it, or use another criterion)")
        return self.input_norms[(module, role)]


def _split(calibration: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Up to ``CALIBRATION_SAMPLES`` samples, drawn with a fixed seed (so a policy replays the same)."""
    if isinstance(calibration, torch.Tensor):
        x, y = calibration, None
    elif isinstance(calibration, (tuple, list)) and len(calibration) == 2:
        x, y = calibration
    else:
        raise PruningError(f"calibration must be a tensor of inputs or a tuple (inputs, targets), but got {type(calibration).__name__}")
    if len(x) > CALIBRATION_SAMPLES:
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:CALIBRATION_SAMPLES].sort().values
        x, y = x[pick], None if y is None else y[pick]
    return x, y


def _sum_squares(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    x = x.detach().float()
    dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
    return x.pow(2).sum(dim=dims)


def calibrate(model: nn.Module, calibration: Any, *, gradients: bool, activations: bool) -> Stats:
    """Run the calibration batches through ``model`` (in eval mode, buffers untouched): leave the
    gradients of the mean cross-entropy on ``.grad`` and/or measure input norms.

    >>> model = nn.Sequential(nn.Linear(3, 2))
    >>> stats = calibrate(model, torch.ones(4, 3), gradients=False, activations=True)
    >>> stats.input_norms[(model[0], "input")]
    tensor([2., 2., 2.])
    """
    x, y = _split(calibration)
    if gradients and y is None:
        raise PruningError("criterion 'taylor' needs targets: pass calibration=(inputs, targets)")
    stats = Stats()
    sums: dict[tuple[nn.Module, str], torch.Tensor] = {}

    def add(key, value):
        sums[key] = sums[key] + value if key in sums else value

    def hook_for(owner: nn.Module):
        def hook(module, args, kwargs):
            if isinstance(module, nn.MultiheadAttention) or getattr(module, "is_pruned_attention", False):
                names = ("query", "key", "value")
                values = list(args) + [kwargs.get(n) for n in names[len(args):]]
                for role, v in zip(names, values):
                    if isinstance(v, torch.Tensor):
                        add((owner, role), _sum_squares(v, -1))
            elif isinstance(module, nn.RNNBase):
                if args and isinstance(args[0], torch.Tensor):
                    for attr, seen in rnn_pruning.weight_inputs(module, args[0]).items():
                        add((owner, attr), _sum_squares(seen, -1))
            elif args and isinstance(args[0], torch.Tensor):
                channel_dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
                add((owner, "input"), _sum_squares(args[0], channel_dim))
        return hook

    watched = (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase, nn.MultiheadAttention)
    hooks, swapped = [], []
    was_training = model.training
    try:
        if activations:
            hooks = [m.register_forward_pre_hook(hook_for(m), with_kwargs=True) for m in model.modules()
                     if isinstance(m, watched) or getattr(m, "is_pruned_attention", False)]
            # nn.MultiheadAttention calls out_proj functionally: observe it through an equivalent module
            for name, m in list(model.named_modules()):
                if isinstance(m, nn.MultiheadAttention) and m.bias_k is None and not m.add_zero_attn:
                    twin = PrunedMultiheadAttention.from_attention(m, range(m.num_heads))
                    replace_module(model, name, twin)
                    swapped.append((name, m))
                    hooks.append(twin.register_forward_pre_hook(hook_for(m), with_kwargs=True))
                    hooks.append(twin.out_proj.register_forward_pre_hook(hook_for(m.out_proj), with_kwargs=True))
        model.eval()
        if gradients:
            for p in model.parameters():
                p.grad = None
        with torch.set_grad_enabled(gradients):
            for start in range(0, len(x), CALIBRATION_BATCH):
                out = model(x[start:start + CALIBRATION_BATCH])
                if gradients:
                    loss = F.cross_entropy(out, y[start:start + CALIBRATION_BATCH], reduction="sum") / len(x)
                    loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for name, m in swapped:
            replace_module(model, name, m)
        model.train(was_training)
    stats.input_norms = {k: v.sqrt() for k, v in sums.items()}
    return stats


class WandaImportance(tp.importance.GroupMagnitudeImportance):
    """Channel importance |W|·‖X‖ (Wanda): every weight of a group's layers weighted by the norm
    of the input feature it multiplies, summed per channel, averaged over the group's layers."""

    def __init__(self, stats: Stats) -> None:
        super().__init__(p=1, target_types=list(_WEIGHTED))
        self.stats = stats

    @torch.no_grad()
    def __call__(self, group):
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.layer, dep.pruning_fn
            if not isinstance(layer, tuple(self.target_types)) or getattr(layer, "transposed", False):
                continue
            groups = getattr(layer, "groups", 1)
            norm = self.stats.norm(layer, "input", f"layer {type(layer).__name__}")
            w = layer.weight.detach().abs()
            if fn in (tp_fn.prune_conv_out_channels, tp_fn.prune_linear_out_channels):
                per_in = norm.view(groups, -1)  # input norms of each conv group
                scale = per_in.repeat_interleave(w.shape[0] // groups, dim=0)  # (out, in/groups)
                scale = scale.view(*scale.shape, *([1] * (w.dim() - 2)))
                local = (w * scale).flatten(1).sum(1)[idxs]
            elif fn in (tp_fn.prune_conv_in_channels, tp_fn.prune_linear_in_channels) and groups == 1:
                local = (w.transpose(0, 1).flatten(1).sum(1) * norm)[idxs]
            else:
                continue
            group_imp.append(local)
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


def _lamp(scores: torch.Tensor) -> torch.Tensor:
    """LAMP scores (Lee et al., 2021): each squared magnitude over the sum of those not smaller than it."""
    flat = scores.flatten()
    order = torch.argsort(flat, stable=True)
    ranked = flat[order]
    tail = ranked.flip(0).cumsum(0).flip(0)  # sum of ranked[i:]
    out = torch.empty_like(flat)
    out[order] = ranked / tail.clamp_min(torch.finfo(tail.dtype).tiny)
    return out.view_as(scores)


class Criterion:
    """One way to score what pruning may remove. ``kinds`` are the group kinds it applies to.

    Subclasses implement the scorers that make sense for them; the base ones raise.
    """

    name = ""
    summary = ""
    kinds: tuple[str, ...] = ALL_KINDS
    needs_gradients = False
    needs_activations = False

    def channel_importance(self, stats: Stats) -> tp.importance.Importance:
        raise NotImplementedError

    def unit_scores(self, vectors: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
        """Scores of ``units`` given each unit's weights as one row of ``vectors`` (units, d)."""
        raise NotImplementedError

    def weight_scores(self, weight: torch.Tensor, grad: torch.Tensor | None, input_scale: torch.Tensor | None) -> torch.Tensor:
        """One score per weight (same shape); ``input_scale`` broadcasts each input's norm over ``weight``."""
        raise NotImplementedError


class L1(Criterion):
    name, summary = "l1", "sum of absolute weights"

    def channel_importance(self, stats):
        return tp.importance.GroupMagnitudeImportance(p=1, target_types=list(_WEIGHTED))

    def unit_scores(self, vectors, grads):
        return vectors.abs().sum(1)

    def weight_scores(self, weight, grad, input_scale):
        return weight.abs()


class L2(L1):
    name, summary = "l2", "sum of squared weights"

    def channel_importance(self, stats):
        return tp.importance.GroupMagnitudeImportance(p=2, target_types=list(_WEIGHTED))

    def unit_scores(self, vectors, grads):
        return vectors.pow(2).sum(1)

    def weight_scores(self, weight, grad, input_scale):
        return weight.pow(2)


class Random(Criterion):
    name, summary = "random", "uniform random scores (seeded by the policy)"

    def channel_importance(self, stats):
        return tp.importance.RandomImportance()

    def unit_scores(self, vectors, grads):
        return torch.rand(vectors.shape[0])

    def weight_scores(self, weight, grad, input_scale):
        return torch.rand(weight.shape)


class Taylor(Criterion):
    name, summary = "taylor", "first-order Taylor |w * dL/dw| on calibration batches"
    needs_gradients = True

    def channel_importance(self, stats):
        return tp.importance.GroupTaylorImportance(target_types=list(_WEIGHTED))

    def unit_scores(self, vectors, grads):
        return (vectors * grads).abs().sum(1)

    def weight_scores(self, weight, grad, input_scale):
        return (weight * grad).abs()


class BNScale(Criterion):
    name, summary = "bn_scale", "|gamma| of the BatchNorm that follows the channel (network slimming)"
    kinds = ("conv", "linear")

    def channel_importance(self, stats):
        return tp.importance.BNScaleImportance()


class LAMP(Criterion):
    name, summary = "lamp", "layer-adaptive magnitude (LAMP): comparable across layers, for global pruning"

    def channel_importance(self, stats):
        return tp.importance.LAMPImportance(p=2)

    def unit_scores(self, vectors, grads):
        return _lamp(vectors.pow(2).sum(1))

    def weight_scores(self, weight, grad, input_scale):
        return _lamp(weight.pow(2))


class FPGM(Criterion):
    name, summary = "fpgm", "summed distance to the other units' |w|^2 (units near the geometric median go first)"
    kinds = ("conv", "linear", "attention-heads", "rnn-hidden")

    def channel_importance(self, stats):
        return tp.importance.FPGMImportance(p=2)

    def unit_scores(self, vectors, grads):  # as torch-pruning's FPGM: distances between the units' |w|^2
        squared = vectors.float().pow(2)
        return torch.cdist(squared[None], squared[None])[0].sum(0)


class Wanda(Criterion):
    name, summary = "wanda", "activation-aware |W| * ||X|| of linear/conv weights (Wanda)"
    kinds = ("conv", "linear", "weight")
    needs_activations = True

    def channel_importance(self, stats):
        return WandaImportance(stats)

    def weight_scores(self, weight, grad, input_scale):
        return weight.abs() * input_scale


CRITERIA: dict[str, Criterion] = {c.name: c for c in (L1(), L2(), Random(), Taylor(), BNScale(), LAMP(), FPGM(), Wanda())}


def register_criterion(criterion: Criterion) -> None:
    """Add a criterion to the registry (its ``name`` becomes valid in configs and policies)."""
    if not criterion.name:
        raise ValueError("a criterion needs a non-empty name")
    CRITERIA[criterion.name] = criterion


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise PruningError(f"unknown criterion {name!r}; valid: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]


def check_applies(criterion: Criterion, kind: str, group: str) -> None:
    """Raise unless ``criterion`` can score a group of ``kind``, naming the criteria that can."""
    if kind not in criterion.kinds:
        valid = sorted(c.name for c in CRITERIA.values() if kind in c.kinds)
        raise PruningError(f"criterion {criterion.name!r} does not apply to {kind} group {group!r}; "
                           f"criteria for {kind} groups: {', '.join(valid)}")


def applicable(kind: str) -> list[str]:
    """The criteria that can score a group of ``kind``."""
    return sorted(c.name for c in CRITERIA.values() if kind in c.kinds)
