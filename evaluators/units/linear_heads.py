"""Heads of attention written with ``nn.Linear`` projections (:class:`LinearAttention`: a fused
``qkv`` or separate ``q``/``k``/``v`` linears, an output linear and an integer head-count
attribute): the unit kind ``attention-heads`` for such modules. They are pruned in place: the
linears shrink and the head-count attribute drops, so the module stays the user's; its forward must
reshape with the head count (checked: a module that no longer runs is refused by name).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from evaluators.batches import call
from evaluators.prune_base import PruningError
from evaluators.units.base import Context, Keep, Scores, Unit, UnitKind, detached, sliced_linear
from evaluators.units.mha import ATTENTION_TYPES, heads_limits
from spaces import Policy

HEAD_ATTRS = ("num_heads", "n_heads", "n_head")
FUSED_NAMES = ("qkv", "in_proj", "qkv_proj", "c_attn", "Wqkv")
SEPARATE_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"), ("wq", "wk", "wv"), ("to_q", "to_k", "to_v"))
OUT_NAMES = ("proj", "out_proj", "o_proj", "c_proj", "wo", "out", "dense")
INNER_ATTRS = ("inner_dim", "all_head_size", "attn_dim")  # ints some modules keep equal to heads * head_dim


@dataclasses.dataclass
class LinearAttention:
    """Multi-head attention written with ``nn.Linear`` projections: a fused ``qkv`` (q, k, v stacked
    along the outputs) or separate ``q``/``k``/``v`` linears, an output linear, and an integer head
    count attribute (``num_heads``, ``n_heads`` or ``n_head``) that its forward reshapes with."""

    module: nn.Module
    heads_attr: str
    projections: tuple[str, ...]  # one fused name, or the q, k, v names
    out: str

    @property
    def num_heads(self) -> int:
        return int(getattr(self.module, self.heads_attr))

    @property
    def inner(self) -> int:
        first = getattr(self.module, self.projections[0])
        return first.out_features // (3 if len(self.projections) == 1 else 1)

    @property
    def head_dim(self) -> int:
        return self.inner // self.num_heads

    def linears(self) -> list[nn.Linear]:
        return [getattr(self.module, n) for n in (*self.projections, self.out)]


def find_linear_attention(model: nn.Module) -> dict[str, LinearAttention]:
    """Every module of ``model`` that looks like :class:`LinearAttention` (by its children's names and
    shapes), by module name."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, ATTENTION_TYPES):
            continue
        attr = next((a for a in HEAD_ATTRS if isinstance(getattr(m, a, None), int) and not isinstance(getattr(m, a), bool)), None)
        out = next((n for n in OUT_NAMES if isinstance(getattr(m, n, None), nn.Linear)), None)
        if attr is None or out is None or getattr(m, attr) < 2:
            continue
        heads, width = getattr(m, attr), getattr(m, out).in_features
        if width % heads:
            continue
        fused = next((n for n in FUSED_NAMES if isinstance(getattr(m, n, None), nn.Linear) and getattr(m, n).out_features == 3 * width), None)
        separate = next((names for names in SEPARATE_NAMES
                         if all(isinstance(getattr(m, n, None), nn.Linear) and getattr(m, n).out_features == width for n in names)), None)
        if fused or separate:
            found[name] = LinearAttention(m, attr, (fused,) if fused else separate, out)
    return found


def linear_head_vectors(att: LinearAttention, grad: bool = False) -> torch.Tensor:
    """One row per head of a :class:`LinearAttention`: its q/k/v rows and output columns (or their gradients)."""
    heads, hd = att.num_heads, att.head_dim

    def value(t: torch.Tensor) -> torch.Tensor:
        return detached(t, grad)

    if len(att.projections) == 1:
        weights = list(value(getattr(att.module, att.projections[0]).weight).chunk(3))
    else:
        weights = [value(getattr(att.module, n).weight) for n in att.projections]
    parts = [w.reshape(heads, hd * w.shape[1]) for w in weights]
    out = value(getattr(att.module, att.out).weight)
    parts.append(out.reshape(out.shape[0], heads, hd).transpose(0, 1).reshape(heads, -1))
    return torch.cat(parts, dim=1)


def prune_linear_heads(att: LinearAttention, keep: Sequence[int]) -> None:
    """Keep only the heads ``keep`` of ``att`` (in place): its projections shrink, its head count drops."""
    keep = sorted(int(h) for h in keep)
    heads, hd, inner = att.num_heads, att.head_dim, att.inner
    if not keep or keep[0] < 0 or keep[-1] >= heads:
        raise PruningError(f"heads to keep must be a non-empty subset of 0..{heads - 1}, but got {keep}")
    rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in keep])
    m = att.module
    if len(att.projections) == 1:
        setattr(m, att.projections[0], sliced_linear(getattr(m, att.projections[0]), rows=torch.cat([rows + i * inner for i in range(3)])))
    else:
        for n in att.projections:
            setattr(m, n, sliced_linear(getattr(m, n), rows=rows))
    setattr(m, att.out, sliced_linear(getattr(m, att.out), cols=rows))
    setattr(m, att.heads_attr, len(keep))
    for a in INNER_ATTRS:
        if getattr(m, a, None) == inner:
            setattr(m, a, len(keep) * hd)


def saved_linear_heads(att: LinearAttention, name: str, shapes: Mapping[str, torch.Tensor]) -> int:
    """How many heads a saved state dict gives the attention module ``name``."""
    key = f"{name}.{att.projections[0]}.weight"
    if key not in shapes:
        raise PruningError(f"the saved state dict has no {key!r}: it does not belong to this model and policy")
    return int(shapes[key].shape[0] // ((3 if len(att.projections) == 1 else 1) * att.head_dim))


def linear_attention(context: Context) -> dict[str, LinearAttention]:
    return context.memo("linear-attention", lambda: find_linear_attention(context.model))


class LinearHeads(UnitKind):
    """The heads of a :class:`LinearAttention` module, pruned in place."""

    name = "linear-heads"
    kinds = ("attention-heads",)
    granularities = ("structured",)
    scorer = "unit_scores"

    def reserved(self, context: Context) -> list[nn.Module]:
        return [getattr(a.module, n) for a in linear_attention(context).values() for n in a.projections]

    def find(self, context: Context) -> list[Unit]:
        return [Unit(n, "attention-heads", a.num_heads, a.module, (n,), self.granularities, a)
                for n, a in linear_attention(context).items()]

    def limits(self, unit: Unit, policy: Policy) -> tuple[int, int]:
        return heads_limits(unit, policy)

    def score(self, unit: Unit, criterion: Any, stats: Any) -> Scores:
        a = unit.state
        return {None: criterion.unit_scores(linear_head_vectors(a), linear_head_vectors(a, True) if criterion.needs_gradients else None)}

    def prune(self, unit: Unit, keep: Keep, context: Context) -> None:
        prune_linear_heads(unit.state, keep[None])

    def saved(self, unit: Unit, state_dict: Mapping[str, torch.Tensor]) -> int:
        return saved_linear_heads(unit.state, unit.name, state_dict)

    def finish(self, units: Sequence[Unit], context: Context) -> None:
        model, was_training = context.model, context.model.training
        try:
            with torch.no_grad():
                call(model.eval(), context.example_inputs)
        except Exception as exc:
            rewritten = ", ".join(f"{u.name!r} ({type(u.module).__name__})" for u in units)
            raise PruningError(
                f"after pruning heads, attention module(s) {rewritten} no longer run: {str(exc).splitlines()[0]}; "
                "their forward must take shapes from the head-count attribute (not from the input width), or exclude them "
                "(space.rules: {match: ..., exclude: true})"
            ) from exc
        finally:
            model.train(was_training)
