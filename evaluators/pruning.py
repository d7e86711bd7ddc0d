"""Structured pruning through torch-pruning's dependency graph, behind one ``apply`` call.

torch-pruning finds which layers are coupled (a conv, its BatchNorm, the next layer's input
channels, residual partners); this module decides how many channels each group keeps and which.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from spaces import Policy, PrunableGroup

_WEIGHT_TYPES = [nn.modules.conv._ConvNd, nn.Linear]
_ROOT_TYPES = (nn.Conv2d, nn.Conv1d, nn.Linear)

CRITERIA: dict[str, Callable[[], tp.importance.Importance]] = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1, target_types=_WEIGHT_TYPES),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2, target_types=_WEIGHT_TYPES),
    "random": lambda: tp.importance.RandomImportance(),
}


class PruningError(ValueError):
    """A policy that cannot be applied to a model."""


def make_criterion(name: str) -> tp.importance.Importance:
    if name not in CRITERIA:
        raise PruningError(f"unknown criterion {name!r}; valid: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]()


def _flat_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat_tensors(v)]
    return []


def output_layers(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """Layers whose output is the model's output: removing their channels would change what it predicts."""
    produced: dict[nn.Module, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, _in, out: produced.__setitem__(mod, _flat_tensors(out)))
        for m in model.modules()
        if isinstance(m, _ROOT_TYPES)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = _flat_tensors(model(example_inputs))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [m for m, outs in produced.items() if any(o is y for o in outs for y in outputs)]


def _build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tuple[tp.DependencyGraph, list[nn.Module]]:
    protected = output_layers(model, example_inputs)
    was_training = model.training
    model.eval()
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    except Exception as exc:  # torch-pruning raises many kinds when tracing fails
        raise PruningError(
            f"cannot trace {type(model).__name__} with example inputs of shape "
            f"{tuple(example_inputs.shape)}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    return graph, protected


def _groups(model: nn.Module, graph: tp.DependencyGraph, protected: list[nn.Module]):
    names = {m: n for n, m in model.named_modules()}
    for group in graph.get_all_groups(ignored_layers=protected, root_module_types=_ROOT_TYPES):
        root = group[0].dep.target.module
        members = [
            names[dep.target.module]
            for dep, _ in group
            if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, _ROOT_TYPES)
        ]
        yield names[root], root, group, list(dict.fromkeys(members))


def discover_groups(model: nn.Module, example_inputs: torch.Tensor) -> list[PrunableGroup]:
    """The model's prunable groups, in module order; output layers are never included.

    >>> from evaluators.models import DigitsCNN
    >>> [g.name for g in discover_groups(DigitsCNN(), torch.zeros(1, 1, 8, 8))]
    ['features.0', 'features.3', 'features.7', 'classifier.1']
    """
    graph, protected = _build_graph(model, example_inputs)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    found = []
    for name, root, _group, members in _groups(model, graph, protected):
        kind = "linear" if isinstance(root, nn.Linear) else "conv"
        size = graph.get_out_channels(root)
        found.append(PrunableGroup(name=name, kind=kind, size=int(size), modules=tuple(members)))
    return sorted(found, key=lambda g: order[g.name])


def channels_to_keep(size: int, ratio: float, round_to: int = 1, min_channels: int = 1) -> int:
    """How many of ``size`` channels a group keeps at ``ratio``: rounded up to a multiple of
    ``round_to`` and never below ``min_channels`` (nor above ``size``).

    >>> channels_to_keep(32, 0.5), channels_to_keep(32, 0.55, round_to=8), channels_to_keep(4, 0.9)
    (16, 16, 1)
    """
    keep = max(size - math.floor(size * ratio + 1e-9), 1)
    keep = int(math.ceil(keep / round_to) * round_to)
    return min(max(keep, min_channels), size)


def apply(policy: Policy, model: nn.Module, example_inputs: torch.Tensor) -> nn.Module:
    """Prune ``model`` in place as ``policy`` says and return it (a plain, smaller ``nn.Module``).

    Every group named in ``policy.ratios`` must exist in the model; groups it does not name are kept.
    """
    graph, protected = _build_graph(model, example_inputs)
    importance = make_criterion(policy.criterion)
    available = [name for name, *_ in _groups(model, graph, protected)]
    unknown = sorted(set(policy.ratios) - set(available))
    if unknown:  # checked before anything is pruned: the model is left untouched
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        raise PruningError(
            f"policy names group(s) {unknown} that this model does not have; "
            f"available groups: {', '.join(sorted(available, key=order.__getitem__))}"
        )
    pending = dict(policy.ratios)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(policy.seed)
        for name, root, group, _members in list(_groups(model, graph, protected)):
            ratio = pending.pop(name, 0.0)
            if ratio <= 0.0:
                continue
            size = graph.get_out_channels(root)
            keep = channels_to_keep(size, ratio, policy.round_to, policy.min_channels)
            if keep >= size:
                continue
            with torch.no_grad():
                scores = importance(group)
            if scores is None:
                raise PruningError(f"criterion {policy.criterion!r} gives no score for group {name!r}")
            drop = torch.argsort(scores)[: size - keep].tolist()
            group.prune(idxs=drop)
    return model
