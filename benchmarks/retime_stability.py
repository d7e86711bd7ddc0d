"""Benchmark: how steady is the end-of-search re-timing (``search.outcome.remeasure_frontier``)?

The re-timing times the dense model and the frontier's policies together, round-robin
(:func:`evaluators.trial.measure_latencies`), and every latency the search reports is relative to
that dense timing. On seed 1 of the 5-seed run of 2026-12-01 it put two policies 20-40% away from
their in-search ratios. This times the benchmark's dense ResNet-20 and three uniform policies the
same way, ``--repeats`` times while idle and ``--repeats`` times right after a local Ray ran two
torch tasks and shut down (what comes just before the re-timing in a search), and reports each
policy's latency / dense for every repeat and its spread. Writes
benchmarks/results/retime_stability.json.

    SECATEURS_DATA=../shared/data python benchmarks/retime_stability.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray

from evaluators.trial import measure_latencies
from search.config import load_config
from search.driver import _prepare
from spaces import Policy

ROOT = Path(__file__).resolve().parents[1]


@ray.remote(num_cpus=1)
def _torch_work() -> float:
    import torch

    x = torch.randn(512, 512)
    for _ in range(200):
        x = torch.tanh(x @ x)
    return float(x.sum())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "cifar10_resnet20_converged.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "retime_stability.json"))
    args = parser.parse_args()
    config = load_config(args.config)
    prepared = _prepare(config, print)
    names = [group.name for group in prepared.space.groups]
    policies = {"dense": Policy(criterion="l1", ratios={})}
    policies.update({f"uniform {r}": Policy(criterion="l1", ratios={n: r for n in names}) for r in (0.25, 0.5, 0.75)})
    runs = []
    for when in ["idle"] * args.repeats + ["after Ray"] * args.repeats:
        if when == "after Ray":
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            ray.get([_torch_work.remote(), _torch_work.remote()])
            ray.shutdown()
        started = time.perf_counter()
        latencies = measure_latencies(policies, prepared.task, prepared.checkpoint, config.measure)
        dense = latencies["dense"]["latency_ms"]
        run = {"when": when, "seconds": time.perf_counter() - started, "dense_ms": dense,
               "vs_dense": {k: v["latency_ms"] / dense for k, v in latencies.items() if k != "dense"}}
        runs.append(run)
        print(json.dumps(run), flush=True)
    spread = {k: {"min": min(r["vs_dense"][k] for r in runs), "max": max(r["vs_dense"][k] for r in runs)} for k in runs[0]["vs_dense"]}
    for k, s in spread.items():
        s["spread_pct"] = 100 * (s["max"] / s["min"] - 1)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "config": str(Path(args.config).resolve().relative_to(ROOT)), "measure": {
        "batch_size": config.measure.batch_size, "threads": config.measure.threads, "warmup": config.measure.warmup,
        "repeats": config.measure.repeats}, "runs": runs, "spread": spread}, indent=2) + "\n")
    print(json.dumps(spread, indent=2))


if __name__ == "__main__":
    main()
