"""What a search optimises: the task's scores (``accuracy: max``, ``rmse: min``, ``perplexity: min``)
beside the measured costs (``latency_ms``, ``size_mb``, and ``macs``/``params``/``tokens_per_s`` if
asked for), each with its direction. ``tokens_per_s`` (models of token ids: the tokens of the timed
batch over the latency) is measured like the others but better when higher: its direction is ``max``,
and hypervolume divides it by the dense model's as it does the costs (reference 1: the dense model).

``search.objectives`` in a config names them; left out, the search takes the task's own objectives
(top-1 ``accuracy: max`` for the built-in tasks) plus ``latency_ms: min`` and ``size_mb: min``.
Everything that compares policies (the sampler, screening, the frontier, hypervolume, ``pick``, the
plots and the model card) reads them from here.

>>> o = Objectives.resolve(None, {"rmse": "min"})
>>> o.names, o.senses, o.quality, o.primary
(['rmse', 'latency_ms', 'size_mb'], ['min', 'min', 'min'], ['rmse'], 'rmse')
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from evaluators.checks import RESERVED, derived_names

SENSES = ("min", "max")
COSTS = {"latency_ms": "min", "size_mb": "min", "macs": "min", "params": "min",
         "tokens_per_s": "max"}  # measured on the pruned model itself (fine-tuning does not change them)
DEFAULT_COSTS = ("latency_ms", "size_mb")
MIN_QUALITY_REFERENCE = 2.0  # hypervolume box of a score to minimise: up to twice the dense model's
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


def check_declared(objectives: Mapping[str, str] | None) -> None:
    """Refuse a malformed ``search.objectives`` (raises ValueError naming the key and the value)."""
    if objectives is None:
        return
    if not isinstance(objectives, Mapping) or not objectives:
        raise ValueError(f"objectives: must map metric names to min or max, e.g. {{accuracy: max, latency_ms: min}}, but got {objectives!r}")
    for name, sense in objectives.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"objectives: {name!r} is not a metric name (letters, digits, '_', '.', '-')")
        if sense not in SENSES:
            raise ValueError(f"objectives.{name}: direction must be min or max, but got {sense!r}")
        if name in COSTS and sense != COSTS[name]:
            raise ValueError(f"objectives.{name}: is {'a cost' if COSTS[name] == 'min' else 'measured'}, {COSTS[name]}imised; got {sense!r}")
    if not any(name not in COSTS for name in objectives):
        raise ValueError(f"objectives: name at least one score of the task besides the costs {', '.join(COSTS)}, but got {dict(objectives)!r}")
    if not any(name in COSTS for name in objectives):
        raise ValueError(f"objectives: name at least one cost ({', '.join(COSTS)}) to trade the scores against, but got {dict(objectives)!r}")


@dataclasses.dataclass(frozen=True)
class Objectives:
    """The objectives of one search, in order: names and their senses (``min``/``max``)."""

    items: tuple[tuple[str, str], ...]

    @classmethod
    def resolve(cls, declared: Mapping[str, str] | None, task_objectives: Mapping[str, str] | None = None) -> Objectives:
        """``declared`` (``search.objectives``), else the task's objectives plus the default costs."""
        check_declared(declared)
        if declared:
            return cls(tuple(declared.items()))
        quality = dict(task_objectives or {"accuracy": "max"})
        return cls(tuple(quality.items()) + tuple((c, COSTS[c]) for c in DEFAULT_COSTS if c not in quality))

    @classmethod
    def of(cls, mapping: Mapping[str, str]) -> Objectives:
        return cls(tuple(mapping.items()))

    @property
    def mapping(self) -> dict[str, str]:
        return dict(self.items)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.items]

    @property
    def senses(self) -> list[str]:
        return [s for _, s in self.items]

    @property
    def quality(self) -> list[str]:
        """The task's scores among the objectives (what fine-tuning changes)."""
        return [n for n in self.names if n not in COSTS]

    @property
    def costs(self) -> list[str]:
        return [n for n in self.names if n in COSTS]

    @property
    def primary(self) -> str:
        """The first score: what plots put on their y axis and progress lines show first."""
        return self.quality[0]

    def sense(self, name: str) -> str:
        return self.mapping[name]

    def describe(self) -> str:
        """``accuracy max, latency_ms min, size_mb min``"""
        return ", ".join(f"{n} {s}" for n, s in self.items)

    def check_measured(self, record: Mapping[str, float]) -> None:
        """Refuse measured objectives the dense model's record lacks (``tokens_per_s`` of a model that
        takes no token ids), naming the ones it has."""
        missing = [n for n in self.costs if n not in record]
        if missing:
            have = ", ".join(c for c in COSTS if c in record)
            raise ValueError(f"search.objectives: {', '.join(map(repr, missing))} is not measured for this task's model "
                             f"(tokens_per_s needs inputs of token ids); measured: {have}")

    def check_scores(self, scores: Iterable[str]) -> None:
        """Refuse objectives the task's evaluation does not return (ValueError naming the ones it does)."""
        scores = list(scores)
        missing = [n for n in self.quality if n not in scores]
        if missing:
            raise ValueError(f"search.objectives: {', '.join(map(repr, missing))} is not a score the task's evaluation returns; "
                             f"it returns {', '.join(scores) or 'nothing'} (and the costs {', '.join(COSTS)} are measured)")

    # --- hypervolume -------------------------------------------------------------------------

    def reference_description(self) -> str:
        parts = []
        for name, sense in self.items:
            if name in COSTS:
                parts.append(f"{name}=dense")
            elif sense == "max":
                parts.append(f"{name}=0")
            else:
                parts.append(f"{name}={MIN_QUALITY_REFERENCE:g}*dense")
        return ", ".join(parts) + " (costs and scores to minimise divided by dense)"

    def normalised(self, rows: pd.DataFrame, dense: Mapping[str, float]) -> tuple[np.ndarray, list[float]]:
        """The rows' objective values as hypervolume sees them, and the reference point: costs and
        scores to minimise divided by the dense model's (reference 1, and 2 for scores), scores to
        maximise as they are (reference 0). The box is "better than dense, and a score not worse than
        twice the dense model's error"."""
        columns, reference = [], []
        for name, sense in self.items:
            values = rows[name].to_numpy(float)
            if name in COSTS or sense == "min":
                values = values / max(abs(float(dense[name])), 1e-12)
                reference.append(1.0 if name in COSTS else MIN_QUALITY_REFERENCE)
            else:
                reference.append(0.0)
            columns.append(values)
        return np.column_stack(columns) if columns else np.empty((len(rows), 0)), reference


DEFAULT = Objectives.resolve(None)


def recorded_metrics(scores: Iterable[str]) -> list[str]:
    """Every metric name a trial can record when the task's evaluation returns ``scores``: the
    scores, the measurements and timings, and what derives from the scores (``<score>_change``,
    ``accuracy_drop``); the names constraints may use.

    >>> recorded_metrics(["rmse"])[:3], "rmse_change" in recorded_metrics(["rmse"])
    (['rmse', 'latency_ms', 'latency_p10_ms'], True)
    """
    scores = list(scores)
    return list(dict.fromkeys([*scores, *RESERVED, *derived_names(scores)]))


def ordered(objectives: Objectives, prefer: str) -> tuple[list[str], list[bool]]:
    """Columns and ascending flags that sort rows best-first by ``prefer``, then by the others.

    >>> ordered(DEFAULT, "latency_ms")
    (['latency_ms', 'accuracy', 'size_mb'], [True, False, True])
    """
    names = [prefer] + [n for n in objectives.names if n != prefer]
    return names, [objectives.sense(n) == "min" for n in names]


def as_objectives(value: Objectives | Mapping[str, str] | Sequence[tuple[str, str]] | None) -> Objectives:
    if value is None:
        return DEFAULT
    if isinstance(value, Objectives):
        return value
    return Objectives.of(dict(value))
