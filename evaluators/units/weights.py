"""Single weights of the layers that multiply inputs (``nn.Linear`` and conv weights, recurrent
``weight_ih``/``weight_hh``, ``nn.MultiheadAttention``'s input projections): the unit kind
``weight``, pruned by masks (granularities ``unstructured`` and ``nm``).

A mask zeroes weights in place and a gradient hook keeps them at zero while the model is fine-tuned
(SGD momentum and weight decay leave a zero weight with a zero gradient at zero); the model stays a
plain module and its state dict holds the zeros, which :meth:`Weights.saved` reads back.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import nn

from evaluators.units.base import Context, Keep, Scores, Unit, UnitKind, detached


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

    def input_scale(self, stats: Any) -> torch.Tensor:
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


def apply_mask(weight: nn.Parameter, keep: torch.Tensor) -> None:
    """Zero ``weight`` where ``keep`` is False and keep it zero under gradient descent."""
    keep = keep.to(device=weight.device)
    with torch.no_grad():
        weight.mul_(keep.to(weight.dtype))
    weight.register_hook(lambda grad, mask=keep: grad * mask.to(device=grad.device, dtype=grad.dtype))


class Weights(UnitKind):
    """Each weight tensor masks can prune (one group per tensor; N:M only where its input size fills the blocks)."""

    name = "weights"
    kinds = ("weight",)
    granularities = ("unstructured", "nm")
    scorer = "weight_scores"

    def find(self, context: Context) -> list[Unit]:
        found = []
        for t in targets(context.model):
            grans = ("unstructured", "nm") if t.nm_ready(context.nm_block) else ("unstructured",)
            found.append(Unit(t.name, "weight", t.weight.numel(), t.module, (context.names[t.module] or t.name,), grans, t))
        return found

    def score(self, unit: Unit, criterion: Any, stats: Any) -> Scores:
        t = unit.state
        grad = detached(t.weight, True) if criterion.needs_gradients else None
        scale = t.input_scale(stats) if criterion.needs_activations else None
        return {None: criterion.weight_scores(t.weight.detach(), grad, scale)}

    def prune(self, unit: Unit, keep: Keep, context: Context) -> None:
        apply_mask(unit.state.weight, keep[None])

    def saved(self, unit: Unit, state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The mask: where the saved weights are not zero."""
        return state_dict[unit.name] != 0
