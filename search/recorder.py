"""The driver-side Ray Tune callback that records trials in MLflow, tracks the frontier's
hypervolume and prints progress; and the stoppers that end a search whose frontier stopped growing
or whose time budget is spent."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from ray import tune

from search import frontier
from search.baselines import Baseline
from search.objectives import DEFAULT, Objectives
from search.constraints import Constraint, violations
from search.searcher import ORIGIN, sampled_params
from search.tracking import SearchTracker
from spaces import SearchSpace

# what Ray Tune adds to every result: not the trial's metrics
RAY_RESULT_KEYS = {"timestamp", "done", "training_iteration", "trial_id", "date", "time_this_iter_s", "time_total_s", "pid",
                   "hostname", "node_ip", "time_since_restore", "iterations_since_restore", "checkpoint_dir_name",
                   "should_checkpoint", "experiment_tag", "node_id", "config"}


def trial_metrics(result: Mapping) -> dict[str, float]:
    """The metrics of a trial's result as MLflow records them: every finite-or-NaN number it reported
    (the task's scores and their changes, the measurements, the phase timings), not Ray's bookkeeping."""
    return {k: float(v) for k, v in result.items()
            if k not in RAY_RESULT_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def artifact_tags(result: Mapping) -> dict[str, str]:
    """The tags a trial reported beside its metrics (``secateurs.quantization``, ``secateurs.runtime``,
    ...: how its measured artifact ran, see :meth:`evaluators.trial.Metrics.tags`).

    >>> artifact_tags({"accuracy": 0.9, "secateurs.quantization": "int8", "trial_id": "a"})
    {'secateurs.quantization': 'int8'}
    """
    return {k: v for k, v in result.items() if k.startswith("secateurs.") and isinstance(v, str)}


def _short(score: str) -> str:
    return "acc" if score == "accuracy" else score


HEARTBEAT_S = 10.0  # how often the time spent is recorded while trials run
OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|cannot allocate memory|MemoryError|OutOfMemoryError|\bOOM\b", re.I)


def failure_kind(error: str) -> str:
    """``out_of_memory`` when a trial's error says it ran out of memory (host or GPU, torch's
    allocator, Python, or Ray's memory monitor killing it), else ``error``.

    >>> failure_kind("RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 67108864 bytes")
    'out_of_memory'
    >>> failure_kind("RuntimeError: fragile model: only 16 filters left")
    'error'
    """
    return "out_of_memory" if OUT_OF_MEMORY.search(error) else "error"


class TrialRecorder(tune.Callback):
    """Logs each finished trial to MLflow (the only writer), then the frontier's hypervolume on the
    parent run, and prints one progress line.

    It starts from what MLflow already holds for the search, so a resumed search neither renumbers
    nor logs a trial twice. Exceptions are caught and printed: one raised in a callback would
    abort the whole search.
    """

    def __init__(
        self,
        tracker: SearchTracker,
        space: SearchSpace,
        total: int,
        out: Callable[[str], None],
        *,
        dense: Mapping[str, float],
        constraints: list[Constraint] = (),
        baselines: list[Baseline] = (),
        clock: Callable[[], float] | None = None,
        objectives: Objectives | None = None,
    ) -> None:
        self.tracker = tracker
        self.space = space
        self.total = total
        self.out = out
        self.dense = dict(dense)
        self.constraints = list(constraints)
        self.baselines = {b.name: b for b in baselines}
        self.clock = clock  # wall seconds the search has taken (earlier sessions included), logged as elapsed_s
        self.objectives = objectives or DEFAULT
        self._elapsed_logged = time.monotonic()
        self.rows, self.num_failed, self.recorded = tracker.trial_table()
        self.best_hypervolume, self.since_improvement = self._plateau()
        self._started: dict[str, float] = {}  # the running trials' starts (time.monotonic())
        self._walls: list[float] = []  # the wall seconds of each trial that ended in this session

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._started.setdefault(trial.trial_id, time.monotonic())

    def _ended(self, trial) -> None:
        began = self._started.pop(trial.trial_id, None)
        if began is not None:
            self._walls.append(time.monotonic() - began)

    def longest_trial_s(self) -> float | None:
        """The wall seconds of the longest trial of this session, from Ray Tune's start of it to its
        result (its actor's start, scheduling and reporting included), a trial still running counted
        with the seconds it has run so far; None before any started."""
        now = time.monotonic()
        seen = self._walls + [now - began for began in self._started.values()]
        return max(seen) if seen else None

    def _plateau(self) -> tuple[float, int]:
        """The best hypervolume of the recorded trials and how many trials in a row since it last
        grew, as the search counted them live (a failed trial counts as one that did not grow it),
        so that ``search.patience`` goes on counting across a resume."""
        by_index = {int(row["trial"]): row for row in self.rows}
        best, since, seen = 0.0, 0, []
        for index in range(1, len(self.rows) + self.num_failed + 1):
            if index in by_index:
                seen.append(by_index[index])
                table = pd.DataFrame(seen)
                hv = frontier.normalised_hypervolume(table[frontier.feasible_mask(table)], self.dense, self.objectives)
                if hv > best + 1e-12:
                    best, since = hv, 0
                    continue
            since += 1
        return best, since

    def _index(self) -> int:
        return len(self.rows) + self.num_failed + 1

    def _tags(self, trial, extra: Mapping[str, str]) -> tuple[str, dict[str, str]]:
        """The MLflow kind of a trial's run (``baseline`` or ``trial``) and its tags."""
        first = self.baselines.get(trial.config.get(ORIGIN))  # set by SecateursSearch
        tags = {"secateurs.ray_trial_id": trial.trial_id, **extra}
        if first is None:
            return "trial", tags
        tags[f"secateurs.{first.kind}"] = first.name  # secateurs.baseline or secateurs.seed
        return ("baseline" if first.kind == "baseline" else "trial"), tags

    def _feasible(self) -> pd.DataFrame:
        table = pd.DataFrame(self.rows, columns=None if self.rows else ["feasible", *self.objectives.names])
        return table[frontier.feasible_mask(table)]

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended(trial)
        try:
            result = trial.last_result or {}
            if trial.trial_id in self.recorded:
                return
            if not all(m in result for m in self.objectives.names):
                return  # an error that on_trial_error records
            index = self._index()
            policy = self.space.policy(trial.config)
            metrics = trial_metrics(result)
            kind, tags = self._tags(trial, {"secateurs.node_id": str(result.get("node_id", "")), **artifact_tags(result)})
            screened_out = result.get("fidelity") == 0
            if screened_out:
                tags["secateurs.screened_out"] = "true"
            if self.constraints:
                worst = max(violations(self.constraints, metrics, self.dense).values())
                metrics["feasible"] = float(worst <= 0)
                metrics["constraint_violation"] = max(worst, 0.0)
            run_id = self.tracker.log_trial(index, policy, metrics, tags=tags, kind=kind, sampled=sampled_params(trial.config))
            self.recorded.add(trial.trial_id)
            self.rows.append({"run_id": run_id, "trial": index, "kind": kind, "criterion": policy.criterion, **metrics})
            self._update_hypervolume(index)
            score = self.objectives.primary
            self._progress(index, f"{next((tags[k] + ': ' for k in ('secateurs.baseline', 'secateurs.seed') if k in tags), '')}"
                                  f"{_short(score)} {metrics[score]:.4f}  {metrics['latency_ms']:.3f} ms  {metrics['size_mb']:.3f} MB"
                                  + ("" if metrics.get("feasible", 1.0) else "  (infeasible)")
                                  + (f"  (screened out: proxy {score}, not fine-tuned)" if screened_out else ""))
        except Exception as exc:  # never let logging kill the search
            self.out(f"warning: could not record trial {trial.trial_id}: {exc!r}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended(trial)
        try:
            if trial.trial_id in self.recorded:
                return
            index = self._index()
            error = ""
            if trial.error_file and Path(trial.error_file).is_file():
                error = Path(trial.error_file).read_text()
            try:
                policy = self.space.policy(trial.config)
            except Exception:
                policy = None
            failure = {"secateurs.failure": failure_kind(error)}
            try:
                kind, tags = self._tags(trial, failure)
            except Exception:
                kind, tags = "trial", {"secateurs.ray_trial_id": trial.trial_id, **failure}
            self.tracker.log_failed_trial(index, policy, error, tags=tags, kind=kind, sampled=sampled_params(trial.config))
            self.recorded.add(trial.trial_id)
            self.num_failed += 1
            self.since_improvement += 1
            self._log_elapsed()
            reason = error.strip().splitlines()[-1] if error.strip() else "unknown error"
            oom = " (out of memory)" if failure["secateurs.failure"] == "out_of_memory" else ""
            self._progress(index, f"FAILED{oom}: {reason[:120]}")
        except Exception as exc:
            self.out(f"warning: could not record failed trial {trial.trial_id}: {exc!r}")

    def _update_hypervolume(self, step: int) -> None:
        hv = frontier.normalised_hypervolume(self._feasible(), self.dense, self.objectives)
        if hv > self.best_hypervolume + 1e-12:
            self.best_hypervolume, self.since_improvement = hv, 0
        else:
            self.since_improvement += 1
        self.tracker.log_search_metrics({"hypervolume": hv}, step=step)
        self._log_elapsed()

    def _log_elapsed(self) -> None:
        if self.clock:
            self.tracker.log_elapsed(self.clock())
            self._elapsed_logged = time.monotonic()

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        """Every ``HEARTBEAT_S`` while trials run, record the time spent (``elapsed_s``): a driver
        killed between two trials loses at most that much of ``search.time_budget_s``."""
        try:
            if time.monotonic() - self._elapsed_logged >= HEARTBEAT_S:
                self._log_elapsed()
        except Exception as exc:
            self.out(f"warning: could not record the time spent: {exc!r}")

    def _progress(self, index: int, what: str) -> None:
        done = len(self.rows) + self.num_failed
        best = ""
        feasible = self._feasible()
        if len(feasible):
            table = frontier.frontier_table(feasible, self.objectives.mapping)
            score = self.objectives.primary
            best_score = table[score].max() if self.objectives.sense(score) == "max" else table[score].min()
            best = (
                f" | frontier {int(table['pareto'].sum())}, hv {self.best_hypervolume:.4f}, "
                f"best {_short(score)} {best_score:.4f}, fastest {table['latency_ms'].min():.3f} ms"
            )
        self.out(f"[{done:>{len(str(self.total))}}/{self.total}] trial {index}: {what}{best}")


class HypervolumePlateau(tune.Stopper):
    """Stops the whole search once ``patience`` trials in a row have not grown the hypervolume."""

    def __init__(self, recorder: TrialRecorder, patience: int) -> None:
        self.recorder = recorder
        self.patience = patience

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.recorder.since_improvement >= self.patience


class TimeBudget(tune.Stopper):
    """Stops the whole search when what is left of ``search.time_budget_s`` (``seconds_left()``,
    counted from the command's start, earlier sessions of a resumed search included) is no more than
    what the end of the search will take (``end_s(rows)``, from the trials recorded so far: see
    :func:`end_estimate`)."""

    def __init__(self, recorder: TrialRecorder, seconds_left: Callable[[], float | None], end_s: Callable[[list[dict]], float]) -> None:
        self.recorder = recorder
        self.seconds_left = seconds_left
        self.end_s = end_s

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        left = self.seconds_left()
        return left is not None and left <= self.end_s(self.recorder.rows)


SHUTDOWN_S = 2.0  # seconds kept at the end of a time budget for Ray's shut-down (before the re-timing)
REPORT_S = 2.0  # and for the report (after it)
# Ray Tune stops a running trial by a call to its actor, which waits behind the trial's own work (a
# trial reports once, at its end), and kills the actor only after this long (TuneController's
# _actor_force_cleanup_timeout, fixed at 10 s in Ray 2.x). So a stop that finds trials running ends
# when they finish or after this, whichever comes first: in the 5-seed benchmark, whose trials of
# 1.5 epochs took about 70 s, Tune ended 8.5-13 s after the last trial's result, where 2 s were kept.
TUNE_STOP_S = 10.0


def trial_s(rows: list[dict]) -> float | None:
    """A median trial's seconds (pruning, fine-tune and measurement) among ``rows``; None before any.

    >>> trial_s([]), trial_s([{"time_prune_s": 0.5, "time_finetune_s": 2.0, "time_measure_s": 0.5}])
    (None, 3.0)
    """
    spent = [sum(float(r.get(k) or 0.0) for k in ("time_prune_s", "time_finetune_s", "time_measure_s")) for r in rows]
    spent = [s for s in spent if s == s and s > 0]
    return float(np.median(spent)) if spent else None


def teardown_s(rows: list[dict]) -> float:
    """Seconds from the time budget's stop of the trials to Ray shut down: the running trials end
    (as long as a median trial, at most :data:`TUNE_STOP_S`), then :data:`SHUTDOWN_S`.

    >>> teardown_s([]), teardown_s([{"time_prune_s": 0.5, "time_finetune_s": 2.0, "time_measure_s": 0.5}])
    (2.0, 5.0)
    >>> teardown_s([{"time_prune_s": 1.0, "time_finetune_s": 60.0, "time_measure_s": 9.0}])
    12.0
    """
    median = trial_s(rows)
    return SHUTDOWN_S + (min(TUNE_STOP_S, median) if median is not None else 0.0)


def end_estimate(rows: list[dict], measure, *, refine: Sequence[tuple[int, float]] = (), finetune_epochs: float = 1.0,
                 concurrency: int = 1, objectives: Objectives | None = None, trials_running: bool = True) -> float:
    """Seconds the end of a search takes, from the trials so far: the refinement (``search.refine``:
    its rungs ``refine``, each ``(policies, epochs)``, one after the other, with ``concurrency`` fine-tunes
    at a time, each as long as a trial's fine-tune scaled by the epochs), then the re-timing of the frontier in two passes
    (:func:`retiming_s`: the re-timing confirms each pass with another), and
    the stop of the running trials and Ray's shut-down (:func:`teardown_s`; only :data:`SHUTDOWN_S` once the trials
    have ended: ``trials_running=False``) and :data:`REPORT_S` for the report."""
    base = (teardown_s(rows) if trials_running else SHUTDOWN_S) + REPORT_S
    table, front = _feasible_front(rows, objectives)
    if front.empty:
        return base
    median = {k: float(table[k].median()) if k in table else 0.0 for k in ("time_prune_s", "time_finetune_s", "time_measure_s")}
    refining = 0.0
    for policies, epochs in refine:
        one = median["time_prune_s"] + median["time_finetune_s"] * epochs / max(finetune_epochs, 1e-9) + median["time_measure_s"]
        refining += -(-min(policies, len(front)) // concurrency) * one
    return base + refining + _retiming_s(table, front, measure, passes=2)


def _feasible_front(rows: list[dict], objectives: Objectives | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The feasible trials of ``rows`` and their Pareto frontier (both empty before any was timed)."""
    table = pd.DataFrame(rows)
    if table.empty or "latency_ms" not in table:
        return table[:0], table[:0]
    table = table[frontier.feasible_mask(table)]
    if table.empty:
        return table, table
    return table, table[frontier.frontier_table(table, (objectives or DEFAULT).mapping)["pareto"].to_numpy()]


def retiming_s(rows: list[dict], measure, *, objectives: Objectives | None = None, passes: int = 2) -> float:
    """Seconds the re-timing of the frontier takes (:func:`search.outcome.remeasure_frontier`): each
    frontier model and the dense one built once (as long as a median trial's pruning), then timed
    ``passes`` times (``measure.warmup + measure.repeats`` runs, each as long as the frontier's slowest
    model); 0 before any trial was timed.

    >>> rows = [{"accuracy": 0.8, "latency_ms": 100.0, "size_mb": 1.0, "time_prune_s": 1.0}]
    >>> retiming_s(rows, type("M", (), {"warmup": 2, "repeats": 8})), retiming_s(rows, type("M", (), {"warmup": 2, "repeats": 8}), passes=1)
    (6.0, 4.0)
    """
    return _retiming_s(*_feasible_front(rows, objectives), measure, passes=passes)


def _retiming_s(table: pd.DataFrame, front: pd.DataFrame, measure, *, passes: int) -> float:
    """:func:`retiming_s` of the feasible trials ``table`` and their frontier ``front``."""
    if front.empty:
        return 0.0
    models = len(front) + 1
    build = float(table["time_prune_s"].median()) if "time_prune_s" in table else 0.0
    timing = (measure.warmup + measure.repeats) * float(front["latency_ms"].max()) / 1000.0
    return models * (build + passes * timing)
