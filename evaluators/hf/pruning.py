"""Structured pruning of Hugging Face transformers, in place: attention heads (with grouped-query
attention kept consistent), MLP neurons, and whole decoder/encoder layers.

Every function takes the model, a unit's module name and the indices to keep (or the layers to
drop), and leaves a model whose forward, ``generate`` and KV cache still work:

- heads: the rows of q/k/v and the columns of the output projection of the heads that go are cut,
  and the attention module's head-count attributes (``num_key_value_groups``,
  ``num_attention_heads``, ``all_head_size``) follow. With grouped-query attention query head ``h``
  reads key/value head ``h // (heads / kv_heads)``; one module has one ``num_key_value_groups``,
  so every key-value group that stays must keep the same number of query heads. A group with no
  query head left goes with its key/value head (whole-group pruning); equal counts per group is
  query pruning within groups.
- neurons: rows of the MLP's input linears (``gate_proj``/``up_proj``, ``intermediate.dense``) and
  columns of its output linear.
- layers: removed from the layer list; ``config.num_hidden_layers`` and per-layer config lists
  shrink, and the layers left are renumbered (``layer_idx``) so the KV cache has one slot per layer.

:func:`discover` lists the units as plain :class:`HFUnit` records. A unit is *named* after the layer
of the dense model it belongs to (``model.layers.3.self_attn`` stays that name after layer 1 was
dropped and the layer moved to position 2), so that a policy's names hold whatever order widths and
layers are removed in; its ``members`` are the modules where they are now. The dense positions of
the layers left are kept on the model (:func:`dense_indices`) until it is saved and reloaded, when
the reloaded model is a dense model of its own.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import torch
from torch import nn

from evaluators.hf.models import Family, HFModelError, family_of, layer_prefix, layers_of

HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads")
KV_COUNT_ATTRS = ("num_key_value_heads",)
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size")
PER_LAYER_CONFIG_LISTS = ("layer_types", "mlp_layer_types")
DENSE_INDICES_ATTR = "secateurs_dense_layers"  # on a model whose layers were dropped: each layer's dense position


class HFPruningError(ValueError):
    """Indices that cannot be applied to a Hugging Face model; the message names the unit and what is valid."""


@dataclasses.dataclass(frozen=True)
class HFUnit:
    """One prunable unit of a Hugging Face model.

    ``kind`` is ``heads`` (``size`` query heads of ``head_dim``, in ``kv_heads`` key-value groups),
    ``neurons`` (``size`` MLP intermediate neurons) or ``layer`` (a whole layer, ``size`` 1).
    ``name`` is its module name in the dense model; ``members`` are the linears cut along with it
    (full module names where they are now: a layer's own module name for ``layer``); ``layer`` is the
    layer's current position.

    >>> HFUnit("model.layers.0.self_attn", "heads", 8, ("model.layers.0.self_attn.q_proj",), 0, kv_heads=4).group_size
    2
    """

    name: str
    kind: str
    size: int
    members: tuple[str, ...]
    layer: int
    kv_heads: int = 0   # heads: key/value heads (== size without grouped-query attention)
    head_dim: int = 0   # heads: width of one head

    @property
    def group_size(self) -> int:
        """Query heads per key-value head (heads only; 1 without grouped-query attention)."""
        return self.size // self.kv_heads if self.kind == "heads" and self.kv_heads else 1


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """What one layer holds now: query heads, key/value heads, head width and MLP neurons."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int


def _linear(layer: nn.Module, path: str) -> nn.Linear:
    module = layer.get_submodule(path)
    if not isinstance(module, nn.Linear):
        raise HFModelError(f"expected an nn.Linear at {path!r}, but got {type(module).__name__}")
    return module


def _head_dim(family: Family, layer: nn.Module) -> int:
    attention = layer.get_submodule(family.attention)
    for attr in HEAD_DIM_ATTRS:
        value = getattr(attention, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise HFModelError(f"{type(attention).__name__} has no head width attribute ({', '.join(HEAD_DIM_ATTRS)})")


def layer_shapes(model: nn.Module) -> list[LayerShape]:
    """The shape of every layer, read from its linears (the truth, whatever the config says).

    >>> from evaluators.hf.models import build_model
    >>> m = build_model({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    ...                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50})
    >>> layer_shapes(m)[0]
    LayerShape(num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96)
    """
    family = family_of(model)
    shapes = []
    for layer in layers_of(model):
        hd = _head_dim(family, layer)
        shapes.append(LayerShape(
            num_attention_heads=_linear(layer, family.query).out_features // hd,
            num_key_value_heads=_linear(layer, family.key).out_features // hd,
            head_dim=hd,
            intermediate_size=_linear(layer, family.mlp_inputs[0]).out_features,
        ))
    return shapes


def dense_indices(model: nn.Module) -> list[int]:
    """The position each current layer had in the dense model (before :func:`drop_layers`).

    >>> from evaluators.hf.models import build_model
    >>> m = build_model({"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
    ...                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50})
    >>> drop_layers(m, [1]); dense_indices(m)
    [0, 2, 3]
    """
    n = len(layers_of(model))
    kept = getattr(model, DENSE_INDICES_ATTR, None)
    return list(kept) if isinstance(kept, (list, tuple)) and len(kept) == n else list(range(n))


def layer_names(model: nn.Module) -> list[str]:
    """Each current layer's name in the dense model (``model.layers.3``), in order."""
    prefix = layer_prefix(model)
    return [f"{prefix}.{i}" for i in dense_indices(model)]


def discover(model: nn.Module) -> list[HFUnit]:
    """Every prunable unit: per layer its attention heads, its MLP neurons and the layer itself.

    >>> from evaluators.hf.models import build_model
    >>> m = build_model({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    ...                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50}, "causal_lm")
    >>> [(u.name, u.kind, u.size) for u in discover(m)][:3]
    [('model.layers.0.self_attn', 'heads', 4), ('model.layers.0.mlp', 'neurons', 96), ('model.layers.0', 'layer', 1)]
    """
    family = family_of(model)
    prefix = layer_prefix(model)
    units = []
    for i, (name, shape) in enumerate(zip(layer_names(model), layer_shapes(model))):
        at = f"{prefix}.{i}"
        units.append(HFUnit(f"{name}.{family.attention}", "heads", shape.num_attention_heads,
                            tuple(f"{at}.{p}" for p in (family.query, family.key, family.value, family.attention_output)),
                            i, kv_heads=shape.num_key_value_heads, head_dim=shape.head_dim))
        units.append(HFUnit(f"{name}.{family.mlp}", "neurons", shape.intermediate_size,
                            tuple(f"{at}.{p}" for p in (*family.mlp_inputs, family.mlp_output)), i))
        units.append(HFUnit(name, "layer", 1, (at,), i))
    return units


def unit(model: nn.Module, name: str) -> HFUnit:
    """The unit named ``name`` (a module name :func:`discover` lists)."""
    for u in discover(model):
        if u.name == name:
            return u
    names = sorted({u.name for u in discover(model) if u.kind != "layer"})
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    raise HFPruningError(f"no prunable unit named {name!r} in this {family_of(model).name} model; units are named like {shown}")


def _layer_of(model: nn.Module, name: str, kind: str) -> tuple[HFUnit, nn.Module]:
    found = unit(model, name)
    if found.kind != kind:
        raise HFPruningError(f"{name!r} is a {found.kind} unit, not {kind}")
    return found, layers_of(model)[found.layer]


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding ``linear``'s weight rows ``rows`` and columns ``cols`` (and bias rows)."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows.to(weight.device)]
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    bias = linear.bias
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.detach()[rows.to(bias.device)] if rows is not None else bias.detach())
    new.weight.requires_grad_(linear.weight.requires_grad)
    if bias is not None:
        new.bias.requires_grad_(bias.requires_grad)
    return new.train(linear.training)


def _replace(layer: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, child, new)


def _indices(keep: Iterable[int], size: int, what: str) -> list[int]:
    kept = sorted({int(i) for i in keep})
    if not kept:
        raise HFPruningError(f"{what}: indices to keep must not be empty (0..{size - 1}); to remove a layer's attention "
                             "or MLP entirely, drop the layer (drop_layers)")
    if kept[0] < 0 or kept[-1] >= size:
        raise HFPruningError(f"{what}: indices to keep must lie in 0..{size - 1}, but got {kept}")
    return kept


def _rows(units: Sequence[int], width: int) -> torch.Tensor:
    return torch.cat([torch.arange(u * width, (u + 1) * width) for u in units])


def check_heads(u: HFUnit, keep: Iterable[int]) -> tuple[list[int], list[int]]:
    """The query heads and key/value heads that keeping query heads ``keep`` of ``u`` leaves; raises
    :class:`HFPruningError` unless every key-value group kept keeps the same number of query heads."""
    heads = _indices(keep, u.size, f"heads of {u.name}")
    g = u.group_size
    counts = [sum(1 for h in heads if h // g == group) for group in range(u.kv_heads)]
    kept_counts = {c for c in counts if c}
    if len(kept_counts) > 1:
        raise HFPruningError(
            f"heads of {u.name}: {u.size} query heads share {u.kv_heads} key-value heads ({g} per group); every group "
            f"that stays must keep the same number of query heads, but keeping {heads} leaves {counts} per group. "
            f"Keep whole groups (heads {[list(range(k * g, (k + 1) * g)) for k in range(min(2, u.kv_heads))]}...) or "
            "the same count from every group")
    return heads, [group for group, c in enumerate(counts) if c]


def valid_head_counts(u: HFUnit, mode: str = "any") -> list[int]:
    """How many query heads ``u`` can keep: ``kv_groups`` (whole key-value groups: multiples of the
    group size), ``query_heads`` (the same number from every group: multiples of ``kv_heads``), or
    ``any`` (either; also groups dropped and the rest thinned).

    >>> u = HFUnit("a", "heads", 8, (), 0, kv_heads=4, head_dim=16)
    >>> valid_head_counts(u, "kv_groups"), valid_head_counts(u, "query_heads"), valid_head_counts(u)
    ([2, 4, 6, 8], [4, 8], [1, 2, 3, 4, 6, 8])
    """
    g, kv = u.group_size, u.kv_heads
    by_mode = {
        "kv_groups": {groups * g for groups in range(1, kv + 1)},
        "query_heads": {kv * per for per in range(1, g + 1)},
        "any": {groups * per for groups in range(1, kv + 1) for per in range(1, g + 1)},
    }
    if mode not in by_mode:
        raise HFPruningError(f"mode: must be one of {', '.join(by_mode)}, but got {mode!r}")
    return sorted(by_mode[mode])


def heads_for_ratio(u: HFUnit, ratio: float, mode: str = "kv_groups") -> int:
    """How many query heads ``u`` keeps when a ``ratio`` of them is pruned; raises :class:`HFPruningError`
    listing the ratios that keep grouped-query attention whole when ``ratio`` is not one of them.

    >>> u = HFUnit("model.layers.0.self_attn", "heads", 8, (), 0, kv_heads=4, head_dim=16)
    >>> heads_for_ratio(u, 0.25), heads_for_ratio(u, 0.5, "query_heads")
    (6, 4)
    >>> heads_for_ratio(u, 0.25, "query_heads")
    Traceback (most recent call last):
    ...
    evaluators.hf.pruning.HFPruningError: heads of model.layers.0.self_attn: ratio 0.25 prunes 2 of 8 query heads, which breaks 4 key-value groups of 2 with mode query_heads; valid ratios: 0, 0.5
    """
    if not 0.0 <= ratio < 1.0:
        raise HFPruningError(f"heads of {u.name}: ratio must be in [0, 1), but got {ratio}")
    pruned = round(u.size * ratio, 6)
    valid = valid_head_counts(u, mode)
    if pruned != int(pruned) or u.size - int(pruned) not in valid:
        ratios = ", ".join(f"{(u.size - c) / u.size:g}" for c in sorted(valid, reverse=True))
        raise HFPruningError(f"heads of {u.name}: ratio {ratio:g} prunes {pruned:g} of {u.size} query heads, which breaks "
                             f"{u.kv_heads} key-value groups of {u.group_size} with mode {mode}; valid ratios: {ratios}")
    return u.size - int(pruned)


def heads_to_keep(u: HFUnit, scores: torch.Tensor, count: int, mode: str = "kv_groups") -> list[int]:
    """The ``count`` query heads of ``u`` to keep by ``scores`` (one per query head, higher = more
    important), consistent with grouped-query attention: ``kv_groups`` keeps the best whole groups
    (a group scores the sum of its heads), ``query_heads`` the best ``count / kv_heads`` heads of every group.

    >>> u = HFUnit("a", "heads", 4, (), 0, kv_heads=2, head_dim=8)
    >>> heads_to_keep(u, torch.tensor([1., 2., 5., 0.]), 2, "kv_groups"), heads_to_keep(u, torch.tensor([1., 2., 5., 0.]), 2, "query_heads")
    ([2, 3], [1, 2])
    """
    valid = valid_head_counts(u, mode)
    if count not in valid:
        raise HFPruningError(f"heads of {u.name}: cannot keep {count} of {u.size} query heads in {u.kv_heads} key-value "
                             f"groups with mode {mode}; valid counts: {valid}")
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if scores.numel() != u.size:
        raise HFPruningError(f"heads of {u.name}: need {u.size} scores (one per query head), but got {scores.numel()}")
    g = u.group_size
    grouped = scores.view(u.kv_heads, g)
    if mode == "kv_groups":
        groups = sorted(torch.argsort(grouped.sum(1), descending=True, stable=True)[: count // g].tolist())
        return [group * g + i for group in groups for i in range(g)]
    per = count // u.kv_heads
    best = torch.argsort(grouped, dim=1, descending=True, stable=True)[:, :per]
    return sorted(group * g + int(i) for group in range(u.kv_heads) for i in best[group])


def prune_heads(model: nn.Module, name: str, keep: Iterable[int]) -> None:
    """Keep only the query heads ``keep`` (indices into the current heads) of the attention ``name``;
    key/value heads whose query heads all go are removed with them. See :func:`check_heads`."""
    family = family_of(model)
    u, layer = _layer_of(model, name, "heads")
    heads, groups = check_heads(u, keep)
    hd = u.head_dim
    _replace(layer, family.query, _sliced(_linear(layer, family.query), rows=_rows(heads, hd)))
    for path in (family.key, family.value):
        _replace(layer, path, _sliced(_linear(layer, path), rows=_rows(groups, hd)))
    _replace(layer, family.attention_output, _sliced(_linear(layer, family.attention_output), cols=_rows(heads, hd)))
    attention = layer.get_submodule(family.attention)
    for attr in HEAD_COUNT_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, len(heads))
    for attr in KV_COUNT_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, len(groups))
    if isinstance(getattr(attention, "num_key_value_groups", None), int):
        attention.num_key_value_groups = len(heads) // len(groups)
    if isinstance(getattr(attention, "all_head_size", None), int):
        attention.all_head_size = len(heads) * hd


def prune_neurons(model: nn.Module, name: str, keep: Iterable[int]) -> None:
    """Keep only the MLP neurons ``keep`` (indices into the current ones) of the MLP ``name``."""
    family = family_of(model)
    u, layer = _layer_of(model, name, "neurons")
    rows = torch.as_tensor(_indices(keep, u.size, f"neurons of {name}"))
    for path in family.mlp_inputs:
        _replace(layer, path, _sliced(_linear(layer, path), rows=rows))
    _replace(layer, family.mlp_output, _sliced(_linear(layer, family.mlp_output), cols=rows))
    mlp = layer.get_submodule(family.mlp)
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = len(rows)


def drop_layers(model: nn.Module, indices: Iterable[int]) -> None:
    """Remove the layers ``indices`` (positions in the current layer list); at least one layer stays.
    ``config.num_hidden_layers`` and per-layer config lists (``layer_types``) shrink with them, and the
    layers left get ``layer_idx`` = their new position, so the KV cache and ``generate`` still work."""
    layers = layers_of(model)
    n = len(layers)
    drop = sorted({int(i) for i in indices})
    if drop and (drop[0] < 0 or drop[-1] >= n):
        raise HFPruningError(f"layers to drop must lie in 0..{n - 1}, but got {drop}")
    if len(drop) >= n:
        raise HFPruningError(f"cannot drop all {n} layers ({drop}); at least one must stay")
    if not drop:
        return
    kept = [layers[i] for i in range(n) if i not in drop]
    dense = [d for i, d in enumerate(dense_indices(model)) if i not in drop]
    config = model.config
    per_layer = _per_layer_overrides(config)
    for attr in PER_LAYER_CONFIG_LISTS:
        value = getattr(config, attr, None)
        if isinstance(value, list) and len(value) == n:
            setattr(config, attr, [v for i, v in enumerate(value) if i not in drop])
    if per_layer is not None:
        config.per_layer_config = None
    config.num_hidden_layers = len(kept)
    if per_layer is not None:
        old = [i for i in range(n) if i not in drop]
        config.per_layer_config = {new: per_layer[i] for new, i in enumerate(old) if i in per_layer}
    layers_parent, _, attr = layer_prefix(model).rpartition(".")
    setattr(model.get_submodule(layers_parent) if layers_parent else model, attr, nn.ModuleList(kept))
    for position, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    setattr(model, DENSE_INDICES_ATTR, dense)


def _per_layer_overrides(config) -> dict[int, dict] | None:
    """The per-layer overrides of a heterogeneous config (``per_layer_config``), else None."""
    if not getattr(config, "is_heterogeneous", False):
        return None
    return {int(k): dict(v) for k, v in (config.to_dict().get("per_layer_config") or {}).items()}


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model``, counting tied (shared) tensors once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
