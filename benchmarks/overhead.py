"""Benchmark: per-trial framework overhead and trial throughput at 1 and 2 concurrent trials.

Framework overhead per trial = fit wall time x concurrency / trials - mean in-trial work, where
in-trial work is what the trial itself timed (prune + fine-tune + measure). It covers Ray
scheduling, the object store, Optuna sampling, reporting and the MLflow writes in the driver.
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
    }


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
    print("\n| concurrent trials | trials | fit wall | trials/min | in-trial work (median) | overhead per trial | overhead share | in trial function | outside trials |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['trials']} | {r['fit_wall_s']} s | {r['trials_per_min']} | {r['in_trial_work_s_median']} s | "
              f"{r['overhead_s_per_trial']} s | {100 * r['overhead_share']:.0f}% | {r['overhead_in_trial_function_s']} s | "
              f"{r['overhead_outside_trials_s']} s |")


if __name__ == "__main__":
    main()
