"""Heads of ``nn.MultiheadAttention`` (torch-pruning skips them silently): the unit kind
``attention-heads`` for that module type (:mod:`evaluators.units.linear_heads` has attention written
with ``nn.Linear`` projections).

``nn.MultiheadAttention`` ties its inner width to its input width (``embed_dim == num_heads *
head_dim`` for the query), so a module with fewer heads but the same ``embed_dim`` cannot be an
``nn.MultiheadAttention``. Pruned heads are therefore replaced by :class:`PrunedMultiheadAttention`:
a drop-in module with the same call signature and outputs, whose projections are plain
``nn.Linear`` layers (``in_proj`` or ``q_proj``/``k_proj``/``v_proj``, and ``out_proj``) of
``kept_heads * head_dim`` inner width. Its state dict is plain tensors; ``torch.export`` and ONNX
exports of a model holding it need nothing from secateurs. Keeping ``nn.MultiheadAttention`` instead
would need the residual width to shrink with the heads in every layer at once (the same head
positions everywhere), or zeroed heads (no speed-up): both worse trade-offs.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evaluators.prune_base import PruningError
from evaluators.units.base import Context, Keep, Scores, Unit, UnitKind, detached, replace_module
from spaces import Policy


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention with ``num_heads`` heads of ``head_dim`` each over ``embed_dim``-wide
    inputs (``num_heads * head_dim`` may be less than ``embed_dim``). Same forward signature and
    return value as ``nn.MultiheadAttention``.

    >>> mha = nn.MultiheadAttention(8, 4, batch_first=True)
    >>> small = PrunedMultiheadAttention.from_attention(mha, keep=[0, 2])
    >>> small.num_heads, small.head_dim, small.in_proj.weight.shape
    (2, 2, torch.Size([12, 8]))
    >>> small(torch.zeros(1, 3, 8), torch.zeros(1, 3, 8), torch.zeros(1, 3, 8))[0].shape
    torch.Size([1, 3, 8])
    """

    is_pruned_attention = True
    _qkv_same_embed_dim = False  # keeps nn.TransformerEncoderLayer off its fused fast path

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, kdim: int | None = None, vdim: int | None = None,
                 bias: bool = True, dropout: float = 0.0, batch_first: bool = False, kept_heads: Sequence[int] = ()) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.kept_heads = tuple(kept_heads) or tuple(range(num_heads))  # positions in the dense module
        if self.kdim == embed_dim and self.vdim == embed_dim:
            self.in_proj = nn.Linear(embed_dim, 3 * inner, bias=bias)
        else:
            self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
            self.k_proj = nn.Linear(self.kdim, inner, bias=bias)
            self.v_proj = nn.Linear(self.vdim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    @property
    def in_proj_weight(self) -> torch.Tensor | None:
        return self.in_proj.weight if hasattr(self, "in_proj") else None

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.in_proj.bias if hasattr(self, "in_proj") else None

    @classmethod
    def from_attention(cls, mha: nn.Module, keep: Sequence[int]) -> PrunedMultiheadAttention:
        """A copy of ``mha`` (an ``nn.MultiheadAttention`` or a pruned one) with only the heads ``keep``."""
        keep = sorted(int(h) for h in keep)
        if not keep or keep[-1] >= mha.num_heads or keep[0] < 0:
            raise PruningError(f"heads to keep must be a non-empty subset of 0..{mha.num_heads - 1}, but got {keep}")
        hd = mha.head_dim
        bias = (mha.in_proj_bias if getattr(mha, "in_proj_bias", None) is not None else
                getattr(getattr(mha, "q_proj", None), "bias", None)) is not None
        new = cls(mha.embed_dim, len(keep), hd, kdim=mha.kdim, vdim=mha.vdim, bias=bias, dropout=mha.dropout,
                  batch_first=mha.batch_first, kept_heads=[getattr(mha, "kept_heads", range(mha.num_heads))[h] for h in keep])
        inner_old = mha.num_heads * hd
        rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in keep])
        weights, biases = _qkv(mha, inner_old)
        with torch.no_grad():
            if hasattr(new, "in_proj"):
                new.in_proj.weight.copy_(torch.cat([w[rows] for w in weights]))
                if bias:
                    new.in_proj.bias.copy_(torch.cat([b[rows] for b in biases]))
            else:
                for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                    proj.weight.copy_(w[rows])
                    if bias:
                        proj.bias.copy_(b[rows])
            new.out_proj.weight.copy_(mha.out_proj.weight[:, rows])
            if bias:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        self_attention = query is key and key is value
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) if t.dim() == 3 else t for t in (query, key, value))
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        tgt, batch, _ = query.shape
        src = key.shape[0]
        if hasattr(self, "in_proj") and self_attention:  # self-attention: one projection
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        elif hasattr(self, "in_proj"):
            w_q, w_k, w_v = self.in_proj.weight.chunk(3)
            b_q, b_k, b_v = self.in_proj.bias.chunk(3) if self.in_proj.bias is not None else (None, None, None)
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        else:
            q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)

        def heads(t: torch.Tensor, length: int) -> torch.Tensor:  # (L, N, H*hd) -> (N, H, L, hd)
            return t.reshape(length, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = heads(q, tgt), heads(k, src), heads(v, src)
        mask = self._mask(attn_mask, key_padding_mask, q.dtype, batch, tgt, src)
        dropout = self.dropout if self.training else 0.0
        causal = is_causal and mask is None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if causal:
                scores = scores.masked_fill(torch.ones(tgt, src, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(-1), p=dropout, training=dropout > 0)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt, batch, self.num_heads * self.head_dim))
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if weights is not None:
            weights = weights.mean(1) if average_attn_weights else weights
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    def _mask(self, attn_mask, key_padding_mask, dtype, batch, tgt, src):
        """One additive float mask of shape broadcastable to (N, H, L, S), or None."""
        mask = None
        if attn_mask is not None:
            m = attn_mask
            if m.dim() == 3:  # (N * heads, L, S), heads as in the dense module: keep the rows of the kept heads
                m = m.view(batch, -1, tgt, src)
                if m.shape[1] != self.num_heads:
                    m = m[:, list(self.kept_heads)]
            mask = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.to(dtype)
        if key_padding_mask is not None:
            kp = key_padding_mask.view(batch, 1, 1, src)
            kp = torch.zeros(kp.shape, dtype=dtype, device=kp.device).masked_fill(kp, float("-inf")) if kp.dtype == torch.bool else kp.to(dtype)
            mask = kp if mask is None else mask + kp
        return mask


def _qkv(mha: nn.Module, inner: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """The query, key and value projection weights and biases of an attention module."""
    if isinstance(mha, PrunedMultiheadAttention):
        if hasattr(mha, "in_proj"):
            b = mha.in_proj.bias
            return list(mha.in_proj.weight.chunk(3)), list(b.chunk(3)) if b is not None else [None] * 3
        projs = (mha.q_proj, mha.k_proj, mha.v_proj)
        return [p.weight for p in projs], [p.bias for p in projs]
    if mha.in_proj_weight is not None:
        weights = list(mha.in_proj_weight.chunk(3))
    else:
        weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
    b = mha.in_proj_bias
    return weights, list(b.chunk(3)) if b is not None else [None] * 3


def check_prunable(mha: nn.Module, name: str) -> None:
    """Raise a :class:`PruningError` unless this module can prune the heads of ``mha``."""
    if not isinstance(mha, (nn.MultiheadAttention, PrunedMultiheadAttention)):
        raise PruningError(f"module {name!r} ({type(mha).__name__}) has no head pruner; exclude it, or register a "
                           "pruner for its type (evaluators.pruning.register_pruner)")
    if getattr(mha, "bias_k", None) is not None or getattr(mha, "add_zero_attn", False):
        raise PruningError(f"module {name!r}: nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported "
                           "by the head pruner; exclude it (space.rules: {match: ..., exclude: true})")


def head_vectors(mha: nn.Module, grad: bool = False) -> torch.Tensor:
    """One row per head: its query/key/value projection rows and its ``out_proj`` columns (or their gradients)."""
    hd, heads = mha.head_dim, mha.num_heads

    def value(t: torch.Tensor) -> torch.Tensor:
        return detached(t, grad)

    if isinstance(mha, PrunedMultiheadAttention):
        if hasattr(mha, "in_proj"):
            weights = list(value(mha.in_proj.weight).chunk(3))
        else:
            weights = [value(p.weight) for p in (mha.q_proj, mha.k_proj, mha.v_proj)]
    elif mha.in_proj_weight is not None:
        weights = list(value(mha.in_proj_weight).chunk(3))
    else:
        weights = [value(w) for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)]
    parts = [w.reshape(heads, hd * w.shape[1]) for w in weights]
    out = value(mha.out_proj.weight)  # (embed, heads * hd)
    parts.append(out.reshape(out.shape[0], heads, hd).transpose(0, 1).reshape(heads, -1))
    return torch.cat(parts, dim=1)


ATTENTION_TYPES = (nn.MultiheadAttention, PrunedMultiheadAttention)


def heads_limits(unit: Unit, policy: Policy) -> tuple[int, int]:
    """Attention keeps at least one head (or its group minimum); head counts are not rounded."""
    return min(policy.group_min_channels.get(unit.name, 1), unit.size), 1


class MultiheadAttentionHeads(UnitKind):
    """The heads of an ``nn.MultiheadAttention``, replaced by a :class:`PrunedMultiheadAttention` with fewer."""

    name = "mha"
    kinds = ("attention-heads",)
    granularities = ("structured",)
    scorer = "unit_scores"

    def find(self, context: Context) -> list[Unit]:
        return [Unit(n, "attention-heads", m.num_heads, m, (n,), self.granularities) for n, m in context.model.named_modules()
                if isinstance(m, ATTENTION_TYPES) and m.num_heads > 1]

    def check(self, unit: Unit, context: Context) -> None:
        check_prunable(unit.module, unit.name)

    def limits(self, unit: Unit, policy: Policy) -> tuple[int, int]:
        return heads_limits(unit, policy)

    def score(self, unit: Unit, criterion: Any, stats: Any) -> Scores:
        m = unit.module
        return {None: criterion.unit_scores(head_vectors(m), head_vectors(m, True) if criterion.needs_gradients else None)}

    def prune(self, unit: Unit, keep: Keep, context: Context) -> None:
        replace_module(context.model, unit.name, PrunedMultiheadAttention.from_attention(unit.module, keep[None]))

    def saved(self, unit: Unit, state_dict: Mapping[str, torch.Tensor]) -> int:
        hd = unit.module.head_dim
        for key, parts in ((f"{unit.name}.in_proj.weight", 3), (f"{unit.name}.q_proj.weight", 1)):
            if key in state_dict:
                return int(state_dict[key].shape[0] // (parts * hd))
        return unit.size
