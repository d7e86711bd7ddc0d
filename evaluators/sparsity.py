"""Masks on weight tensors (the arithmetic the ``unstructured`` and ``nm`` granularities use; the
weights they mask are the unit kind :mod:`evaluators.units.weights`) and what sparse weights cost.

N:M masks zero ``floor(ratio * M)`` of every M consecutive weights along the input dimension
(``in_features``, or a conv's input channels per position); global masks remove the lowest scores
across several tensors, each keeping its best weight.

:func:`sparse_state_dict_bytes` stores mostly-zero tensors as a bit mask plus their non-zero values,
the size a sparse deployment would ship; :func:`load_sparse_state_dict` reads it back.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from evaluators.units.weights import targets

SPARSE_FORMAT = "secateurs.sparse-state-dict/1"


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


def global_masks(scores: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
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


# ---------------------------------------------------------------- deployable size and effective cost


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """A boolean mask as bytes, eight to a byte, the first bit the highest (``numpy.packbits``)."""
    return torch.from_numpy(np.packbits(bits.flatten().cpu().numpy().astype(bool)))


def _unpack(packed: torch.Tensor, count: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count).astype(bool))


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
