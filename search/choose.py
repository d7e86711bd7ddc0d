"""Choosing one frontier policy: bounds it must meet and a preference among those that do.

The bounds are :class:`search.constraints.Constraint` s, the vocabulary of ``search.constraints``:
``secateurs pick --where "macs <= 0.5 * dense"``; the flags ``--min-accuracy``,
``--max-accuracy-drop``, ``--max-latency-ms`` and ``--max-size-mb`` are shorthands for the same.

>>> Constraints(min_accuracy=0.98, where=("macs <= 0.5 * dense",)).describe()
'--min-accuracy 0.98 and macs <= 0.5 * dense'
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import pandas as pd

from search import fidelity, frontier
from search.constraints import Constraint
from search.objectives import DEFAULT, Objectives, ordered
from search.records import ProductionError, SearchRecord

PREFERENCES = ("knee", "accuracy", "latency_ms", "size_mb")
"""How :func:`choose` breaks the tie among feasible frontier policies by default: the knee, or the
best of one objective (any objective of the search: ``--prefer rmse``)."""

class NoFeasiblePolicyError(ProductionError):
    """No frontier policy satisfies the constraints; the message names the binding one."""


# flag field -> (metric, comparison, command-line flag)
FLAGS: dict[str, tuple[str, str, str]] = {
    "min_accuracy": ("accuracy", ">=", "--min-accuracy"),
    "max_accuracy_drop": ("accuracy_drop", "<=", "--max-accuracy-drop"),
    "max_latency_ms": ("latency_ms", "<=", "--max-latency-ms"),
    "max_size_mb": ("size_mb", "<=", "--max-size-mb"),
}


@dataclasses.dataclass(frozen=True)
class Constraints:
    """Bounds a chosen policy must meet, checked on the metrics the search recorded: the flags
    (None = no bound) and ``where``, constraints as ``search.constraints`` writes them.

    >>> Constraints(min_accuracy=0.98, max_latency_ms=1.0).describe()
    '--min-accuracy 0.98 and --max-latency-ms 1'
    """

    min_accuracy: float | None = None
    max_accuracy_drop: float | None = None
    max_latency_ms: float | None = None
    max_size_mb: float | None = None
    where: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, (_, _, flag) in FLAGS.items():
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ProductionError(f"{flag} must be a finite number, but got {value}")
        if self.min_accuracy is not None and not 0.0 <= self.min_accuracy <= 1.0:
            raise ProductionError(f"--min-accuracy must be in [0, 1], but got {self.min_accuracy}")
        for name in ("max_latency_ms", "max_size_mb"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ProductionError(f"{FLAGS[name][2]} must be > 0, but got {value}")
        object.__setattr__(self, "where", tuple(self.where))
        for text in self.where:
            try:
                Constraint.parse(text, metrics=None)  # the names: checked against the search's records by choose()
            except ValueError as exc:
                raise ProductionError(f"--where: {exc}") from None

    @property
    def bounds(self) -> list[Constraint]:
        """Every bound as a :class:`~search.constraints.Constraint` (flags labelled as typed)."""
        flags = [Constraint(metric, op, getattr(self, name), label=f"{flag} {getattr(self, name):g}")
                 for name, (metric, op, flag) in FLAGS.items() if getattr(self, name) is not None]
        return flags + [Constraint.parse(text, metrics=None) for text in self.where]

    def active(self) -> list[Constraint]:
        return self.bounds

    def describe(self) -> str:
        return " and ".join(str(c) for c in self.bounds) or "no constraints"

    def satisfied_by(self, table: pd.DataFrame, dense: Mapping[str, float] | None = None) -> pd.Series:
        """Boolean mask of rows meeting every bound (``dense``: the reference of ``* dense`` bounds)."""
        mask = pd.Series(True, index=table.index)
        for bound in self.bounds:
            if bound.metric not in table:
                raise ProductionError(f"{bound}: the search recorded no metric {bound.metric!r}; it has "
                                      f"{', '.join(c for c in table.columns if table[c].dtype.kind in 'fi')}")
            mask &= bound.holds(table, dense or {})
        return mask

    def violations(self, metrics: Mapping[str, float], dense: Mapping[str, float] | None = None) -> list[str]:
        """The bounds ``metrics`` misses, as ``BOUND (got value)``."""
        return [f"{bound} (got {float(metrics[bound.metric]):.4g})" for bound in self.bounds
                if bound.violation(metrics, dense or {}) > 0]


def _name(bound: Constraint) -> str:
    """A bound as the user named it: its flag (``--min-accuracy``) or its expression."""
    return bound.label.split()[0] if bound.label else str(bound)


def _infeasible_message(table: pd.DataFrame, constraints: Constraints, what: str, dense: Mapping[str, float] | None) -> str:
    total = len(table)
    bounds = constraints.bounds
    parts, binding = [], []
    for bound in bounds:
        ruled_out = int((~bound.holds(table, dense or {})).sum())
        best = table[bound.metric].max() if bound.op == ">=" else table[bound.metric].min()
        best_word = "best" if bound.metric == "accuracy" else ("highest" if bound.op == ">=" else "lowest")
        parts.append(f"{bound} alone rules out {ruled_out} of {total} (the {best_word} {bound.metric} is {best:.4g})")
        if ruled_out == total:
            binding.append(_name(bound))
    if binding:
        verdict = f"binding: {', '.join(binding)} (rules out every policy alone)"
    else:
        relax = []
        for bound in bounds:
            mask = pd.Series(True, index=table.index)
            for other in bounds:
                if other is not bound:
                    mask &= other.holds(table, dense or {})
            if int(mask.sum()):
                relax.append(f"{_name(bound)} ({int(mask.sum())} left without it)")
        verdict = (f"binding together; relaxing one of {', '.join(relax)} would do" if relax
                   else "binding together: no single constraint can be relaxed alone to leave a policy")
    return f"no {what} satisfies {constraints.describe()}: {'; '.join(parts)}; {verdict}"


def choose(table: pd.DataFrame, constraints: Constraints = Constraints(), prefer: str = "knee", *, what: str = "frontier policy",
           dense: Mapping[str, float] | None = None, objectives: Objectives | None = None) -> pd.Series:
    """The row of ``table`` (frontier trials) that meets ``constraints`` and is best by ``prefer``.

    ``knee`` takes :func:`search.frontier.knee_point` of the feasible rows; ``accuracy`` the most
    accurate (ties: faster, then smaller); ``latency_ms``/``size_mb`` the lowest (ties: more
    accurate). Scores are compared at one fidelity when the search refined some rows
    (:mod:`search.fidelity`); the bounds hold on the measured ones. Restricting to the frontier
    loses nothing: the bounds are monotone in the objectives, so whatever dominates a feasible
    trial is feasible too.
    ``dense``: the dense model's metrics, for bounds relative to it (``macs <= 0.5 * dense``).
    Raises :class:`NoFeasiblePolicyError` naming the binding constraint.
    """
    objectives = objectives or DEFAULT
    if prefer != "knee" and prefer not in objectives.names:
        raise ProductionError(f"--prefer: unknown preference {prefer!r}; valid: knee, {', '.join(objectives.names)}")
    if not len(table):
        raise NoFeasiblePolicyError("the frontier is empty: the search completed no trial")
    table = fidelity.expected(table, objectives.quality)  # search.refine: each score at one fidelity, fitted on all of it
    feasible = table[constraints.satisfied_by(table, dense)]
    if not len(feasible):
        raise NoFeasiblePolicyError(_infeasible_message(table, constraints, what, dense))
    quality = {name: objectives.mapping[name] for name in objectives.quality}
    view = fidelity.ranked(feasible.reset_index(drop=True), quality)  # (ranked keeps the estimate made here)
    if prefer == "knee":
        at = frontier.knee_point(view[objectives.names].to_numpy(dtype=float), objectives.senses)
    else:
        columns, ascending = ordered(objectives, prefer)
        at = int(view.sort_values(columns, ascending=ascending, kind="stable").index[0])
    return feasible.iloc[at]


def find_trial(record: SearchRecord, trial: str) -> pd.Series:
    """A completed trial of ``record`` by number (``6``) or run id (or a unique prefix of it)."""
    table = record.trials
    if not len(table):
        raise ProductionError(f"search {record.run_id} has no completed trial")
    found = table[table["trial"] == int(trial)] if trial.isdigit() else table[table["run_id"].str.startswith(trial)]
    if len(found) != 1:
        numbers = ", ".join(str(t) for t in table["trial"])
        raise ProductionError(f"--trial {trial!r} matches {len(found)} completed trials of search {record.run_id}; "
                              f"completed trials: {numbers}")
    return found.iloc[0]
