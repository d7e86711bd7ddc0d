"""Pruning criteria: one registry, each criterion usable by every unit kind it can score.

A criterion implements up to three optional scorers: ``channel_importance`` (the coupled channels
of a torch-pruning group, through torch-pruning's importance classes where one fits),
``unit_scores`` (whole units given as weight vectors: attention heads, recurrent hidden units) and
``weight_scores`` (single weights, for unstructured and N:M masks). Each unit kind says which scorer
it calls (``UnitKind.scorer``), so where a criterion applies follows from what it implements
(:attr:`Criterion.kinds`). Criteria that need data (``taylor``: gradients of the calibration
loss, ``wanda``: input activations) get it from :func:`calibrate`.

>>> sorted(CRITERIA)
['bn_scale', 'fpgm', 'l1', 'l2', 'lamp', 'random', 'taylor', 'wanda']
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function as tp_fn

from evaluators.batches import Calibration, batch_size_of, cross_entropy_loss, forward, targets_of
from evaluators.prune_base import PruningError
from evaluators.units.base import replace_module
from evaluators.units.mha import PrunedMultiheadAttention
from evaluators.units.rnn import weight_inputs

_WEIGHTED = [nn.modules.conv._ConvNd, nn.Linear]


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


def _sum_squares(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    x = x.detach().float()
    dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
    return x.pow(2).sum(dim=dims)


def calibrate(model: nn.Module, calibration: Calibration, *, gradients: bool, activations: bool) -> Stats:
    """Run the calibration batches through ``model`` (in eval mode, buffers untouched): leave on
    ``.grad`` the gradients of ``calibration.loss`` averaged over every calibration example, and/or
    measure the inputs' norms (seen while running ``batches.forward(model, batch)``).

    >>> model = nn.Sequential(nn.Linear(3, 2))
    >>> stats = calibrate(model, Calibration.from_tensors(torch.ones(4, 3)), gradients=False, activations=True)
    >>> stats.input_norms[(model[0], "input")]
    tensor([2., 2., 2.])
    """
    if not isinstance(calibration, Calibration):
        raise PruningError(f"calibration must be an evaluators.batches.Calibration (Calibration.from_tensors(x, y) for "
                           f"tensors), but got {type(calibration).__name__}")
    if not calibration.batches:
        raise PruningError("calibration has no batches: data-dependent criteria need at least one")
    total = sum(batch_size_of(b) for b in calibration.batches)
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
                    for attr, seen in weight_inputs(module, args[0]).items():
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
            for batch in calibration.batches:
                if gradients:
                    (_loss(calibration.loss, model, batch) * (batch_size_of(batch) / total)).backward()
                else:
                    forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
        for name, m in swapped:
            replace_module(model, name, m)
        model.train(was_training)
    stats.input_norms = {k: v.sqrt() for k, v in sums.items()}
    return stats


def _loss(loss: Callable[[nn.Module, object], torch.Tensor], model: nn.Module, batch: object) -> torch.Tensor:
    if loss is cross_entropy_loss and targets_of(batch) is None:
        raise PruningError("criterion 'taylor' needs targets: calibration batches as (inputs, targets) or dicts with "
                           "'labels' (Calibration.from_tensors(x, y)), or a Calibration whose loss needs none")
    try:
        return loss(model, batch)
    except Exception as exc:  # a user's loss or model
        raise PruningError(f"criterion 'taylor' needs the gradients of calibration.loss(model, batch), which failed on a "
                           f"calibration batch: {type(exc).__name__}: {exc}") from exc


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
    """One way to score what pruning may remove. A subclass implements the scorers that make sense
    for it, as methods of these names (the base class leaves them ``None``):

    - ``channel_importance(stats) -> torch_pruning.importance.Importance``: scores of the coupled
      channels of a torch-pruning group;
    - ``unit_scores(vectors, grads) -> Tensor``: one score per unit, given each unit's weights (and,
      with ``needs_gradients``, their gradients) as one row of ``vectors`` (units, d);
    - ``weight_scores(weight, grad, input_scale) -> Tensor``: one score per weight (same shape);
      ``input_scale`` broadcasts each input's norm over ``weight`` (``needs_activations``).

    :attr:`kinds`, the group kinds it applies to, follows from them. Higher scores are kept.

    >>> class Peak(Criterion):
    ...     name, summary = "peak", "largest absolute weight of each unit"
    ...     def unit_scores(self, vectors, grads):
    ...         return vectors.abs().amax(1)
    >>> Peak().kinds
    ('rnn-hidden', 'attention-heads')
    """

    name = ""
    summary = ""
    needs_gradients = False
    needs_activations = False
    channel_importance: Callable[..., tp.importance.Importance] | None = None
    unit_scores: Callable[..., torch.Tensor] | None = None
    weight_scores: Callable[..., torch.Tensor] | None = None

    def implements(self, scorer: str) -> bool:
        """Whether this criterion has the scorer method ``scorer``."""
        return callable(getattr(self, scorer, None))

    @property
    def kinds(self) -> tuple[str, ...]:
        """The group kinds this criterion can score (of the unit kinds registered now)."""
        from evaluators.units import kinds_scored_by

        return kinds_scored_by(self)


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

    def channel_importance(self, stats):
        return tp.importance.FPGMImportance(p=2)

    def unit_scores(self, vectors, grads):  # as torch-pruning's FPGM: distances between the units' |w|^2
        squared = vectors.float().pow(2)
        return torch.cdist(squared[None], squared[None])[0].sum(0)


class Wanda(Criterion):
    name, summary = "wanda", "activation-aware |W| * ||X|| of linear/conv weights (Wanda)"
    needs_activations = True

    def channel_importance(self, stats):
        return WandaImportance(stats)

    def weight_scores(self, weight, grad, input_scale):
        return weight.abs() * input_scale


CRITERIA: dict[str, Criterion] = {c.name: c for c in (L1(), L2(), Random(), Taylor(), BNScale(), LAMP(), FPGM(), Wanda())}


def register_criterion(criterion: Criterion) -> None:
    """Add a criterion to the registry (its ``name`` becomes valid in configs and policies)."""
    if not isinstance(criterion, Criterion) or not criterion.name:
        raise ValueError(f"register_criterion needs a Criterion with a non-empty name, but got {criterion!r}")
    if not criterion.kinds:
        raise ValueError(f"criterion {criterion.name!r} implements no scorer a registered unit kind uses "
                         "(channel_importance, unit_scores, weight_scores), so it would apply to nothing")
    CRITERIA[criterion.name] = criterion


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise PruningError(f"unknown criterion {name!r}; valid: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]
