"""Unstructured and N:M pruning: masks on weight tensors, baked into the weights.

The targets are the weights that multiply inputs: ``nn.Linear`` and conv weights, recurrent
``weight_ih``/``weight_hh`` and ``nn.MultiheadAttention``'s input projections. A mask zeroes weights
in place and a gradient hook keeps them at zero while the model is fine-tuned (SGD momentum and
weight decay leave a zero weight with a zero gradient at zero); the model stays a plain module
and its state dict holds the zeros. N:M masks zero ``floor(ratio * M)`` of every M consecutive
weights along the input dimension (``in_features``, or a conv's input channels per position).

:func:`sparse_state_dict_bytes` stores mostly-zero tensors as a bit mask plus their non-zero values,
the size a sparse deployment would ship; :func:`load_sparse_state_dict` reads it back.
"""
from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import torch
import torch_pruning as tp
from torch import nn

from evaluators.criteria import Criterion, Stats, check_applies
from evaluators.prune_base import PruningError, PruneReport
from spaces import Policy, PrunableGroup

SPARSE_FORMAT = "secateurs.sparse-state-dict/1"


@dataclasses.dataclass
class Target:
    """One weight tensor masks can prune: its parameter name, module and role for input norms."""

    name: str
    module: nn.Module
    attr: str

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    @property
    def conv(self) -> bool:
        return isinstance(self.module, nn.modules.conv._ConvNd)

    def nm_ready(self, block: int) -> bool:
        w = self.weight
        return not getattr(self.module, "transposed", False) and w.dim() >= 2 and w.shape[1] % block == 0

    def input_scale(self, stats: Stats) -> torch.Tensor:
        """‖X‖ of the input each weight multiplies, broadcastable over the weight (Wanda)."""
        w, m, what = self.weight, self.module, f"weight {self.name!r}"
        if isinstance(m, nn.MultiheadAttention):
            if self.attr == "in_proj_weight":
                norms = [stats.norm(m, role, what) for role in ("query", "key", "value")]
                return torch.cat([n.expand(w.shape[0] // 3, -1) for n in norms])
            return stats.norm(m, {"q_proj_weight": "query", "k_proj_weight": "key", "v_proj_weight": "value"}[self.attr], what)[None]
        if isinstance(m, nn.RNNBase):
            return stats.norm(m, self.attr, what)[None]
        norm = stats.norm(m, "input", what)
        if self.conv:
            groups = m.groups
            scale = norm.view(groups, -1).repeat_interleave(w.shape[0] // groups, dim=0)
            return scale.view(*scale.shape, *([1] * (w.dim() - 2)))
        return norm[None]


def targets(model: nn.Module) -> list[Target]:
    """Every weight tensor masks can prune, in module order."""
    found = []
    for prefix, m in model.named_modules():
        attrs: list[str] = []
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            attrs = ["weight"]
        elif isinstance(m, nn.RNNBase):
            attrs = [n for n, _ in m.named_parameters(recurse=False) if n.startswith("weight_")]
        elif isinstance(m, nn.MultiheadAttention):
            attrs = [n for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight") if getattr(m, n) is not None]
        found += [Target(f"{prefix}.{a}" if prefix else a, m, a) for a in attrs if isinstance(getattr(m, a, None), nn.Parameter)]
    return found


def discover(model: nn.Module, granularities: tuple[str, ...], nm_block: int) -> list[PrunableGroup]:
    groups = []
    names = {m: n for n, m in model.named_modules()}
    for t in targets(model):
        grans = ("unstructured", "nm") if t.nm_ready(nm_block) else ("unstructured",)
        if set(grans) & set(granularities):
            groups.append(PrunableGroup(t.name, "weight", t.weight.numel(), (names[t.module] or t.name,), grans))
    return groups


def nm_keep_mask(scores: torch.Tensor, block: int, zeros: int) -> torch.Tensor:
    """True where a weight survives: the ``zeros`` lowest scores of every ``block`` along dim 1 go.

    >>> nm_keep_mask(torch.tensor([[4., 1., 3., 2., 0., 9., 8., 7.]]), block=4, zeros=2).int()
    tensor([[1, 0, 1, 0, 0, 1, 1, 0]], dtype=torch.int32)
    """
    moved = scores.movedim(1, -1)
    blocks = moved.reshape(*moved.shape[:-1], moved.shape[-1] // block, block)
    drop = torch.argsort(blocks, dim=-1, stable=True)[..., :zeros]
    keep = torch.ones(blocks.shape, dtype=torch.bool).scatter_(-1, drop, False)
    return keep.reshape(moved.shape).movedim(-1, 1)


def _global_masks(scores: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Remove the ``budget`` lowest scores across all tensors, each tensor keeping its best weight."""
    flat = torch.cat([s.flatten().float() for s in scores])
    offsets = [0]
    for s in scores:
        offsets.append(offsets[-1] + s.numel())
    for start, s in zip(offsets, scores):
        flat[start + int(torch.argmax(s.flatten()))] = math.inf
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:budget]] = False
    return [keep[a:b].view(s.shape) for a, b, s in zip(offsets, offsets[1:], scores)]


def prune(model: nn.Module, policy: Policy, criterion: Criterion | None, stats: Callable[[], Stats | None],
          *, shapes: Mapping[str, torch.Tensor] | None = None) -> PruneReport:
    """Mask the weights ``policy`` names (in place). With ``shapes`` (a saved pruned state dict) the
    masks are where its weights are zero."""
    found = {t.name: t for t in targets(model)}
    if policy.granularity == "nm":
        found = {n: t for n, t in found.items() if t.nm_ready(policy.nm_block)}
    unknown = sorted(set(policy.ratios) - set(found))
    if unknown:
        raise PruningError(
            f"policy names weight group(s) {unknown} that this model does not have for granularity {policy.granularity!r}"
            + (f" (N:M needs an input size that is a multiple of {policy.nm_block})" if policy.granularity == "nm" else "")
            + f"; available groups: {', '.join(found)}"
        )
    named = [found[n] for n in policy.ratios]
    if shapes is not None:
        masks = {t.name: shapes[t.name] != 0 for t in named}
    else:
        for t in named:
            check_applies(criterion, "weight", t.name)
        measured = stats()
        scores = {t.name: _scores(t, criterion, measured) for t in named}
        masks = {}
        pooled = [t for t in named if t.name in policy.global_groups]
        for t in named:
            if t in pooled:
                continue
            ratio = policy.ratios[t.name]
            if policy.granularity == "nm":
                masks[t.name] = nm_keep_mask(scores[t.name], policy.nm_block, math.floor(ratio * policy.nm_block + 1e-9))
            else:
                keep = torch.ones(t.weight.numel(), dtype=torch.bool)
                keep[torch.argsort(scores[t.name].flatten().float(), stable=True)[: math.floor(t.weight.numel() * ratio + 1e-9)]] = False
                masks[t.name] = keep.view(t.weight.shape)
        if pooled:
            budget = sum(math.floor(t.weight.numel() * policy.ratios[t.name] + 1e-9) for t in pooled)
            masks.update(zip((t.name for t in pooled), _global_masks([scores[t.name] for t in pooled], budget)))
    for t in named:
        apply_mask(t.weight, masks[t.name])
    return PruneReport(policy.granularity, {t.name: (t.weight.numel(), int((~masks[t.name]).sum())) for t in named}, model)


def rankings(model: nn.Module, criterion: Criterion, names: list[str]) -> dict[str, torch.Tensor]:
    """For each weight tensor in ``names``: the ascending scores of the weights a global ranking may
    remove (all but the best one, which global masks keep). Data-free criteria only."""
    found = {t.name: t for t in targets(model)}
    missing = [n for n in names if n not in found]
    if missing:
        raise PruningError(f"no weight group(s) {missing} in this model; available groups: {', '.join(found)}")
    out = {}
    for n in names:
        check_applies(criterion, "weight", n)
        out[n] = _scores(found[n], criterion, None).flatten().float().sort().values[:-1]
    return out


def _scores(t: Target, criterion: Criterion, stats: Stats | None) -> torch.Tensor:
    w = t.weight.detach()
    grad = None
    if criterion.needs_gradients:
        grad = t.weight.grad.detach() if t.weight.grad is not None else torch.zeros_like(w)
    scale = t.input_scale(stats) if criterion.needs_activations else None
    return criterion.weight_scores(w, grad, scale)


def apply_mask(weight: nn.Parameter, keep: torch.Tensor) -> None:
    """Zero ``weight`` where ``keep`` is False and keep it zero under gradient descent."""
    keep = keep.to(device=weight.device)
    with torch.no_grad():
        weight.mul_(keep.to(weight.dtype))
    weight.register_hook(lambda grad, mask=keep: grad * mask.to(device=grad.device, dtype=grad.dtype))


# ---------------------------------------------------------------- deployable size and effective cost


def _pack(bits: torch.Tensor) -> torch.Tensor:
    flat = bits.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).view(-1, 8)
    return (flat * torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)).sum(1).to(torch.uint8)


def _unpack(packed: torch.Tensor, count: int) -> torch.Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.int16)
    return ((packed.to(torch.int16)[:, None] >> shifts) & 1).flatten()[:count].bool()


def sparse_state_dict(state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The state dict with every floating tensor that is cheaper so stored as a bit mask plus its non-zeros."""
    state = state.state_dict() if isinstance(state, nn.Module) else state
    dense, sparse = {}, {}
    for name, t in state.items():
        t = t.detach().cpu()
        if t.is_floating_point() and t.numel() >= 8:
            nonzero = t != 0
            cost = t.numel() / 8 + int(nonzero.sum()) * t.element_size()
            if cost < t.numel() * t.element_size():
                sparse[name] = {"shape": list(t.shape), "mask": _pack(nonzero), "values": t[nonzero].clone()}
                continue
        dense[name] = t
    return {"format": SPARSE_FORMAT, "dense": dense, "sparse": sparse}


def sparse_state_dict_bytes(model: nn.Module) -> bytes:
    """Bytes of ``torch.save(sparse_state_dict(model))``: the weights file a sparse deployment ships.

    >>> layer = nn.Linear(64, 64, bias=False)
    >>> with torch.no_grad(): _ = layer.weight[:, :48].zero_()
    >>> len(sparse_state_dict_bytes(layer)) < 0.5 * 64 * 64 * 4
    True
    """
    buffer = io.BytesIO()
    torch.save(sparse_state_dict(model), buffer)
    return buffer.getvalue()


def load_sparse_state_dict(source: bytes | str | Path | BinaryIO) -> dict[str, torch.Tensor]:
    """A plain state dict from what :func:`sparse_state_dict_bytes` wrote (``weights_only`` loading)."""
    data = torch.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != SPARSE_FORMAT:
        raise ValueError(f"not a sparse state dict (expected format {SPARSE_FORMAT!r})")
    state = dict(data["dense"])
    for name, entry in data["sparse"].items():
        count = math.prod(entry["shape"])
        mask = _unpack(entry["mask"], count)
        full = torch.zeros(count, dtype=entry["values"].dtype)
        full[mask] = entry["values"]
        state[name] = full.view(entry["shape"])
    return state


def effective_macs_and_params(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """MACs and parameters a sparse kernel would see: torch-pruning's dense counts, with the MACs of
    each layer owning mask targets scaled by their density and zero target weights not counted.
    For a model without zeros in those weights this equals the dense counts."""
    was_training = model.training
    macs, params, layer_macs, _ = tp.utils.count_ops_and_params(model, example_inputs, layer_wise=True)
    model.train(was_training)
    totals: dict[nn.Module, list[int]] = {}
    zeros_all = 0
    for t in targets(model):
        zeros = int((t.weight == 0).sum())
        zeros_all += zeros
        entry = totals.setdefault(t.module, [0, 0])
        entry[0] += zeros
        entry[1] += t.weight.numel()
    for module, (zeros, numel) in totals.items():
        macs -= (layer_macs.get(module) or 0) * zeros / numel
    return int(round(macs)), int(params) - zeros_all
