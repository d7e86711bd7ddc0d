"""Benchmark: per-trial framework overhead and trial throughput at 1 and 2 concurrent trials.

Framework overhead per trial = fit wall time x concurrency / trials - mean in-trial work, where
in-trial work is what the trial itself timed (prune + fine-tune + measure). It covers Ray
scheduling, the object store, Optuna sampling, reporting and the MLflow writes in the driver, but
also two costs that do not grow with the trials: ``fit()``'s start-up (Tune's set-up, a worker
process per slot importing torch and the evaluators, the first trial building the task) and the
tail (slots idle while the last trials finish, as long as trials differ in length). The timeline
of the trials (each records when its function started, ``time_started_unix_s``, and how long it
ran) tells them apart: start-up, the gap between one trial's end and the next one's start in a
slot (the per-trial overhead; ``steady share`` is it over the mean trial wall) and tail.
Runs each setting back to back in one process; writes benchmarks/results/overhead.json.

    python benchmarks/overhead.py [--config configs/quickstart.yaml] [--trials 16] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from search.config import load_config
from search.driver import run_search

ROOT = Path(__file__).resolve().parents[1]


def one(config_path: str, overrides: list[str], concurrency: int, trials: int, tmp: Path) -> dict:
    uri = f"sqlite:///{tmp / f'mlflow-{concurrency}.db'}"
    config = load_config(config_path, [*overrides, f"search.max_concurrent={concurrency}", f"search.num_trials={trials}",
                                       f"search.storage_path={tmp / 'ray'}"])
    result = run_search(config, config_name=f"overhead-c{concurrency}", tracking_uri=uri, out=lambda line: None)
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    fit_wall = parent.data.metrics["fit_wall_s"]
    runs = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}' and tags.`secateurs.kind` = 'trial'", max_results=1000)
    runs = [r for r in runs if r.info.status == "FINISHED"]
    work = [r.data.metrics["time_prune_s"] + r.data.metrics["time_finetune_s"] + r.data.metrics["time_measure_s"] for r in runs]
    per_trial_wall = fit_wall * concurrency / len(runs)
    overhead = per_trial_wall - statistics.mean(work)
    trial_wall = [r.data.metrics.get("time_trial_s", float("nan")) for r in runs]
    in_worker = statistics.mean(trial_wall) - statistics.mean(work)  # inside the trial function, outside its phases
    timeline = slot_gaps([(r.data.metrics["time_started_unix_s"], r.data.metrics["time_started_unix_s"] + r.data.metrics["time_trial_s"])
                          for r in runs], parent.data.metrics["fit_started_unix_s"], fit_wall, concurrency)
    return {
        "concurrency": concurrency,
        "trials": len(runs),
        "search_wall_s": round(result.wall_s, 2),
        "fit_wall_s": round(fit_wall, 2),
        "trials_per_min": round(60 * len(runs) / fit_wall, 1),
        "in_trial_work_s_median": round(statistics.median(work), 3),
        "in_trial_work_s_range": [round(min(work), 3), round(max(work), 3)],
        "overhead_s_per_trial": round(overhead, 3),
        "overhead_share": round(overhead / per_trial_wall, 3),
        "overhead_in_trial_function_s": round(in_worker, 3),   # building the task, the policy, reporting
        "overhead_outside_trials_s": round(overhead - in_worker, 3),  # Ray scheduling, actor reuse, the driver's sampling and MLflow writes
        **timeline,
        "steady_overhead_share": round(timeline["gap_between_trials_s"] / statistics.mean(trial_wall), 4),
    }


def slot_gaps(spans: list[tuple[float, float]], fit_started: float, fit_wall: float, concurrency: int) -> dict[str, float]:
    """Where a slot (one of ``concurrency`` trials at a time) stood idle during ``fit()``, from each
    trial function's start and end: the start-up (fit's start to a slot's first trial), the gap
    between one trial's end and the next one's start in a slot (Ray scheduling, actor reuse, the
    searcher's suggestion, the driver's MLflow writes: the per-trial framework overhead), and the
    tail (a slot's last trial's end to fit's end, waiting for the other slots' last trials).

    >>> slot_gaps([(1.0, 5.0), (2.0, 4.0), (4.5, 9.0), (5.25, 8.0)], 0.0, 10.0, 2)
    {'startup_s': 1.5, 'gap_between_trials_s': 0.375, 'tail_s': 1.5}
    """
    ends: list[float] = []  # the last end of each slot
    starts, gaps = [], []
    for start, end in sorted(spans):
        free = [i for i, e in enumerate(ends) if e <= start]
        if free and len(ends) >= concurrency:
            slot = max(free, key=lambda i: ends[i])  # the slot that freed up last before this start
            gaps.append(start - ends[slot])
            ends[slot] = end
        else:
            starts.append(start)
            ends.append(end)
    return {"startup_s": round(statistics.mean(s - fit_started for s in starts), 3),
            "gap_between_trials_s": round(statistics.mean(gaps), 3) if gaps else float("nan"),
            "tail_s": round(statistics.mean(fit_started + fit_wall - e for e in ends), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overhead.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for concurrency in (1, 2):
            rows.append(one(args.config, args.overrides, concurrency, args.trials, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"config": args.config, "overrides": args.overrides, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2) + "\n")
    print("\n| concurrent trials | trials | fit wall | trials/min | in-trial work (median) | overhead per trial | overhead share | "
          "fit start-up | gap between trials | steady share | tail |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['trials']} | {r['fit_wall_s']} s | {r['trials_per_min']} | {r['in_trial_work_s_median']} s | "
              f"{r['overhead_s_per_trial']} s | {100 * r['overhead_share']:.0f}% | {r['startup_s']} s | {r['gap_between_trials_s']} s | "
              f"{100 * r['steady_overhead_share']:.1f}% | {r['tail_s']} s |")


if __name__ == "__main__":
    main()
