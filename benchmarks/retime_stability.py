"""Benchmark: how steady is the end-of-search re-timing (``search.outcome.remeasure_frontier``)?

The re-timing times the dense model and the frontier's policies together, round-robin
(:func:`evaluators.trial.measure_latencies`), and every latency the search reports is relative to
that dense timing. On seed 1 of the 5-seed run of 2026-12-01 it put two policies 20-40% away from
their in-search ratios. This times the benchmark's dense ResNet-20 and three uniform policies the
same way, ``--repeats`` times while idle and ``--repeats`` times right after a local Ray ran two
torch tasks and shut down (what comes just before the re-timing in a search), and reports each
policy's latency / dense for every repeat and its spread. Writes
benchmarks/results/retime_stability.json.

With ``--instances N`` it also asks whether a pruned model's latency depends on the instance (where
its weights were allocated), not only on its shapes: each of uniform 0.5 and one non-uniform policy
(channels as pruned, and rounded to 8) is built N times, by separate prunes, and all are timed
together with the dense model ``--repeats`` times; it reports each policy's spread over its
instances in each repeat.

    SECATEURS_DATA=../shared/data python benchmarks/retime_stability.py [--repeats 3] [--instances 3]
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
    parser.add_argument("--instances", type=int, default=1)
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
        dense, ratios = _vs_dense(policies, prepared, config)
        run = {"when": when, "seconds": time.perf_counter() - started, "dense_ms": dense, "vs_dense": ratios}
        runs.append(run)
        print(json.dumps(run), flush=True)
    spread = {k: {"min": min(r["vs_dense"][k] for r in runs), "max": max(r["vs_dense"][k] for r in runs)} for k in runs[0]["vs_dense"]}
    for k, s in spread.items():
        s["spread_pct"] = 100 * (s["max"] / s["min"] - 1)
    instances = _instances(prepared, config, names, args.instances, args.repeats) if args.instances > 1 else None
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "config": str(Path(args.config).resolve().relative_to(ROOT)), "measure": {
        "batch_size": config.measure.batch_size, "threads": config.measure.threads, "warmup": config.measure.warmup,
        "repeats": config.measure.repeats}, "runs": runs, "spread": spread, "instances": instances}, indent=2) + "\n")
    print(json.dumps(spread, indent=2))


def _vs_dense(policies: dict, prepared, config) -> tuple[float, dict[str, float]]:
    """``policies`` (one of them ``"dense"``) timed together: the dense latency (ms) and each other's latency / it."""
    latencies = measure_latencies(policies, prepared.task, prepared.checkpoint, config.measure)
    dense = latencies["dense"]["latency_ms"]
    return dense, {k: v["latency_ms"] / dense for k, v in latencies.items() if k != "dense"}


def _instances(prepared, config, names: list[str], count: int, repeats: int) -> dict:
    """Each policy built ``count`` times and all timed together, ``repeats`` times: per repeat, each
    instance's latency / dense, and the policy's spread over its instances (max / min - 1, %)."""
    mixed = {n: (0.0, 0.2, 0.35, 0.5, 0.65)[i % 5] * (0.7 if "stem" in n or "shortcut" in n else 1.0) for i, n in enumerate(names)}
    kinds = {"uniform 0.5": Policy(criterion="l1", ratios={n: 0.5 for n in names}),
             "mixed": Policy(criterion="l1", ratios=mixed), "mixed round_to 8": Policy(criterion="l1", ratios=mixed, round_to=8)}
    policies = {"dense": Policy(criterion="l1", ratios={}), **{f"{k} #{i}": p for k, p in kinds.items() for i in range(count)}}
    out = []
    for _ in range(repeats):
        dense, ratios = _vs_dense(policies, prepared, config)
        spread = {k: 100 * (max(ratios[f"{k} #{i}"] for i in range(count)) / min(ratios[f"{k} #{i}"] for i in range(count)) - 1)
                  for k in kinds}
        out.append({"dense_ms": dense, "vs_dense": ratios, "spread_pct": spread})
        print(json.dumps(out[-1]), flush=True)
    return {"count": count, "policies": {k: p.ratios for k, p in kinds.items()}, "repeats": out,
            "max_spread_pct": {k: max(r["spread_pct"][k] for r in out) for k in kinds}}


if __name__ == "__main__":
    main()
