"""Structured pruning: conv filters and linear neurons (through torch-pruning's dependency graph,
which keeps coupled layers consistent: BatchNorms, next-layer inputs, residual partners, depthwise
convs, concatenations), recurrent hidden units (:mod:`evaluators.rnn_pruning`, a pruner registered
with the same graph) and attention heads (:mod:`evaluators.attention_pruning`, a local rewrite).

Every unit is scored on the model as given, before anything is removed; then the graph's groups are
pruned, then the heads. Groups named in ``policy.global_groups`` share one removal budget, spent on
the units with the lowest mean-normalised scores across them.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Mapping

import torch
import torch_pruning as tp
from torch import nn

from evaluators import attention_pruning, rnn_pruning
from evaluators.criteria import Criterion, Stats, check_applies
from evaluators.prune_base import PruningError, PruneReport, channels_to_keep, output_layers
from spaces import Policy, PrunableGroup

CHANNEL_ROOTS = (nn.Conv1d, nn.Conv2d, nn.Linear)
CUSTOM_PRUNERS: dict[type, tp.pruner.function.BasePruningFunc] = {}  # evaluators.pruning.register_pruner
ATTENTION_TYPES = (nn.MultiheadAttention, attention_pruning.PrunedMultiheadAttention)


@dataclasses.dataclass
class Unit:
    """A structured group of the current model: what torch-pruning (or a local rewrite) prunes together."""

    name: str
    kind: str
    size: int
    module: nn.Module
    group: Any = None  # the torch-pruning group (conv/linear/rnn-hidden)
    members: tuple[str, ...] = ()
    head_multiple: int = 1  # coupled attention modules need the width to stay a multiple of their heads
    unwrapped: tuple[str, ...] = ()  # parameters the group reaches that no pruner handles
    attention: attention_pruning.LinearAttention | None = None  # heads of attention written with nn.Linear

    def to_group(self) -> PrunableGroup:
        return PrunableGroup(self.name, self.kind, self.size, self.members or (self.name,))


class StructuredGraph:
    """torch-pruning's dependency graph of ``model`` with this project's recurrent pruner registered.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> [u.name for u in StructuredGraph(model, torch.zeros(1, 4)).units(("linear",))]
    ['0']
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor) -> None:
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self.rnn_pruner = rnn_pruning.RNNPruner()
        pruners = {cls: self.rnn_pruner for cls in rnn_pruning.RNN_TYPES}
        pruners.update(CUSTOM_PRUNERS)
        was_training = model.training
        model.eval()
        try:
            self.protected = output_layers(model, example_inputs)
            with warnings.catch_warnings():  # torch-pruning warns about every model-level parameter (positions)
                warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
                self.graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, customized_pruners=pruners)
        except Exception as exc:  # torch-pruning raises many kinds when tracing fails
            shape = tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else type(example_inputs).__name__
            raise PruningError(
                f"cannot trace {type(model).__name__} with example inputs of shape {shape}: {exc}; structured pruning needs "
                "a model torch-pruning can trace (granularity unstructured or nm does not)"
            ) from exc
        finally:
            model.train(was_training)
        self._param_names = {id(p): n for n, p in model.named_parameters()}

    def units(self, kinds: tuple[str, ...]) -> list[Unit]:
        """The model's structured groups of the given kinds, in module order (output layers left out)."""
        roots = CHANNEL_ROOTS + (rnn_pruning.RNN_TYPES if "rnn-hidden" in kinds else ())
        linear_attention = attention_pruning.find_linear_attention(self.model)
        head_rows = {id(getattr(a.module, n)) for a in linear_attention.values() for n in a.projections}
        found: list[Unit] = []
        for group in self.graph.get_all_groups(ignored_layers=self.protected, root_module_types=roots):
            root = group[0].dep.target.module
            if id(root) in head_rows:  # q/k/v outputs come in heads: pruned as heads, never as free channels
                continue
            is_rnn = isinstance(root, rnn_pruning.RNN_TYPES)
            kind = "rnn-hidden" if is_rnn else ("linear" if isinstance(root, nn.Linear) else "conv")
            if kind not in kinds:
                continue
            members, multiple, unwrapped = [], 1, []
            for dep, _ in group:
                module = dep.target.module
                if self.graph.is_out_channel_pruning_fn(dep.handler) and isinstance(module, CHANNEL_ROOTS + rnn_pruning.RNN_TYPES):
                    members.append(self.names[module])
                if isinstance(module, nn.MultiheadAttention):
                    multiple = math.lcm(multiple, module.num_heads)
                if isinstance(module, nn.Parameter):  # a parameter used outside any known layer
                    pname = self._param_names.get(id(module), "?")
                    owner = self.model.get_submodule(pname.rpartition(".")[0])
                    if not any(True for _ in owner.children()):  # a custom layer: its weights would not follow
                        unwrapped.append(f"{pname} of module {pname.rpartition('.')[0]!r} ({type(owner).__name__})")
            size = root.hidden_size if is_rnn else self.graph.get_out_channels(root)
            found.append(Unit(self.names[root], kind, int(size), root, group, tuple(dict.fromkeys(members)), multiple,
                              tuple(dict.fromkeys(unwrapped))))
        if "attention-heads" in kinds:
            found += [Unit(n, "attention-heads", m.num_heads, m) for n, m in self.model.named_modules()
                      if isinstance(m, ATTENTION_TYPES) and m.num_heads > 1]
            found += [Unit(n, "attention-heads", a.num_heads, a.module, attention=a) for n, a in linear_attention.items()]
        order = {n: i for i, n in enumerate(self.names.values())}
        return sorted(found, key=lambda u: order[u.name])


def _check(unit: Unit, criterion: Criterion | None) -> None:
    if criterion is not None:
        check_applies(criterion, unit.kind, unit.name)
    if unit.unwrapped:
        raise PruningError(
            f"group {unit.name!r} reaches parameter {'; '.join(unit.unwrapped)}, which no structured pruner handles "
            f"(its weights would not follow the pruned channels); exclude the group (space.rules: {{match: {unit.name!r}, "
            "exclude: true}) or register a pruner for that module type (evaluators.pruning.register_pruner)"
        )
    if unit.kind == "rnn-hidden":
        rnn_pruning.check_prunable(unit.module, unit.name)
    if unit.kind == "attention-heads" and unit.attention is None:
        attention_pruning.check_prunable(unit.module, unit.name)


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.detach().float().flatten()
    mean = scores.mean()
    return scores / mean if mean > 0 else scores


def _score(unit: Unit, criterion: Criterion, importance: Any) -> dict[Any, torch.Tensor]:
    """Scores per unit of the group: one tensor (key None), or one per (layer, direction) of a recurrent module."""
    if unit.kind in ("conv", "linear"):
        with torch.no_grad():
            scores = importance(unit.group)
        if scores is None:
            extra = " (it has no BatchNorm)" if criterion.name == "bn_scale" else ""
            raise PruningError(f"criterion {criterion.name!r} gives no score for group {unit.name!r}{extra}; use another criterion")
        return {None: scores}
    grads = criterion.needs_gradients
    if unit.kind == "attention-heads" and unit.attention is not None:
        a = unit.attention
        return {None: criterion.unit_scores(attention_pruning.linear_head_vectors(a), attention_pruning.linear_head_vectors(a, True) if grads else None)}
    if unit.kind == "attention-heads":
        m = unit.module
        return {None: criterion.unit_scores(attention_pruning.head_vectors(m), attention_pruning.head_vectors(m, True) if grads else None)}
    rnn = unit.module
    return {(l, d): criterion.unit_scores(rnn_pruning.unit_vectors(rnn, l, d),
                                          rnn_pruning.unit_vectors(rnn, l, d, True) if grads else None)
            for l in range(rnn.num_layers) for d in range(rnn_pruning.directions(rnn))}


def ranked(scores: Mapping[Any, torch.Tensor]) -> torch.Tensor:
    """One group's unit scores as the global ranking compares them: each score tensor divided by its
    mean and sorted ascending, averaged over the tensors (one per layer and direction of an RNN)."""
    return torch.stack([_normalised(s).sort().values for s in scores.values()]).mean(0)


def rankings(model: nn.Module, example_inputs: torch.Tensor, criterion: Criterion, kinds: tuple[str, ...],
             names: list[str], min_channels: int = 1, group_min_channels: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """For each group in ``names``: the ascending scores of the units a global ranking may remove
    (every unit but the minimum it must keep). Data-free criteria only; the model is not changed."""
    units = {u.name: u for u in StructuredGraph(model, example_inputs).units(kinds)}
    missing = [n for n in names if n not in units]
    if missing:
        raise PruningError(f"no structured group(s) {missing} in this model; available groups: {', '.join(units)}")
    importance = criterion.channel_importance(None) if any(units[n].kind in ("conv", "linear") for n in names) else None
    floor = Policy(criterion=criterion.name, ratios={}, min_channels=min_channels, group_min_channels=dict(group_min_channels or {}))
    out = {}
    for n in names:
        _check(units[n], criterion)
        keep_at_least = max(_limits(units[n], floor)[0], 1)
        out[n] = ranked(_score(units[n], criterion, importance))[: units[n].size - keep_at_least]
    return out


def _limits(unit: Unit, policy: Policy) -> tuple[int, int]:
    """(minimum units kept, multiple the kept count is rounded up to) for a group."""
    if unit.kind == "attention-heads":
        return min(policy.group_min_channels.get(unit.name, 1), unit.size), 1
    return min(policy.group_min_channels.get(unit.name, policy.min_channels), unit.size), math.lcm(policy.round_to, unit.head_multiple)


def _round(unit: Unit, policy: Policy, keep: int) -> int:
    floor, multiple = _limits(unit, policy)
    keep = int(math.ceil(keep / multiple) * multiple)
    return min(max(keep, floor, 1), unit.size)


def allocate(units: list[Unit], policy: Policy, scores: Mapping[str, dict[Any, torch.Tensor]]) -> dict[str, int]:
    """How many units each named group keeps: per group by its ratio, or (``global_groups``) by one
    ranking across the pooled groups that removes as many units in total as their ratios ask."""
    keep: dict[str, int] = {}
    pooled = [u for u in units if u.name in policy.global_groups]
    for u in units:
        if u.name in policy.ratios and u not in pooled:
            floor, multiple = _limits(u, policy)
            keep[u.name] = channels_to_keep(u.size, policy.ratios[u.name], multiple, floor)
    if pooled:
        budget = sum(math.floor(u.size * policy.ratios[u.name] + 1e-9) for u in pooled)
        candidates = []
        for index, u in enumerate(pooled):
            floor, _ = _limits(u, policy)
            candidates += [(float(v), index, i) for i, v in enumerate(ranked(scores[u.name])[: u.size - max(floor, 1)])]
        removed = [0] * len(pooled)
        for _, index, _ in sorted(candidates)[:budget]:
            removed[index] += 1
        for u, n in zip(pooled, removed):
            keep[u.name] = _round(u, policy, u.size - n)
    return keep


def prune(model: nn.Module, example_inputs: torch.Tensor, policy: Policy, criterion: Criterion | None,
          stats: Callable[[], Stats | None],
          *, kinds: tuple[str, ...], shapes: Mapping[str, torch.Tensor] | None = None) -> PruneReport:
    """Prune ``model`` in place as ``policy`` says. With ``shapes`` (a saved pruned state dict) the kept
    counts are read from it and the criterion is not used (the weights are about to be overwritten)."""
    graph = StructuredGraph(model, example_inputs)
    units = graph.units(kinds)
    by_name = {u.name: u for u in units}
    unknown = sorted(set(policy.ratios) - set(by_name))
    if unknown:  # checked before anything is pruned: the model is left untouched
        others = [u.name for u in graph.units(("conv", "linear", "attention-heads", "rnn-hidden")) if u.name in unknown]
        hint = f" ({', '.join(others)} can be pruned with granularity 'structured')" if others else ""
        raise PruningError(
            f"policy names group(s) {unknown} that this model does not have for granularity {policy.granularity!r}{hint}; "
            f"available groups: {', '.join(by_name)}"
        )
    named = [u for u in units if u.name in policy.ratios]
    for u in named:
        _check(u, None if shapes is not None else criterion)
    if shapes is not None:
        scores = {u.name: {None: torch.zeros(u.size)} if u.kind != "rnn-hidden" else
                  {(l, d): torch.zeros(u.size) for l in range(u.module.num_layers) for d in range(rnn_pruning.directions(u.module))}
                  for u in named}
        keep = {u.name: _saved_keep(u, shapes) for u in named if u.kind != "attention-heads"}
    else:
        measured = stats()
        importance = criterion.channel_importance(measured) if any(u.kind in ("conv", "linear") for u in named) else None
        scores = {u.name: _score(u, criterion, importance) for u in named}
        keep = allocate(units, policy, scores)
    for u in named:
        if u.kind in ("conv", "linear", "rnn-hidden") and keep[u.name] < u.size:
            _prune_group(graph, u, keep[u.name], scores[u.name])
    rewritten = []
    for u in named:
        if u.kind == "attention-heads":
            if shapes is not None:
                keep[u.name] = _saved_heads(u, shapes)
            if keep[u.name] < u.size:
                order = torch.argsort(scores[u.name][None].float(), stable=True)
                kept = sorted(order[u.size - keep[u.name]:].tolist())
                if u.attention is not None:
                    attention_pruning.prune_linear_heads(u.attention, kept)
                    rewritten.append(f"{u.name!r} ({type(u.module).__name__})")
                else:
                    attention_pruning.replace_module(model, u.name, attention_pruning.PrunedMultiheadAttention.from_attention(u.module, kept))
    if rewritten:
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval()(example_inputs)
        except Exception as exc:
            raise PruningError(
                f"after pruning heads, attention module(s) {', '.join(rewritten)} no longer run: {str(exc).splitlines()[0]}; "
                "their forward must take shapes from the head-count attribute (not from the input width), or exclude them "
                "(space.rules: {match: ..., exclude: true})"
            ) from exc
        finally:
            model.train(was_training)
    return PruneReport(policy.granularity, {u.name: (u.size, u.size - keep[u.name]) for u in named}, model)


def _prune_group(graph: StructuredGraph, unit: Unit, keep: int, scores: dict[Any, torch.Tensor]) -> None:
    drop_count = unit.size - keep
    if unit.kind != "rnn-hidden":
        drop = torch.argsort(scores[None].float(), stable=True)[:drop_count].tolist()
        unit.group.prune(idxs=drop)
        return
    plan = {k: sorted(torch.argsort(s.float(), stable=True)[:drop_count].tolist()) for k, s in scores.items()}
    rnn = unit.module
    hidden, last = rnn.hidden_size, rnn.num_layers - 1
    graph.rnn_pruner.plans[rnn] = plan
    unit.group.prune(idxs=[d * hidden + j for d in range(rnn_pruning.directions(rnn)) for j in plan[(last, d)]])


def _saved_keep(unit: Unit, shapes: Mapping[str, torch.Tensor]) -> int:
    key = f"{unit.name}.weight_hh_l0" if unit.kind == "rnn-hidden" else f"{unit.name}.weight"
    if key not in shapes:
        raise PruningError(f"the saved state dict has no {key!r}: it does not belong to this model and policy")
    return int(shapes[key].shape[1] if unit.kind == "rnn-hidden" else shapes[key].shape[0])


def _saved_heads(unit: Unit, shapes: Mapping[str, torch.Tensor]) -> int:
    if unit.attention is not None:
        return attention_pruning.saved_linear_heads(unit.attention, unit.name, shapes)
    hd = unit.module.head_dim
    for key, parts in ((f"{unit.name}.in_proj.weight", 3), (f"{unit.name}.q_proj.weight", 1)):
        if key in shapes:
            return int(shapes[key].shape[0] // (parts * hd))
    return unit.size
