"""Head pruning of ``nn.MultiheadAttention`` (torch-pruning skips it silently), and of attention
written with ``nn.Linear`` projections (:class:`LinearAttention`: fused or separate q/k/v), which is
pruned in place: its linears shrink and its head-count attribute drops, so it stays the user's module.

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

import dataclasses
import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evaluators.prune_base import PruningError


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
        if not grad:
            return t.detach()
        return t.grad.detach() if t.grad is not None else torch.zeros_like(t)

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


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# --------------------------------------------------------------------- attention written with nn.Linear
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
        if isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention)):
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
        if not grad:
            return t.detach()
        return t.grad.detach() if t.grad is not None else torch.zeros_like(t)

    if len(att.projections) == 1:
        weights = list(value(getattr(att.module, att.projections[0]).weight).chunk(3))
    else:
        weights = [value(getattr(att.module, n).weight) for n in att.projections]
    parts = [w.reshape(heads, hd * w.shape[1]) for w in weights]
    out = value(getattr(att.module, att.out).weight)
    parts.append(out.reshape(out.shape[0], heads, hd).transpose(0, 1).reshape(heads, -1))
    return torch.cat(parts, dim=1)


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, cols] if cols is not None else weight
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach()[rows] if rows is not None else linear.bias.detach())
    return new.train(linear.training)


def prune_linear_heads(att: LinearAttention, keep: Sequence[int]) -> None:
    """Keep only the heads ``keep`` of ``att`` (in place): its projections shrink, its head count drops."""
    keep = sorted(int(h) for h in keep)
    heads, hd, inner = att.num_heads, att.head_dim, att.inner
    if not keep or keep[0] < 0 or keep[-1] >= heads:
        raise PruningError(f"heads to keep must be a non-empty subset of 0..{heads - 1}, but got {keep}")
    rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in keep])
    m = att.module
    if len(att.projections) == 1:
        setattr(m, att.projections[0], _sliced(getattr(m, att.projections[0]), rows=torch.cat([rows + i * inner for i in range(3)])))
    else:
        for n in att.projections:
            setattr(m, n, _sliced(getattr(m, n), rows=rows))
    setattr(m, att.out, _sliced(getattr(m, att.out), cols=rows))
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
