"""The end of a search: the frontier re-timed together with the dense model, tagged, logged and
reported. MLflow is the record: everything here is computed from what it holds."""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Callable

import pandas as pd

from evaluators.tasks import Task
from evaluators.trial import Deployments, MeasureConfig
from search import fidelity, frontier
from search.objectives import DEFAULT, Objectives
from search.tracking import SearchTracker, ui_command
from spaces import Policy

Log = Callable[[str], None]


@dataclasses.dataclass
class SearchResult:
    """What a finished search left in MLflow, plus its tables for the caller."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    trials: pd.DataFrame      # one row per completed trial (run_id, trial, kind, metrics, ratio.<group>, pareto)
    frontier: pd.DataFrame    # the non-dominated rows of ``trials``, with ``policy`` (the policy.json each ran)
    dense: dict[str, float]
    num_failed: int
    wall_s: float
    status: str = "FINISHED"  # MLflow status of the parent run: FINISHED, KILLED or FAILED
    first_error: str | None = None  # the error of the first failed trial (its secateurs.error tag)


def format_frontier(table: pd.DataFrame, objectives: Objectives | None = None) -> str:
    objectives = objectives or DEFAULT
    scores = [c for q in objectives.quality for c in (q, _change(q), q + fidelity.SUFFIX, q + fidelity.ERROR) if c in table]
    compress = [c for c, used in (("blocks_dropped", lambda s: s.fillna(0) > 0), ("quantization", lambda s: s.fillna("none") != "none"))
                if c in table and used(table[c]).any()]  # shown when the search dropped blocks or quantized
    columns = ["trial", "criterion", *compress, *scores, "latency_ms", "size_mb", "macs", "params", "run_id"]
    shown = table.sort_values("latency_ms")[columns].copy()
    shown["run_id"] = shown["run_id"].str[:12]
    integers = ["trial", "macs", "params", *(["blocks_dropped"] if "blocks_dropped" in compress else [])]
    shown[integers] = shown[integers].fillna(0).astype(int)
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def _change(score: str) -> str:
    """The column of a score's change against the dense model (``accuracy_drop`` for accuracy)."""
    return "accuracy_drop" if score == "accuracy" else f"{score}_change"


def _trials(tracker: SearchTracker, objectives: Objectives) -> tuple[pd.DataFrame, int]:
    rows, failed, _ = tracker.trial_table()
    table = pd.DataFrame(rows, columns=None if rows else ["run_id", "trial", "kind", "criterion", *objectives.names])
    return table.sort_values("trial").reset_index(drop=True), failed


STEADY = 0.10  # two timings of a model agree when their ratios to the dense model differ by at most this part


def remeasure_frontier(tracker: SearchTracker, task: Task, checkpoint: str, measure: MeasureConfig, dense: dict[str, float],
                       out: Log, passes: int = 4, objectives: Objectives | None = None, deadline: float | None = None) -> None:
    """Time the dense model and the frontier's policies again, together (round-robin, with no trial
    running), and record those latencies; the in-search ones stay as ``latency_ms_in_search``.

    One pass is not trusted alone: the dense model and the frontier are timed together again until
    every frontier policy's latency relative to the dense model agrees with its previous timing
    within :data:`STEADY` (a busy neighbour once put a pruned ResNet-20 at 1.26x its dense model in one
    pass), and while new timings reshape the frontier; at most ``passes`` passes. What is recorded is
    the last pass, so the reported frontier and the dense latency it is compared with come from one
    measurement; if the passes never agreed, the log names the policies whose ratios moved. Each
    policy is the one its trial ran (policy.json); its artifact is built once, for all the passes
    (:class:`evaluators.trial.Deployments`). With ``deadline`` (a ``time.perf_counter()`` value:
    the time budget's end, less the report), a pass that would end after it (the last one's timing,
    and a build for each policy new to the frontier) is not started, and the log says why. ``dense`` is updated in place."""
    dense_run_id = tracker.child_runs("dense").iloc[0]["run_id"]
    # a session killed while re-timing left some latencies re-timed: their in-search ones are kept aside
    dense_in_search = dense.get("latency_ms_in_search", dense["latency_ms"])
    in_search: dict[str, float] = {}
    ratios: dict[str, list[float]] = {}  # each policy's latency / the dense latency, pass by pass

    def steady(run_id: str) -> bool:
        seen = ratios.get(run_id, [])
        return len(seen) >= 2 and abs(seen[-1] / seen[-2] - 1) <= STEADY

    timed: set[str] = set()
    # each policy's artifact is built (pruned, exported, quantized) once and timed in every pass
    with Deployments(task, checkpoint, measure) as ready:
        for _ in range(passes):
            table, _ = _trials(tracker, objectives or DEFAULT)
            front = table[frontier.feasible_frontier(table, (objectives or DEFAULT).mapping)] if len(table) else table
            ids = set(front["run_id"]) if len(front) else set()
            if not ids or (ids <= timed and all(steady(r) for r in ids)):
                return
            # the last pass's timing for as many models, and a build for each policy it did not time (only
            # its artifacts are held)
            need = ready.pass_s(timing_s * (len(ids) + 1) / (len(timed) + 1), len(ids - timed)) if timed else 0.0
            if timed and deadline is not None and time.perf_counter() + need > deadline:
                new, moved = len(ids - timed), sum(not steady(r) for r in ids & timed)
                out(f"not re-timing the frontier again: the time budget leaves too little for a pass ({need:.1f} s); "
                    f"{new} of its {len(ids)} policies were not timed in the last pass beside the dense model, "
                    f"{moved} not confirmed by a second timing")
                return
            out(f"re-measuring the latency of the dense model and {len(front)} frontier policies, together")
            began, builds = time.perf_counter(), len(ready.built)
            policies = {"dense": Policy(criterion="l1", ratios={}), **tracker.policies(list(front["run_id"]))}
            for row in front.to_dict("records"):
                earlier = row.get("latency_ms_in_search")
                in_search.setdefault(row["run_id"], row["latency_ms"] if earlier is None or earlier != earlier else earlier)
            fresh = ready.latencies(policies)
            dense_fresh = fresh.pop("dense")
            dense.update(dense_fresh)
            tracker.update_metrics(dense_run_id, {**dense_fresh, "latency_ms_in_search": dense_in_search})
            for run_id, metrics in fresh.items():
                tracker.update_metrics(run_id, {**metrics, "latency_ms_in_search": in_search[run_id]})
                ratios.setdefault(run_id, []).append(metrics["latency_ms"] / dense_fresh["latency_ms"])
            timed, timing_s = set(fresh), time.perf_counter() - began - sum(ready.built[builds:])
    # the frontier as the last pass left it (its timings may have reshaped it once more)
    table, _ = _trials(tracker, objectives or DEFAULT)
    final = list(table[frontier.feasible_frontier(table, (objectives or DEFAULT).mapping)]["run_id"]) if len(table) else []
    unsteady = [r for r in final if r in timed and not steady(r)]
    moved = [r for r in unsteady if len(ratios.get(r, [])) >= 2]  # timed again and not agreeing
    once = len(unsteady) - len(moved)  # joined the frontier in the last pass: nothing to agree with yet
    after = [r for r in final if r not in timed]  # joined it after the last pass: not timed beside the dense model then
    parts = []
    if after:
        parts.append(f"{len(after)} frontier policies joined the frontier after the last pass and keep latencies not timed "
                     "beside the dense model then (" + ", ".join(r[:12] for r in after[:3]) + ("..." if len(after) > 3 else "") + ")")
    if moved:
        parts.append(f"the latency of {len(moved)} frontier policies still moved by more than {STEADY:.0%} between passes ("
                     + ", ".join(f"{r[:12]}: " + ", ".join(f"{x:.3f}" for x in ratios[r]) + "x dense" for r in moved[:3])
                     + "); the machine was busy")
    if once:
        parts.append(f"{once} frontier policies joined the frontier in the last pass and were timed once")
    if parts:
        out(f"warning: after {passes} passes " + "; ".join(parts) + ": the last pass is recorded")


def finish(tracker: SearchTracker, dense: dict[str, float], config_name: str, status: str, started: float, out: Log,
           objectives: Objectives | None = None) -> SearchResult:
    """Compute the frontier from MLflow, tag it (``secateurs.pareto``), log ``frontier.csv`` and
    ``frontier.png`` and the search's totals, end the parent run with ``status`` and print the report."""
    objectives = objectives or DEFAULT
    trials, num_failed = _trials(tracker, objectives)
    trials = fidelity.expected(trials, objectives.quality)  # search.refine: the scores compared at one fidelity
    if len(trials):
        trials["pareto"] = frontier.feasible_frontier(trials, objectives.mapping).to_numpy()
        tracker.tag_pareto(dict(zip(trials["run_id"], trials["pareto"].astype(bool))))
        front = trials[trials["pareto"]].sort_values("latency_ms").reset_index(drop=True)
        policies = tracker.policies(list(front["run_id"]))  # the policies the frontier's trials ran (policy.json)
        front["policy"] = [policies[run_id].to_json() for run_id in front["run_id"]]
    else:
        front = trials
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "frontier.csv"
        front.drop(columns=["pareto"], errors="ignore").to_csv(csv_path, index=False)
        tracker.log_artifact(csv_path)
        png_path = frontier.plot_frontier(trials, Path(tmp) / "frontier.png", dense=dense, title=config_name, objectives=objectives)
        tracker.log_artifact(png_path)
    wall_s = time.perf_counter() - started
    tracker.log_search_metrics({
        "trials_completed": len(trials),
        "trials_failed": num_failed,
        "frontier_size": len(front),
        "hypervolume_final": frontier.normalised_hypervolume(front, dense, objectives) if len(front) else 0.0,
        "wall_time_s": wall_s,
    })
    tracker.end_search(status)
    if len(front):
        out(f"\nPareto frontier ({objectives.describe()}):\n" + format_frontier(front, objectives))
    else:
        out("\nno trial completed: the frontier is empty")
    out(f"\n{len(trials)} trials completed, {num_failed} failed, {len(front)} on the frontier, "
        f"{wall_s:.1f} s wall time ({status.lower()})")
    if tracker.tracking_uri.startswith(("http://", "https://")):
        out(f"MLflow: open {tracker.tracking_uri.rstrip('/')}/{tracker.experiment_url()}")
    else:
        out(f"MLflow: {ui_command(tracker.tracking_uri)}\n  then open http://127.0.0.1:5000/{tracker.experiment_url()}")
    return SearchResult(tracker.tracking_uri, tracker.experiment_id, tracker.parent_run_id, trials, front, dense, num_failed, wall_s, status,
                        _first_error(tracker) if num_failed else None)


def _first_error(tracker: SearchTracker) -> str | None:
    runs = tracker.child_runs("trial", "baseline")
    failed = runs[runs["status"] == "FAILED"] if len(runs) else runs
    if not len(failed) or "tags.secateurs.error" not in failed:
        return None
    row = failed.iloc[0]
    return f"trial {row.get('tags.secateurs.trial', '?')}: {row['tags.secateurs.error']}"
