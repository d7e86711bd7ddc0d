"""Per-group sensitivity: how much accuracy each prunable group loses when it alone is pruned.

For every group and every ratio asked for, the dense checkpoint is loaded afresh, only that group
is pruned at that ratio (with the template policy's criterion, granularity and rounding), and the
model is scored by a cheap proxy: the task's evaluation on the first evaluation examples after
BatchNorm statistics are re-estimated on calibration batches, with no fine-tuning. The score is
the task's first objective (``accuracy`` for the built-in tasks); for another metric the
``proxy_accuracy`` columns hold that metric and ``accuracy_drop`` the loss in it (dense - pruned
when it is maximised, pruned - dense when minimised). The proxy understates what
a fine-tuned model reaches, but it ranks groups by fragility quickly (one forward pass per batch).

Uses: a table (:func:`to_frame`, for a CSV artifact) and a plot (:func:`plot`) of accuracy drop
against ratio per group; :func:`safe_ratios` gives each group's largest ratio within an accuracy
budget, to narrow a search space's ranges or to seed the search with a reasonable first policy.
"""
from __future__ import annotations

import dataclasses
import math
import time
from numbers import Real
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from evaluators import pruning
from evaluators.checkpoint import load_dense
from evaluators.tasks import Task
from evaluators.train import recalibrate_batchnorm
from evaluators.trial import prune_with_task
from spaces import Policy

COLUMNS: tuple[str, ...] = (
    "group", "ratio", "proxy_accuracy", "dense_proxy_accuracy", "accuracy_drop", "macs", "params", "time_s",
)
"""The keys of each row :func:`analyse` returns, in the order :func:`to_frame` puts its columns."""


def proxy_metric(objectives: Mapping[str, str], scores: Mapping[str, float]) -> tuple[str, str]:
    """The score the proxy uses and its direction: the first objective the evaluation returns, else
    its first score (maximised).

    >>> proxy_metric({"latency_ms": "min", "rmse": "min"}, {"rmse": 0.5, "mae": 0.4})
    ('rmse', 'min')
    """
    for name, direction in objectives.items():
        if name in scores:
            return name, direction
    return next(iter(scores)), "max"


def _check_ratios(ratios: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """``ratios`` as lists of floats (any iterable of numbers is accepted, e.g. a numpy array)."""
    if not isinstance(ratios, Mapping):
        raise ValueError(f"ratios: must map group names to lists of ratios, but got {ratios!r}")
    checked: dict[str, list[float]] = {}
    for group, values in ratios.items():
        if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
            raise ValueError(f"ratios[{group!r}]: must be a list of ratios, but got {values!r}")
        checked[group] = list(values)
        for r in checked[group]:
            if isinstance(r, bool) or not isinstance(r, Real) or math.isnan(r) or not 0.0 <= r < 1.0:
                raise ValueError(f"ratios[{group!r}]: each ratio must satisfy 0 <= ratio < 1, but got {r!r}")
        checked[group] = [float(r) for r in checked[group]]
    return checked


def _check_groups(task: Task, template: Policy, groups: Sequence[str], example: Any) -> None:
    """Every group must be one that ``template.granularity`` can prune in the task's model."""
    found = pruning.discover_groups(task.build_model().eval(), example, (template.granularity,), template.nm_block)
    valid = [g.name for g in found if template.granularity in g.granularities]
    for group in groups:
        if group not in valid:
            raise ValueError(f"ratios: unknown group {group!r} for granularity {template.granularity!r}; "
                             f"valid: {', '.join(valid) or 'none'}")


def analyse(
    task: Task,
    checkpoint: str | Path | bytes,
    template: Policy,
    ratios: Mapping[str, Sequence[float]],
    *,
    bn_batches: int = 8,
    batch_size: int = 64,
    samples: int | None = 1000,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """Prune each group of ``ratios`` alone at each of its ratios and score the proxy accuracy.

    ``template`` gives the criterion, granularity, ``round_to``, ``min_channels``, ``nm_block`` and
    seed (its ratios, global groups and fine-tune knobs are ignored). Ratios of 0 are skipped.
    Each pruned model gets ``bn_batches`` batches of ``batch_size`` training inputs to re-estimate
    its BatchNorm statistics (none for a model without BatchNorm) and is scored on the first
    ``samples`` test examples (all when None); the dense model is scored on the same examples as
    it is. Returns one row per (group, ratio), in the order given, with the keys of
    :data:`COLUMNS`: ``macs`` and ``params`` are the pruned model's (zeros of masks not counted),
    ``accuracy_drop`` is ``dense_proxy_accuracy - proxy_accuracy``, ``time_s`` the seconds the row
    took. Bad input raises a :class:`ValueError` naming the field before any model is pruned.
    """
    ratios = _check_ratios(ratios)
    if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 0:
        raise ValueError(f"bn_batches: must be an integer >= 0, but got {bn_batches!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, but got {batch_size!r}")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples: must be an integer >= 1 or None (all), but got {samples!r}")
    example = task.example()
    _check_groups(task, template, list(ratios), example)

    device = torch.device(device)
    dense_scores = task.score(load_dense(task, checkpoint).to(device), device, limit=samples)
    metric, direction = proxy_metric(task.objectives, dense_scores)
    dense_acc = dense_scores[metric]

    def proxy(model: torch.nn.Module) -> float:
        return task.score(model, device, limit=samples)[metric]

    rows: list[dict[str, Any]] = []
    for group, values in ratios.items():
        for ratio in values:
            if ratio <= 0:
                continue
            start = time.perf_counter()
            policy = dataclasses.replace(template, ratios={group: ratio}, global_groups=(), finetune={})
            model = prune_with_task(policy, load_dense(task, checkpoint), task).to(device)
            torch.manual_seed(template.seed)
            recalibrate_batchnorm(model, task.calibration_source, batches=bn_batches, batch_size=batch_size)
            acc = proxy(model)
            macs, params = pruning.effective_macs_and_params(model.cpu(), example)
            rows.append({
                "group": group, "ratio": ratio, "proxy_accuracy": acc, "dense_proxy_accuracy": dense_acc,
                "accuracy_drop": dense_acc - acc if direction == "max" else acc - dense_acc, "macs": macs, "params": params, "time_s": time.perf_counter() - start,
            })
    return rows


def safe_ratios(rows: Sequence[Mapping[str, Any]], max_drop: float) -> dict[str, float]:
    """Each group's largest ratio whose accuracy drop stays within ``max_drop``.

    The drop curve of a group runs through (0, 0) and its tested ratios, made monotone by taking
    the running maximum over increasing ratios (a lucky dip past a harmful ratio does not count).
    The answer is interpolated linearly where the curve crosses ``max_drop``; when even the largest
    tested ratio stays within it, that ratio is the answer (no extrapolation). Rows with ratio 0
    are ignored; groups come in the order they first appear.

    >>> rows = [{"group": "conv1", "ratio": 0.25, "accuracy_drop": 0.0},
    ...         {"group": "conv1", "ratio": 0.5, "accuracy_drop": 0.04},
    ...         {"group": "fc", "ratio": 0.5, "accuracy_drop": 0.01}]
    >>> safe_ratios(rows, max_drop=0.02)
    {'conv1': 0.375, 'fc': 0.5}
    """
    if isinstance(max_drop, bool) or not isinstance(max_drop, Real) or not 0 <= max_drop < math.inf:
        raise ValueError(f"max_drop: must be a finite number >= 0, but got {max_drop!r}")
    curves: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(rows):
        missing = [k for k in ("group", "ratio", "accuracy_drop") if k not in row]
        if missing:
            raise ValueError(f"rows[{i}]: missing key(s) {missing}; it has {sorted(row)}")
        drop = float(row["accuracy_drop"])
        if math.isnan(drop):
            raise ValueError(f"rows[{i}]: accuracy_drop must be a number, but got {row['accuracy_drop']!r}")
        points = curves.setdefault(str(row["group"]), [])
        if float(row["ratio"]) > 0:
            points.append((float(row["ratio"]), drop))

    safe: dict[str, float] = {}
    for group, points in curves.items():
        previous_ratio, previous_drop = 0.0, 0.0
        answer = 0.0
        for ratio, drop in sorted(points):
            drop = max(drop, previous_drop)
            if drop > max_drop:
                answer = previous_ratio + (ratio - previous_ratio) * (max_drop - previous_drop) / (drop - previous_drop)
                break
            previous_ratio, previous_drop = ratio, drop
            answer = ratio
        safe[group] = answer
    return safe


def _monotone_curve(points: Sequence[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """(ratios, values) through (0, 0) and ``points``, sorted, made monotone by a running maximum."""
    xs, ys, top = [0.0], [0.0], 0.0
    for ratio, value in sorted(points):
        if ratio > 0:
            top = max(top, value)
            xs.append(ratio)
            ys.append(top)
    return xs, ys


def allocation_path(rows: Sequence[Mapping[str, Any]], dense_cost: float, bounds: Mapping[str, tuple[float, float]],
                    step: float, cost: str = "latency_ms") -> list[dict[str, float]]:
    """Policies that prune more and more, each the cheapest next move in proxy accuracy per unit of
    ``cost`` saved (greedy, as in NetAdapt's resource-constrained allocation).

    Each group's proxy drop and its saving (``dense_cost - row[cost]``, the group pruned alone) are
    made monotone in the ratio and interpolated linearly between its tested ratios, through (0, 0),
    and flat past the last one, so a group is never pruned past the largest ratio it was tested at.
    From every group at its range's low (``bounds[group] = (low, high)``), each step raises one
    group to a ratio on the ``step`` grid (up to ``high``): the move with the least drop per unit
    saved, among moves that save something (a move may jump several grid steps, which lets a group
    whose first step saves nothing be pruned past it). Ties go to the smaller move. Savings are
    assumed to add up across groups, which they only roughly do; measure the policies.
    Returns the ratios after each move (the starting point not included); groups in ``bounds`` but
    without rows stay at their low.

    >>> rows = [{"group": "a", "ratio": 0.5, "accuracy_drop": 0.10, "latency_ms": 8.0},
    ...         {"group": "b", "ratio": 0.5, "accuracy_drop": 0.01, "latency_ms": 9.0}]
    >>> [p for p in allocation_path(rows, 10.0, {"a": (0, 0.5), "b": (0, 0.5)}, 0.25)]
    [{'a': 0.0, 'b': 0.25}, {'a': 0.0, 'b': 0.5}, {'a': 0.25, 'b': 0.5}, {'a': 0.5, 'b': 0.5}]
    """
    if not step or step <= 0:
        raise ValueError(f"step: must be > 0, but got {step!r}")
    points: dict[str, list[tuple[float, float, float]]] = {}
    for i, row in enumerate(rows):
        missing = [k for k in ("group", "ratio", "accuracy_drop", cost) if k not in row]
        if missing:
            raise ValueError(f"rows[{i}]: missing key(s) {missing}; it has {sorted(row)}")
        points.setdefault(str(row["group"]), []).append(
            (float(row["ratio"]), float(row["accuracy_drop"]), float(dense_cost) - float(row[cost])))
    curves = {}
    for group, pts in points.items():
        if group in bounds:
            xs, drops = _monotone_curve([(r, d) for r, d, _ in pts])
            _, saved = _monotone_curve([(r, s) for r, _, s in pts])
            curves[group] = (xs, drops, saved)
    current = {group: float(low) for group, (low, _) in bounds.items()}
    path: list[dict[str, float]] = []
    while True:
        best: tuple[float, float, str, float] | None = None  # (drop per saving, move size, group, new ratio)
        for group, (xs, drops, saved) in curves.items():
            low, high = bounds[group]
            now = current[group]
            here_drop, here_saved = float(np.interp(now, xs, drops)), float(np.interp(now, xs, saved))
            k = 1
            while True:
                ratio = round(low + (round((now - low) / step) + k) * step, 10)
                if ratio > min(high, xs[-1]) + 1e-9:
                    break
                gain = float(np.interp(ratio, xs, saved)) - here_saved
                if gain > 1e-12:
                    price = max(float(np.interp(ratio, xs, drops)) - here_drop, 0.0) / gain
                    candidate = (float(f"{price:.9g}"), ratio - now, group, ratio)  # 9 digits: equal prices tie
                    if best is None or candidate[:2] < best[:2]:
                        best = candidate
                k += 1
        if best is None:
            return path
        current[best[2]] = best[3]
        path.append(dict(current))
