"""Pieces every pruning granularity shares: the error type, channel arithmetic, output-layer
detection, the report of what was pruned, and the check that a pruned model still runs."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from evaluators.batches import Inputs, call

# Layers whose outputs a structured group removes (and so must not feed the model's output).
STRUCTURED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.RNNBase)


class PruningError(ValueError):
    """A policy that cannot be applied to a model; the message names the group or module and what to do."""


def flat_tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor inside nested tuples, lists and dicts, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flat_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flat_tensors(v)]
    return []


def output_layers(model: nn.Module, example_inputs: Inputs) -> list[nn.Module]:
    """Layers whose output is the model's output: removing their channels would change what it predicts.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> output_layers(model, torch.zeros(1, 4)) == [model[2]]
    True
    """
    produced: dict[nn.Module, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, _in, out: produced.__setitem__(mod, flat_tensors(out)))
        for m in model.modules()
        if isinstance(m, STRUCTURED_TYPES)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = flat_tensors(call(model, example_inputs))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [m for m, outs in produced.items() if any(o is y for o in outs for y in outputs)]


def channels_to_keep(size: int, ratio: float, round_to: int = 1, min_channels: int = 1) -> int:
    """How many of ``size`` channels a group keeps at ``ratio``: rounded up to a multiple of
    ``round_to`` and never below ``min_channels`` (nor above ``size``).

    >>> channels_to_keep(32, 0.5), channels_to_keep(32, 0.55, round_to=8), channels_to_keep(4, 0.9)
    (16, 16, 1)
    """
    keep = max(size - math.floor(size * ratio + 1e-9), 1)
    keep = int(math.ceil(keep / round_to) * round_to)
    return min(max(keep, min_channels), size)


@dataclasses.dataclass
class PruneReport:
    """What :func:`evaluators.pruning.prune` did: per group its size and how many units it removed
    (channels, heads, hidden units, or weights for unstructured/N:M), and the pruned model.

    ``sparsity`` is the fraction of the targeted units removed (for unstructured/N:M: the fraction
    of the targeted weights that are now zero).

    >>> r = PruneReport("unstructured", {"fc.weight": (100, 30)}, model=None)
    >>> r.sparsity, r.kept("fc.weight")
    (0.3, 70)
    """

    granularity: str
    groups: dict[str, tuple[int, int]]
    model: nn.Module | None = None

    @property
    def sparsity(self) -> float:
        total = sum(size for size, _ in self.groups.values())
        return sum(removed for _, removed in self.groups.values()) / total if total else 0.0

    def kept(self, group: str) -> int:
        size, removed = self.groups[group]
        return size - removed


def check_runs(model: nn.Module, example_inputs: Inputs, what: str) -> None:
    """Run ``model`` once; if a module fails, raise a :class:`PruningError` naming it."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[nn.Module] = []
    failed: list[nn.Module] = []

    def enter(module, _args):
        stack.append(module)

    def leave(module, _args, _out):
        if stack and stack[-1] is module:
            stack.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules()]
    hooks += [m.register_forward_hook(leave) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call(model, example_inputs)
    except Exception as exc:  # any failure inside a user's model
        failed = [m for m in stack if m is not model]
        where = failed[-1] if failed else model
        raise PruningError(
            f"after {what}, module {names.get(where) or type(model).__name__!r} ({type(where).__name__}) fails on the "
            f"example inputs: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Its weights were not "
            "pruned with their inputs: exclude the groups that feed it (space.rules: {match: ..., exclude: true}) or "
            "register a pruner for its type (evaluators.pruning.register_pruner)"
        ) from exc
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
