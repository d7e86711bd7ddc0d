"""Benchmark: the quickstart search end to end, as a user runs it, cold (dense model not cached) and warm.

Runs `secateurs search configs/quickstart.yaml` in a fresh directory with a fresh cache, twice,
and reads what MLflow recorded. Writes benchmarks/results/quickstart.json and prints a
Markdown table for the README.

    python benchmarks/quickstart.py [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def run_once(workdir: Path, cache: Path) -> dict:
    env = {**os.environ, "SECATEURS_CACHE": str(cache)}
    env.pop("MLFLOW_TRACKING_URI", None)
    secateurs = Path(sys.executable).with_name("secateurs")
    start = time.perf_counter()
    proc = subprocess.run([str(secateurs), "search", str(ROOT / "configs" / "quickstart.yaml")], cwd=workdir, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"quickstart failed:\n{proc.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("secateurs-quickstart")
    parent = client.search_runs([experiment.experiment_id], "tags.`secateurs.kind` = 'search'", order_by=["start_time DESC"], max_results=1)[0]
    base = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    dense = client.search_runs([experiment.experiment_id], f"{base} and tags.`secateurs.kind` = 'dense'")[0].data.metrics
    trials = client.search_runs([experiment.experiment_id], f"{base} and tags.`secateurs.kind` = 'trial'", max_results=1000)
    baselines = client.search_runs([experiment.experiment_id], f"{base} and tags.`secateurs.kind` = 'baseline'", max_results=1000)
    done = [t for t in trials if t.info.status == "FINISHED"]
    pruned = [t for t in done if any(k.startswith("ratio.") for k in t.data.params)]
    faster = [t for t in pruned if t.data.metrics["latency_ms"] < dense["latency_ms"]]
    smaller = [t for t in pruned if t.data.metrics["size_mb"] < dense["size_mb"]]
    either = [t for t in pruned if t in faster or t in smaller]
    front = [t for t in done + baselines if t.data.tags.get("secateurs.pareto") == "true"]
    return {
        "wall_s": round(wall, 1),
        "trials": len(trials),
        "baselines": len(baselines),
        "completed": len(done),
        "beat_dense_latency_or_size": len(either),
        "beat_dense_latency": len(faster),
        "beat_dense_size": len(smaller),
        "frontier": len(front),
        "dense_accuracy": dense["accuracy"],
        "dense_latency_ms": round(dense["latency_ms"], 3),
        "best_frontier_accuracy": max(t.data.metrics["accuracy"] for t in front),
        "fastest_frontier_latency_ms": round(min(t.data.metrics["latency_ms"] for t in front), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2, help="warm runs after the cold one")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for i in range(1 + args.repeats):
            workdir = Path(tmp) / f"run{i}"
            workdir.mkdir()
            result = run_once(workdir, cache)
            result["kind"] = "cold (trains dense)" if i == 0 else "warm (cached dense)"
            runs.append(result)
            print(json.dumps(result), flush=True)
    warm = [r["wall_s"] for r in runs[1:]] or [runs[0]["wall_s"]]
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
        "warm_wall_s_median": statistics.median(warm),
        "warm_wall_s_range": [min(warm), max(warm)],
    }
    out = ROOT / "benchmarks" / "results" / "quickstart.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| run | wall time | trials (completed) + baselines | sampled trials that beat dense on latency or size | on latency | on size | frontier (trials and baselines) |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['kind']} | {r['wall_s']} s | {r['trials']} ({r['completed']}) + {r['baselines']} | {r['beat_dense_latency_or_size']} | "
              f"{r['beat_dense_latency']} | {r['beat_dense_size']} | {r['frontier']} |")
    print(f"\nwritten to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
