"""Reference policies every search evaluates first (MLflow ``secateurs.kind=baseline``), so that each
search shows what it gained over the hand-made ways to prune:

- ``uniform``: every searched group at the same ratio, with the space's first criterion;
- ``global_magnitude``: one magnitude ranking (l1) across all searched units removes that share of
  them in total (structured groups' scores are divided by their mean, as ``scope: global`` does);
- ``lamp`` (unstructured): one global ranking of LAMP scores (Lee et al., 2021);
- ``erk`` (unstructured): Erdős–Rényi-kernel densities, 1 - ratio ∝ (sum of a weight's dims) /
  (product of its dims) (Evci et al., 2020).

Each is turned into per-group ratios and then projected onto the search space (clipped to each
group's range, snapped to its step; tied groups get their size-weighted mean), so a baseline is an
ordinary point of the space: it is recorded, exported and resumed like any trial, and the sampler
learns from it. The global rankings honour each group's range while they are drawn.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from evaluators.pruning import rankings
from spaces import SearchSpace
from spaces.space import RATIO_PREFIX, Dimension

BASELINES = ("uniform", "global_magnitude", "lamp", "erk")
_UNSTRUCTURED_ONLY = ("lamp", "erk")


def default_kinds(granularity: str) -> list[str]:
    """The baselines a search runs when ``search.baselines`` is not given."""
    if granularity == "unstructured":
        return list(BASELINES)
    if granularity == "nm":
        return ["uniform"]  # N:M masks are chosen per block: no global allocation applies
    return ["uniform", "global_magnitude"]


def check_kinds(kinds: Sequence[str], granularity: str) -> None:
    """Raise ``ValueError`` naming the first baseline that does not exist or cannot apply."""
    for kind in kinds:
        if kind not in BASELINES:
            raise ValueError(f"baselines: unknown baseline {kind!r}; valid: {', '.join(BASELINES)}")
        if kind in _UNSTRUCTURED_ONLY and granularity != "unstructured":
            raise ValueError(f"baselines: {kind!r} allocates single-weight sparsity and needs granularity unstructured "
                             f"first in space.granularity, but it is {granularity!r}")
        if kind == "global_magnitude" and granularity == "nm":
            raise ValueError("baselines: 'global_magnitude' does not apply to granularity nm (N:M masks are chosen per block)")


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A named policy evaluated before the sampler's, as the search's parameters (``ratio.<dim>``,
    ``criterion``, ...): a reference (``kind`` baseline) or one of the search's own seeds (``seed``)."""

    name: str
    point: dict[str, Any]
    kind: str = "baseline"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "point": dict(self.point)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Baseline:
        return cls(str(data["name"]), dict(data["point"]), str(data.get("kind", "baseline")))


def snap(value: float, low: float, high: float, step: float | None) -> float:
    """``value`` clipped to [low, high] and rounded to the nearest step.

    >>> snap(0.43, 0.0, 0.7, 0.05), snap(0.9, 0.0, 0.7, 0.05), snap(0.123, 0.1, 0.5, None)
    (0.45, 0.7, 0.123)
    """
    value = min(max(value, low), high)
    if step:
        value = low + round((value - low) / step) * step
    return round(min(value, high), 10)


def _searched(space: SearchSpace, granularity: str) -> list[Dimension]:
    return [d for d in space.dimensions(granularity) if d.range is not None]


def space_point(space: SearchSpace, granularity: str, member_ratio: Mapping[str, float], criterion: str,
                sizes: Mapping[str, int]) -> dict[str, Any]:
    """Per-group ratios as parameters of ``space``: each searched dimension takes its members'
    size-weighted ratio, clipped to its range and snapped to its step."""
    point: dict[str, Any] = {}
    for d in _searched(space, granularity):
        total = sum(sizes[m] for m in d.members)
        value = sum(member_ratio[m] * sizes[m] for m in d.members) / total
        point[RATIO_PREFIX + d.group] = snap(value, d.range.low, d.range.high, d.range.step)
    if len(space.config.criteria) > 1:
        point["criterion"] = criterion
    if len(space.config.granularity) > 1:
        point["granularity"] = granularity
    point.update(space.default_params())  # first rounding and quantization, no block removed
    return point


def _bounds(space: SearchSpace, granularity: str) -> dict[str, tuple[float, float]]:
    return {m: (d.range.low, d.range.high) for d in _searched(space, granularity) for m in d.members}


def global_allocation(scores: Mapping[str, torch.Tensor], sizes: Mapping[str, int], bounds: Mapping[str, tuple[float, float]],
                      level: float) -> dict[str, float]:
    """Per group, the ratio one global ranking gives it when ``level`` of all units go: the lowest
    scores across groups are removed, each group removing at least ``low`` and at most ``high`` of
    its units (and never more than ``scores`` offers).

    >>> s = {"a": torch.tensor([0.1, 0.2, 0.9]), "b": torch.tensor([0.3, 0.4, 0.5])}
    >>> global_allocation(s, {"a": 4, "b": 4}, {"a": (0.0, 0.75), "b": (0.0, 0.25)}, 0.5)
    {'a': 0.5, 'b': 0.25}
    """
    total = sum(sizes.values())
    forced = {n: min(math.ceil(sizes[n] * bounds[n][0] - 1e-9), len(scores[n])) for n in scores}
    caps = {n: min(math.floor(sizes[n] * bounds[n][1] + 1e-9), len(scores[n])) for n in scores}
    budget = min(round(level * total), sum(caps.values())) - sum(forced.values())
    pool = [(float(v), n) for n in scores for v in scores[n][forced[n]: caps[n]].tolist()]
    removed = dict(forced)
    for _, n in sorted(pool, key=lambda item: item[0])[: max(budget, 0)]:
        removed[n] += 1
    return {n: removed[n] / sizes[n] for n in scores}


def erk_allocation(shapes: Mapping[str, Sequence[int]], bounds: Mapping[str, tuple[float, float]], level: float) -> dict[str, float]:
    """Per weight tensor, the ratio Erdős–Rényi-kernel gives it when ``level`` of all weights go:
    density ∝ sum(shape) / prod(shape), scaled so the total matches, each ratio kept within its bounds.

    >>> r = erk_allocation({"big": (64, 64), "small": (4, 64)}, {"big": (0, 0.99), "small": (0, 0.99)}, 0.5)
    >>> r["big"] > 0.5 > r["small"]
    True
    """
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / numel[n] for n, s in shapes.items()}
    total = sum(numel.values())
    target = (1.0 - level) * total

    def densities(eps: float) -> dict[str, float]:
        return {n: min(max(eps * raw[n], 1.0 - bounds[n][1]), 1.0 - bounds[n][0]) for n in shapes}

    low, high = 0.0, 1.0 / min(raw.values())
    for _ in range(100):  # bisection: the kept total grows with eps
        mid = (low + high) / 2
        if sum(d * numel[n] for n, d in densities(mid).items()) < target:
            low = mid
        else:
            high = mid
    return {n: 1.0 - d for n, d in densities(high).items()}


def _magnitude(space: SearchSpace, preferred: str) -> str:
    """The criterion a magnitude baseline is pruned with: ``preferred`` if the space offers it, else
    another magnitude criterion it offers, else its first."""
    for name in (preferred, "l1", "l2", "lamp"):
        if name in space.config.criteria:
            return name
    return space.config.criteria[0]


def reference_points(space: SearchSpace, model: nn.Module, example_inputs: torch.Tensor, kinds: Sequence[str],
                     levels: Sequence[float]) -> list[Baseline]:
    """The baselines ``kinds`` at each of ``levels`` (the share of searched units removed), as points
    of ``space`` for its first granularity; a point equal to an earlier one is dropped."""
    granularity = space.config.granularity[0]
    check_kinds(kinds, granularity)
    dims = _searched(space, granularity)
    if not dims or not levels:
        return []
    members = [m for d in dims for m in d.members]
    sizes = {g.name: g.size for g in space.groups if g.name in members}
    bounds = _bounds(space, granularity)
    scores: dict[str, dict[str, torch.Tensor]] = {}
    found: list[Baseline] = []
    for kind in kinds:
        for level in levels:
            label = f"{kind} {level:g}"
            if kind == "uniform":
                found.append(Baseline(label, space_point(space, granularity, {m: level for m in members}, space.config.criteria[0], sizes)))
                continue
            if kind == "erk":
                shapes = {m: tuple(model.get_parameter(m).shape) for m in members}
                ratios = erk_allocation(shapes, bounds, level)
                found.append(Baseline(label, space_point(space, granularity, ratios, _magnitude(space, "l1"), sizes)))
                continue
            criterion = "lamp" if kind == "lamp" else "l1"
            if criterion not in scores:
                scores[criterion] = rankings(model, example_inputs, granularity, criterion, members, space.config.min_channels,
                                             space.group_min_channels)
            ratios = global_allocation(scores[criterion], sizes, bounds, level)
            found.append(Baseline(label, space_point(space, granularity, ratios, _magnitude(space, criterion), sizes)))
    unique: list[Baseline] = []
    for b in found:
        if all(b.point != u.point for u in unique):
            unique.append(b)
    return unique
