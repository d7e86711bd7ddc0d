"""Multi-fidelity (``search.screening``): spend fine-tuning only on policies worth it.

Every trial first reports a cheap screening result (pruned, BatchNorm re-calibrated, measured:
latency, size and MACs are final, the accuracy is a proxy; metric ``fidelity`` 0). This Ray Tune
scheduler then stops the trial if an earlier screened trial dominates it on (proxy accuracy,
latency, size); otherwise the trial is fine-tuned and reports again (``fidelity`` 1). Baselines and
the first ``warmup`` trials are always fine-tuned. A stopped trial is recorded with its screening
metrics and tag ``secateurs.screened_out``; it is never on the frontier, and the sampler is told its
(pessimistic) screening values.

With ``search.constraints``, a bound on a cost (``latency_ms``, ``size_mb``, ``macs``, ``params``,
``tokens_per_s``: final at screening, fine-tuning does not change them) is checked at screening: a
trial that breaks one is stopped there, whatever the warm-up (it can never be on the frontier), and
only screening results within those bounds judge the others (a policy the constraints rule out must
not push out one they allow).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from search import frontier
from search.constraints import Constraint
from search.objectives import COSTS, DEFAULT, Objectives
from search.searcher import ORIGIN


@dataclasses.dataclass(frozen=True)
class ScreeningSettings:
    """``search.screening``: screen each trial before fine-tuning it (null = fine-tune every trial)."""

    __pydantic_config__ = {"extra": "forbid"}

    bn_batches: int = 8   # training batches that re-estimate BatchNorm statistics before the screening measurement
    warmup: int = 4       # the first trials to screen are fine-tuned whatever their screening result
    fine_tunes: int | None = None  # stop once this many sampled trials were fine-tuned (screened-out ones do not count; num_trials stays the cap)

    def __post_init__(self) -> None:
        if self.fine_tunes is not None and self.fine_tunes < 1:
            raise ValueError(f"fine_tunes: must be >= 1 (or null: no budget of fine-tunes), but got {self.fine_tunes}")
        if self.bn_batches < 0:
            raise ValueError(f"bn_batches: must be >= 0, but got {self.bn_batches}")
        if self.warmup < 0:
            raise ValueError(f"warmup: must be >= 0, but got {self.warmup}")


def fine_tuned_trials(rows: Iterable[Mapping[str, Any]]) -> int:
    """How many sampled trials (``kind`` trial: not baselines) were fine-tuned, i.e. not screened out
    (``fidelity`` 0); rows recorded without screening count as fine-tuned.

    >>> fine_tuned_trials([{"kind": "trial", "fidelity": 1}, {"kind": "trial", "fidelity": 0},
    ...                    {"kind": "baseline", "fidelity": 1}, {"kind": "trial"}])
    2
    """
    return sum(1 for row in rows if row.get("kind") == "trial" and row.get("fidelity", 1) != 0)


def broken_costs(constraints: Sequence[Constraint], metrics: Mapping[str, Any], dense: Mapping[str, float]) -> list[str]:
    """The constraints on a cost that ``metrics`` (a screening result) break, as written.

    >>> broken_costs([Constraint.parse("macs <= 0.5 * dense"), Constraint.parse("accuracy_drop <= 0.01")],
    ...              {"macs": 60.0, "accuracy_drop": 0.2}, {"macs": 100.0})
    ['macs <= 0.5 * dense']
    """
    return [str(c) for c in constraints if c.metric in COSTS and c.metric in metrics and c.violation(metrics, dense) > 0]


def recorded_screening(rows: Iterable[Mapping[str, Any]], objectives: Objectives | None = None,
                       constraints: Sequence[Constraint] = (), dense: Mapping[str, float] | None = None) -> list[tuple[float, ...]]:
    """The screening results of recorded trials (rows of MLflow metrics with ``trial``), in trial
    order: a screened-out trial's own metrics; for a fine-tuned one its ``screening_accuracy`` and its
    in-search latency. Trials recorded without screening, and those that break a constraint on a
    cost (``constraints``, relative to ``dense``), are skipped. The screening value of a score ``s``
    is recorded as ``screening_s``.

    >>> recorded_screening([{"trial": 2, "fidelity": 0, "accuracy": 0.5, "latency_ms": 2.0, "size_mb": 1.0},
    ...                     {"trial": 1, "fidelity": 1, "accuracy": 0.9, "screening_accuracy": 0.6,
    ...                      "latency_ms": 2.9, "latency_ms_in_search": 3.0, "size_mb": 1.0},
    ...                     {"trial": 3, "accuracy": 0.8, "latency_ms": 1.0, "size_mb": 1.0}])
    [(0.6, 3.0, 1.0), (0.5, 2.0, 1.0)]
    """
    objectives = objectives or DEFAULT
    points = []
    for row in sorted(rows, key=lambda r: r["trial"]):
        fidelity = row.get("fidelity")
        if fidelity is None or fidelity != fidelity:  # absent, or NaN in a table
            continue
        screened = dict(row)
        if fidelity != 0:
            screened.update({q: row[f"screening_{q}"] for q in objectives.quality})
        in_search = row.get("latency_ms_in_search")
        if in_search is not None and in_search == in_search:
            screened["latency_ms"] = in_search
        if broken_costs(constraints, screened, dense or {}):
            continue
        points.append(tuple(float(screened[m]) for m in objectives.names))
    return points


class ScreeningScheduler(FIFOScheduler):
    """Stops a trial after its screening report when an earlier screening result dominates it.

    ``history``: screening results recorded before (a resumed search passes
    :func:`recorded_screening` of its MLflow trials); they count towards ``warmup``.
    ``constraints`` (relative to ``dense``): a trial that breaks one on a cost is stopped at once."""

    def __init__(self, warmup: int, references: Sequence[str] = (), history: Sequence[tuple[float, ...]] = (),
                 objectives: Objectives | None = None, constraints: Sequence[Constraint] = (),
                 dense: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.constraints, self.dense = list(constraints), dict(dense or {})
        self.objectives = objectives or DEFAULT
        self.warmup = warmup
        self.references = set(references)  # names of the baselines: always fine-tuned
        self.screened: list[tuple[float, ...]] = list(history)
        self.stopped: set[str] = set()

    def _is_reference(self, config: Mapping[str, Any]) -> bool:
        return config.get(ORIGIN) in self.references

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("fidelity") != 0:
            return TrialScheduler.CONTINUE
        if broken_costs(self.constraints, result, self.dense):
            if self._is_reference(trial.config):
                return TrialScheduler.CONTINUE  # a baseline is fine-tuned whatever it is (it is not a judge either)
            self.stopped.add(trial.trial_id)
            return TrialScheduler.STOP
        point = tuple(float(result[m]) for m in self.objectives.names)
        verdict = frontier.dominated(point, self.screened, self.objectives.senses)
        self.screened.append(point)
        if verdict and len(self.screened) > self.warmup and not self._is_reference(trial.config):
            self.stopped.add(trial.trial_id)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE
