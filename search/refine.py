"""``search.refine``: fine-tune the frontier's best candidates longer before the search reports.

A trial's fine-tune is short, so its accuracy is a proxy for what a real fine-tune would give,
and it can rank policies wrongly. With ``search.refine: {epochs: 5, candidates: 4}`` the driver
takes up to ``candidates`` frontier policies spread over its latency range, fine-tunes each from
the dense checkpoint for ``epochs`` (on Ray, with a trial's resources) and records the result on
the trial's run: ``accuracy`` (and ``accuracy_drop``) become the refined values, the short
fine-tune's stay as ``accuracy_in_search``, and ``refine_epochs`` / ``time_refine_s`` say what it
cost. The frontier and ``secateurs pick`` then compare every policy at that fidelity: the refined
accuracies, and for the others the gain the refined pairs predict (:mod:`search.fidelity`).

With ``search.time_budget_s``, ``share: 0.4`` gives the refinement that part of the budget instead
of a fixed length: the trials stop when the time left is the share (or what ``epochs`` needs, if
more) plus the re-timing, and each candidate is then fine-tuned for as many epochs as fit in 0.9
of the time left (at least ``epochs``), planned from each candidate's own trial (its prune, timing
and fine-tune seconds). A larger budget so buys longer fine-tunes for the policies ``pick`` chooses
from, not only more trials.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np
import pandas as pd
import ray

from evaluators.tasks import TaskConfig, make_task
from evaluators.trial import FinetuneConfig, MeasureConfig, Reference, evaluate
from spaces import Policy


CANDIDATES_TAG = "secateurs.refine_candidates"  # parent run: the run ids chosen for refinement, comma-separated
EPOCHS_TAG = "secateurs.refine_epochs"  # parent run: the epochs chosen for them (a resume keeps them)


def chosen_before(tags: dict[str, str]) -> list[str]:
    """The run ids an earlier session of the search chose to refine (from the parent run's tags)."""
    return [run_id for run_id in tags.get(CANDIDATES_TAG, "").split(",") if run_id]


@dataclasses.dataclass(frozen=True)
class RefineSettings:
    """``search.refine``: a longer fine-tune for the best frontier candidates (null = off)."""

    __pydantic_config__ = {"extra": "forbid"}

    epochs: float = 5.0    # the fine-tune each candidate gets (from the dense checkpoint, as a trial's)
    candidates: int = 4    # at most this many frontier policies, spread over its latency range
    share: float | None = None  # with search.time_budget_s: this part of it for the refinement, epochs as many as fit (>= epochs)

    def __post_init__(self) -> None:
        if not 0 < self.epochs < float("inf"):
            raise ValueError(f"epochs: must be a number of epochs > 0, but got {self.epochs!r}")
        if isinstance(self.candidates, bool) or self.candidates < 1:
            raise ValueError(f"candidates: must be an integer >= 1, but got {self.candidates!r}")
        if self.share is not None and not 0 < self.share < 1:
            raise ValueError(f"share: must be a part of search.time_budget_s, 0 < share < 1, or null, but got {self.share!r}")


def makespan(costs: list[tuple[float, float]], epochs: float, concurrency: int) -> float:
    """Seconds until the last of the fine-tunes ``costs`` (each ``(fixed seconds, seconds an epoch)``)
    ends, each of ``epochs``, ``concurrency`` at a time, started longest first, each in the first
    slot free. (:func:`refine_frontier` submits them by latency, highest first: the same order when
    the least pruned model is the slowest to fine-tune, as in the first benchmark seed I timed.)

    >>> makespan([(1, 10), (1, 10), (1, 30)], epochs=1.0, concurrency=2)
    31.0
    """
    slots = [0.0] * max(concurrency, 1)
    for fixed, per_epoch in sorted(costs, key=lambda c: c[0] + epochs * c[1], reverse=True):
        first = slots.index(min(slots))
        slots[first] += fixed + epochs * per_epoch
    return max(slots)


def epochs_that_fit(seconds: float, costs: list[tuple[float, float]], *, concurrency: int, least: float) -> float:
    """The most epochs, in tenths, that every fine-tune of ``costs`` (each ``(fixed seconds, seconds an
    epoch)``: a candidate's prune and timing, and its fine-tune's speed) can have with all of them
    done in ``seconds`` (:func:`makespan`); at least ``least``.

    >>> epochs_that_fit(100, [(3, 20)] * 4, concurrency=2, least=0.5)
    2.3
    >>> epochs_that_fit(100, [(3, 20), (3, 20), (3, 20), (3, 60)], concurrency=2, least=0.5)  # one slow: 3 fast ones beside it
    1.5
    >>> epochs_that_fit(10, [(3, 20)] * 4, concurrency=2, least=0.5)
    0.5
    """
    if not costs:
        return float(least)
    lo, hi = 0, 1 + int(10 * seconds / max(min(per for _, per in costs), 1e-9))
    while lo < hi:  # the largest tenth whose makespan fits
        mid = (lo + hi + 1) // 2
        if makespan(costs, mid / 10, concurrency) <= seconds:
            lo = mid
        else:
            hi = mid - 1
    return float(max(lo / 10, least))


def candidates(front: pd.DataFrame, count: int) -> list[str]:
    """Up to ``count`` run ids of ``front``, spread evenly over its latency range (both ends included).

    >>> front = pd.DataFrame({"run_id": list("abcdef"), "latency_ms": [6, 1, 5, 2, 4, 3]})
    >>> candidates(front, 3)
    ['b', 'f', 'a']
    >>> candidates(pd.DataFrame(), 3)  # no trial recorded (a time budget spent before the first)
    []
    """
    if front.empty:
        return []
    ordered = front.sort_values("latency_ms", kind="stable")["run_id"].tolist()
    if len(ordered) <= count:
        return ordered
    picks = np.unique(np.round(np.linspace(0, len(ordered) - 1, count)).astype(int))
    return [ordered[i] for i in picks]


def _refine_one(policy: Policy, task: TaskConfig, checkpoint: bytes, finetune: FinetuneConfig, measure: MeasureConfig,
                dense: Reference) -> dict[str, float]:
    started = time.perf_counter()
    metrics = evaluate(policy, make_task(task), checkpoint, finetune, measure, dense=dense)
    return {**metrics.scores, **{k: v for k, v in metrics.changes.items() if k not in ("macs_change", "params_change")},
            "time_refine_s": time.perf_counter() - started}


def _in_search(row: dict[str, Any], score: str) -> float:
    earlier = row.get(f"{score}_in_search")
    return float(row[score] if earlier is None or earlier != earlier else earlier)


def refine_frontier(tracker: Any, front: pd.DataFrame, settings: RefineSettings, *, task: TaskConfig, checkpoint: bytes,
                    finetune: FinetuneConfig, measure: MeasureConfig, dense: dict[str, float], resources: dict[str, float],
                    out: Callable[[str], None], scores: list[str] = ("accuracy",), epochs: float | None = None,
                    count: int | None = None) -> list[str]:
    """Refine ``count`` (default ``settings.candidates``) candidates of ``front`` (rows with ``run_id``,
    ``latency_ms`` and the ``scores``) on Ray, for ``epochs`` (default ``settings.epochs``), and record
    the results on their runs (each score's search value kept as ``<score>_in_search``); returns the
    run ids refined. Ray must be running."""
    chosen = candidates(front, settings.candidates if count is None else count)
    if not chosen:
        return []
    epochs = settings.epochs if epochs is None else epochs
    # chosen once: a resume refines these, for as long, whatever the frontier became
    tracker.set_tags({CANDIDATES_TAG: ",".join(chosen), EPOCHS_TAG: f"{epochs:g}"})
    how = f" (search.refine.share: what fits in {settings.share:g} of the time budget)" if settings.share else ""
    fewer = f"; {settings.candidates} asked for, {len(chosen)} fit in the time budget" if count is not None and count < settings.candidates else ""
    out(f"refining {len(chosen)} frontier policies: {epochs:g} epochs of fine-tuning each{how}{fewer} (search.refine)")
    # a resumed search whose driver was killed while refining: runs already refined keep their
    # result, and each score in search of every run is the one the search measured
    rows = front.set_index("run_id").to_dict("index")
    done = {run_id for run_id in chosen if rows[run_id].get("refine_epochs") == epochs}
    policies = tracker.policies(chosen)
    longer = dataclasses.replace(finetune, epochs=epochs, max_steps=None)
    remote = ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"])(_refine_one)
    checkpoint_ref = ray.put(checkpoint)
    # the slowest first (the least pruned: the highest latency), as epochs_that_fit planned them
    slowest_first = sorted((r for r in chosen if r not in done), key=lambda r: -float(rows[r].get("latency_ms") or 0.0))
    futures = {run_id: remote.remote(policies[run_id], task, checkpoint_ref, longer, measure, Reference.from_record(dense))
               for run_id in slowest_first}
    for run_id, future in futures.items():
        refined = ray.get(future)
        kept = {f"{q}_in_search": _in_search(rows[run_id], q) for q in scores}
        tracker.update_metrics(run_id, {**refined, **kept, "refine_epochs": epochs}, step=2)
        q = scores[0]
        out(f"  {run_id[:12]}: {q} {kept[f'{q}_in_search']:.4f} after the search's fine-tune, {refined[q]:.4f} after {epochs:g} epochs")
    tracker.set_tags_on(chosen, {"secateurs.refined": "true"})
    return chosen
