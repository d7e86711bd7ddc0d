"""``search.refine``: fine-tune the frontier's best candidates longer before the search reports.

A trial's fine-tune is short, so its accuracy is a proxy for what a real fine-tune would give,
and it can rank policies wrongly. With ``search.refine: {epochs: 5, candidates: 4}`` the driver
takes up to ``candidates`` frontier policies, one at a time as a slot frees (the frontier's ends
first, then the one the frontier, ranked with the results so far, most lacks a measurement at:
:func:`next_in_line`), fine-tunes each from the dense checkpoint for ``epochs`` (on Ray, with a
trial's resources) and records the result on
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
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import ray

from evaluators.tasks import TaskConfig, make_task
from evaluators.trial import FinetuneConfig, MeasureConfig, Reference, evaluate
from search import frontier
from spaces import Policy


CANDIDATES_TAG = "secateurs.refine_candidates"  # parent run: the run ids chosen for refinement, comma-separated
EPOCHS_TAG = "secateurs.refine_epochs"  # parent run: the epochs chosen for them (a resume keeps them)
COUNT_TAG = "secateurs.refine_count"  # parent run: how many the last rung refines, as planned (a resume goes on to it)


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
    rungs: int = 1         # successive halving: rungs of refinement, each keeping 1/reduction_factor of the last (1 = off)
    reduction_factor: int = 2  # each rung keeps 1/this of the policies and fine-tunes them this many times longer

    def __post_init__(self) -> None:
        if not 0 < self.epochs < float("inf"):
            raise ValueError(f"epochs: must be a number of epochs > 0, but got {self.epochs!r}")
        if isinstance(self.candidates, bool) or self.candidates < 1:
            raise ValueError(f"candidates: must be an integer >= 1, but got {self.candidates!r}")
        if self.share is not None and not 0 < self.share < 1:
            raise ValueError(f"share: must be a part of search.time_budget_s, 0 < share < 1, or null, but got {self.share!r}")
        if isinstance(self.rungs, bool) or not isinstance(self.rungs, int) or not 1 <= self.rungs <= 6:
            raise ValueError(f"rungs: must be an integer from 1 (no successive halving) to 6, but got {self.rungs!r}")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int) or self.reduction_factor < 2:
            raise ValueError(f"reduction_factor: must be an integer >= 2 (each rung keeps 1/reduction_factor), "
                             f"but got {self.reduction_factor!r}")

    @property
    def widening(self) -> int:
        """Policies in the first rung for each one in the last."""
        return self.reduction_factor ** (self.rungs - 1)

    def plan(self, epochs: float, count: int) -> list[tuple[int, float]]:
        """Each rung's (policies, epochs): ``count`` policies for ``epochs`` at the last rung, and
        ``reduction_factor`` times as many for 1/``reduction_factor`` of the epochs at each rung before.

        >>> RefineSettings(rungs=3).plan(2.0, 2)
        [(8, 0.5), (4, 1.0), (2, 2.0)]
        >>> RefineSettings().plan(2.0, 4)
        [(4, 2.0)]
        """
        eta, last = self.reduction_factor, self.rungs - 1
        return [(count * eta ** (last - r), round(epochs / eta ** (last - r), 6)) for r in range(self.rungs)]


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


def rungs_makespan(costs: list[tuple[float, float]], plan: list[tuple[int, float]], concurrency: int) -> float:
    """Seconds the rungs of ``plan`` (each ``(policies, epochs)``, from :meth:`RefineSettings.plan`)
    take, one after the other, for the candidates of ``costs``: each rung planned for the slowest of
    them it may keep (which ones survive is not known before).

    >>> rungs_makespan([(0, 10), (0, 20), (0, 30), (0, 40)], [(4, 0.5), (2, 1.0)], concurrency=2)
    65.0
    """
    slowest = sorted(costs, key=lambda c: c[0] + c[1], reverse=True)
    return sum(makespan(slowest[:count], epochs, concurrency) for count, epochs in plan)


def epochs_that_fit(seconds: float, costs: list[tuple[float, float]], *, concurrency: int, least: float,
                    settings: "RefineSettings | None" = None) -> float:
    """The most epochs, in tenths, that every fine-tune of ``costs`` (each ``(fixed seconds, seconds an
    epoch)``: a candidate's prune and timing, and its fine-tune's speed) can have with all of them
    done in ``seconds`` (:func:`makespan`); at least ``least``. With ``settings`` of more than one rung,
    ``costs`` are the first rung's candidates and the epochs are the last rung's (:func:`rungs_makespan`).

    >>> epochs_that_fit(100, [(3, 20)] * 4, concurrency=2, least=0.5)
    2.3
    >>> epochs_that_fit(100, [(3, 20), (3, 20), (3, 20), (3, 60)], concurrency=2, least=0.5)  # one slow: 3 fast ones beside it
    1.5
    >>> epochs_that_fit(10, [(3, 20)] * 4, concurrency=2, least=0.5)
    0.5
    """
    if not costs:
        return float(least)
    settings = settings or RefineSettings()
    count = -(-len(costs) // settings.widening)
    lo, hi = 0, 1 + int(10 * seconds / max(min(per for _, per in costs), 1e-9))
    while lo < hi:  # the largest tenth whose makespan fits
        mid = (lo + hi + 1) // 2
        if rungs_makespan(costs, settings.plan(mid / 10, count), concurrency) <= seconds:
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


def rung_column(score: str, rung: int) -> str:
    """The metric that keeps ``score`` after rung ``rung`` of the refinement."""
    return f"{score}_rung{rung}"


def survivors(rows: pd.DataFrame, count: int, senses: Mapping[str, str]) -> list[str]:
    """The ``count`` run ids of ``rows`` a rung keeps: the non-dominated on the objectives ``senses``
    (their rung scores and costs) first, then the next front, and of the front that does not fit
    whole, ones spread over its latency range (:func:`candidates`).

    >>> rows = pd.DataFrame({"run_id": list("abcd"), "accuracy": [0.9, 0.8, 0.7, 0.6], "latency_ms": [4, 2, 3, 1]})
    >>> survivors(rows, 2, {"accuracy": "max", "latency_ms": "min"})  # c is dominated by b
    ['d', 'a']
    """
    names = [n for n in senses if n in rows]
    left, kept = rows, []
    while len(kept) < count and len(left):
        front = left[frontier.non_dominated(left[names].to_numpy(float), [senses[n] for n in names])]
        if front.empty:  # rows with a missing value: never on a front, kept last in latency order
            front = left
        take = front["run_id"].tolist() if len(kept) + len(front) <= count else candidates(front, count - len(kept))
        kept += take
        left = left[~left["run_id"].isin(take)]
    return kept


def _in_search(row: dict[str, Any], score: str) -> float:
    earlier = row.get(f"{score}_in_search")
    return float(row[score] if earlier is None or earlier != earlier else earlier)


def _done(row: dict[str, Any], score: str, rung: int, epochs: float) -> float | None:
    """``row``'s ``score`` at ``rung`` if it was refined there for ``epochs`` (an earlier session's), else None."""
    value = row.get(rung_column(score, rung))
    if rung == 0 and value is None and row.get("refine_epochs") == epochs:  # recorded before rungs were kept
        value = row.get(score)
    return None if value is None or value != value else float(value)


def next_in_line(table: pd.DataFrame, covered: set[str], senses: Mapping[str, str]) -> list[str]:
    """The policies the refinement may take next, best first: those on the frontier as ranked now
    (:func:`search.frontier.feasible_frontier`: a refined policy at its measured score, the others at
    the score the refined pairs predict for them, not held back by its error: the refinement measures
    where the frontier is expected to be) that are not ``covered`` (refined, or being refined),
    farthest first, in places along the frontier's latency order, from the covered policies still on
    it; with none of those, from the fastest end. Each pick so fills the widest stretch of the frontier
    that no measurement at the refinement's fidelity covers.

    >>> t = pd.DataFrame({"run_id": list("abcde"), "accuracy": [0.5, 0.6, 0.7, 0.8, 0.9], "latency_ms": [1, 2, 3, 4, 5]})
    >>> senses = {"accuracy": "max", "latency_ms": "min"}
    >>> next_in_line(t, set(), senses)[0], next_in_line(t, {"a"}, senses)[0], next_in_line(t, {"a", "e"}, senses)
    ('a', 'e', ['c', 'b', 'd'])
    """
    if table.empty:
        return []
    front = table[frontier.feasible_frontier(table, dict(senses), caution=0.0)].sort_values("latency_ms", kind="stable")
    ids = front["run_id"].tolist()
    taken = [i for i, run_id in enumerate(ids) if run_id in covered]
    gap = {i: min((abs(i - j) for j in taken), default=float("inf")) for i, run_id in enumerate(ids) if run_id not in covered}
    return [ids[i] for i in sorted(gap, key=lambda i: (-gap[i], i))]


def refine_frontier(tracker: Any, table: pd.DataFrame, settings: RefineSettings, *, task: TaskConfig, checkpoint: bytes,
                    finetune: FinetuneConfig, measure: MeasureConfig, dense: dict[str, float], resources: dict[str, float],
                    out: Callable[[str], None], scores: list[str] = ("accuracy",), epochs: float | None = None,
                    count: int | None = None, senses: Mapping[str, str] | None = None, chosen: list[str] = (),
                    concurrency: int = 1, seconds: float | None = None,
                    costs: Mapping[str, tuple[float, float]] | None = None, deadline: float | None = None) -> list[str]:
    """Refine ``count`` (default ``settings.candidates``) policies of the search's trials ``table`` (rows
    with ``run_id``, ``latency_ms`` and the objectives) on Ray, for ``epochs`` (default
    ``settings.epochs``), in the rungs of ``settings.plan`` (the policies each later rung keeps chosen on
    the objectives ``senses``, default the ``scores`` to maximise and ``latency_ms``), and record the
    results on their runs (each score's search value kept as ``<score>_in_search``, each rung's as
    ``<score>_rung<r>``); returns the run ids refined at any rung. Ray must be running.

    The first rung's policies are chosen one at a time, ``concurrency`` fine-tuning at once: each next
    one when a slot is free, from the frontier as ranked with the results so far (:func:`next_in_line`),
    so that an estimate that pushes a measured policy off the frontier is measured in turn. ``chosen``
    (an earlier session's picks) come first. With ``seconds``, a policy is started only if its fine-tune
    (``costs``: its ``(fixed seconds, seconds an epoch)``, scaled by how long the fine-tunes ended so far
    took against theirs) ends within that many seconds of the start;
    the first rung stops early when no frontier policy is left to measure. With ``deadline`` (a
    ``time.perf_counter()`` value: when the time budget needs the re-timing to start), a fine-tune still
    running then is stopped (its worker killed, as Ray Tune stops trials at a time budget) and its run
    keeps the search's values: a machine slower than planned costs refinements, not the budget."""
    epochs = settings.epochs if epochs is None else epochs
    plan = settings.plan(epochs, settings.candidates if count is None else count)
    if table.empty:
        return []
    senses = dict(senses or {**{q: "max" for q in scores}, "latency_ms": "min"})
    how = f" (search.refine.share: what fits in {settings.share:g} of the time budget)" if settings.share else ""
    asked = settings.candidates * settings.widening
    fewer = f"; {asked} asked for, {plan[0][0]} fit in the time budget" if count is not None and count < settings.candidates else ""
    halving = (f" in {settings.rungs} rungs of successive halving: " + ", ".join(f"{n} for {e:g}" for n, e in plan)
               if settings.rungs > 1 else "")
    out(f"refining up to {plan[0][0]} frontier policies: {epochs:g} epochs of fine-tuning each{halving}{how}{fewer}; "
        "each chosen as a slot frees, on the frontier as ranked with the results so far (search.refine)")
    # a resumed search whose driver was killed while refining: runs already refined at a rung keep
    # their result, and each score in search of every run is the one the search measured
    rows = table.set_index("run_id").to_dict("index")
    remote = ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"])(_refine_one)
    checkpoint_ref = ray.put(checkpoint)
    q = scores[0]

    def record(run_id: str, refined: dict[str, float], rung: int, rung_epochs: float) -> None:
        kept = {f"{s}_in_search": _in_search(rows[run_id], s) for s in scores}
        spent = float(rows[run_id].get("time_refine_s") or 0.0) if rung else 0.0
        update = {**refined, **kept, **{rung_column(s, rung): refined[s] for s in scores}, "refine_epochs": rung_epochs,
                  "time_refine_s": spent + refined["time_refine_s"]}
        tracker.update_metrics(run_id, update, step=2 + rung)
        rows[run_id].update(update)
        out(f"  {run_id[:12]}: {q} {kept[f'{q}_in_search']:.4f} after the search's fine-tune, {refined[q]:.4f} after {rung_epochs:g} epochs")

    def start(run_id: str, rung_epochs: float):
        longer = dataclasses.replace(finetune, epochs=rung_epochs, max_steps=None)
        (policy,) = tracker.policies([run_id]).values()
        return remote.remote(policy, task, checkpoint_ref, longer, measure, Reference.from_record(dense))

    # each running fine-tune's start and planned seconds (``costs``), and how long the ended ones took
    # against their plan: the machine's pace, by which each next start is judged
    planned: dict = {}
    paces: list[float] = []

    def plan_s(run_id: str, rung_epochs: float) -> float:
        """The seconds ``costs`` plan for ``run_id``'s fine-tune of ``rung_epochs``."""
        fixed, per_epoch = costs[run_id]
        return fixed + rung_epochs * per_epoch

    def launch(run_id: str, rung_epochs: float):
        began_at = time.perf_counter()
        future = start(run_id, rung_epochs)
        if costs is not None and run_id in costs:
            planned[future] = (began_at, plan_s(run_id, rung_epochs))
        return future

    def pace() -> float:
        """The mean ratio of the ended fine-tunes' seconds to their plan (1 before any ended)."""
        return sum(paces) / len(paces) if paces else 1.0

    def finished(running: dict, rung: int, rung_epochs: float) -> bool:
        """Wait for one of ``running`` to end and record it; False (the others stopped) at the deadline."""
        timeout = None if deadline is None else max(deadline - time.perf_counter(), 0.0)
        ready, _ = ray.wait(list(running), num_returns=1, timeout=timeout)
        if ready:
            run_id = running.pop(ready[0])
            began_at, plan_s = planned.pop(ready[0], (None, 0.0))
            if plan_s > 0:
                paces.append((time.perf_counter() - began_at) / plan_s)
            record(run_id, ray.get(ready[0]), rung, rung_epochs)
            return True
        for future, run_id in running.items():
            ray.cancel(future, force=True)
            stopped.append(run_id)
            out(f"  {run_id[:12]}: stopped at the time budget before its {rung_epochs:g} epochs ended; "
                f"it keeps {'the search' if rung == 0 else f'rung {rung - 1}'}'s {q}")
        running.clear()
        return False

    def late() -> bool:
        return deadline is not None and time.perf_counter() >= deadline

    # the first rung, one policy at a time as slots free up
    keep, rung_epochs = plan[0]
    chosen, resumed = list(chosen), [r for r in chosen if any(_done(rows[r], s, 0, rung_epochs) is None for s in scores)]
    began, running, stopped = time.perf_counter(), {}, []
    while True:
        while len(running) < max(concurrency, 1) and not late():
            if resumed:
                run_id = resumed.pop(0)
            else:
                if len(chosen) >= keep:
                    break
                line = next_in_line(pd.DataFrame([{"run_id": r, **v} for r, v in rows.items()]), set(chosen), senses)
                fits = [r for r in line if seconds is None or costs is None or r not in costs
                        or time.perf_counter() - began + pace() * plan_s(r, rung_epochs) <= seconds]
                if not fits:
                    break
                run_id = fits[0]
                chosen.append(run_id)
                # a resume goes on from these, for as long, to as many
                tracker.set_tags({CANDIDATES_TAG: ",".join(chosen), EPOCHS_TAG: f"{epochs:g}", COUNT_TAG: str(plan[-1][0])})
            running[launch(run_id, rung_epochs)] = run_id
        if not running or not finished(running, 0, rung_epochs):
            break
    if len(chosen) < keep and not stopped and not late():
        out(f"  {len(chosen)} refined: the frontier as ranked has no other policy to measure"
            f"{' that fits in the time left' if seconds is not None else ''}")
    for run_id in chosen:  # an earlier session's result (old records: only rung 0's value)
        for s in scores:
            rows[run_id][rung_column(s, 0)] = _done(rows[run_id], s, 0, rung_epochs)
    measured = rung_runs = [r for r in chosen if all(rows[r][rung_column(s, 0)] is not None for s in scores)]
    for rung, (keep, rung_epochs) in enumerate(plan[1:], start=1):
        if stopped or late():
            out(f"  not going on to rung {rung}: the time budget is spent")
            break
        table = pd.DataFrame([{"run_id": r, **{n: rows[r].get(n) for n in senses if n not in scores},
                               **{s: rows[r][rung_column(s, rung - 1)] for s in scores}} for r in rung_runs])
        # an earlier session's choice stands: the policies it refined at this rung are kept first, and
        # only the rest of the count is chosen now (a killed session's partial re-timing can have moved
        # the latencies the choice ranks on, and a second choice would refine a second policy)
        before = table["run_id"].isin([r for r in rung_runs if all(_done(rows[r], s, rung, rung_epochs) is not None for s in scores)])
        kept = survivors(table[before], keep, senses)
        rung_runs = kept + survivors(table[~before], keep - len(kept), senses)
        out(f"  rung {rung}: kept {len(rung_runs)} of {len(table)} on {', '.join(senses)} after {plan[rung - 1][1]:g} epochs")
        todo = [r for r in rung_runs if any(_done(rows[r], s, rung, rung_epochs) is None for s in scores)]
        # the slowest first (the least pruned: the highest latency), as epochs_that_fit planned them
        todo.sort(key=lambda r: -float(rows[r].get("latency_ms") or 0.0))
        running = {launch(run_id, rung_epochs): run_id for run_id in todo}
        while running and finished(running, rung, rung_epochs):
            pass
        for run_id in rung_runs:  # an earlier session's result at this rung (old records: only rung 0's value)
            for s in scores:
                rows[run_id][rung_column(s, rung)] = _done(rows[run_id], s, rung, rung_epochs)
    tracker.set_tags_on(measured, {"secateurs.refined": "true"})
    return measured
