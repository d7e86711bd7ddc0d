"""Benchmark: what removing whole blocks and shipping int8 add to a width search, at the same number
of fine-tuned policies.

ResNet-20 on a CIFAR-10 subset, ``configs/cifar10_resnet20_compress.yaml`` (its dense model: 4,000
training images, 8 epochs; scored on 1,000 test images) with shorter fine-tunes (``--finetune-epochs``)
and fewer timed passes, every model measured as it ships in ONNX Runtime (CPU execution provider,
one thread, batch 32). Methods, each with ``--trials`` fine-tuned policies:

- ``uniform``: the uniform sweep (every prunable group at one ratio; ``--trials`` levels spread
  over the range, coarse to fine), float, every block kept;
- ``widths``: the search over widths only (NSGA-II);
- ``widths_depth``: widths and how many whole residual blocks to remove (least important first);
- ``widths_depth_int8``: widths, blocks, and float or static int8 (the int8 model is scored, timed
  and sized as the int8 ONNX file).

Searches run no baselines, so that each method fine-tunes exactly ``--trials`` policies. Per method
and seed: the hypervolume of the frontier over (accuracy, latency / dense, size / dense), the same
over (accuracy, latency / dense) alone, and the best accuracy at >= 2x and >= 4x lower latency than
the dense model timed in the same run. Latencies are the in-search ones (two trials at a time, the
dense model timed alone before them, so speed-ups are understated alike for every method) unless
``--remeasure`` re-times each frontier together with its dense model. The four methods of a seed
run back to back, seeds one after another, so that machine noise spreads over all of them. The dense model trains once (cached) before anything is timed.

    SECATEURS_DATA=../shared/data python benchmarks/compress_quality.py [--seeds 0 1 2] [--trials 6] [--set KEY=VALUE]

Writes benchmarks/results/compress_quality.json and prints the markdown table of the README.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from search.config import load_config
from search.driver import run_search
from search.frontier import normalised_hypervolume
from search.objectives import Objectives

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cifar10_resnet20_compress.yaml"
ACCURACY_LATENCY = Objectives((("accuracy", "max"), ("latency_ms", "min")))
METHODS = ("uniform", "widths", "widths_depth", "widths_depth_int8")


def coarse_to_fine(levels: list[float]) -> list[float]:
    """``levels`` reordered so that any prefix covers the range evenly: the middle first, then the
    middles of the halves, and so on.

    >>> coarse_to_fine([0.1, 0.2, 0.3, 0.4, 0.5])
    [0.3, 0.2, 0.5, 0.1, 0.4]
    """
    order, spans = [], [(0, len(levels))]
    while spans:
        nxt = []
        for lo, hi in spans:
            if lo < hi:
                mid = (lo + hi) // 2
                order.append(levels[mid])
                nxt += [(lo, mid), (mid + 1, hi)]
        spans = nxt
    return order


def method_overrides(method: str, trials: int, high: float) -> list[str]:
    float_widths = ["space.depth=null", "space.quantization=[none]"]
    search = [f"search.num_trials={trials}", "search.baselines=[]"]
    if method == "uniform":
        levels = [round(float(x), 4) for x in np.linspace(0.05, high, trials)]
        return [*float_widths, "search.num_trials=0", "search.baselines=[uniform]", f"search.baseline_ratios={coarse_to_fine(levels)}"]
    if method == "widths":
        return [*float_widths, *search]
    if method == "widths_depth":
        return ["space.quantization=[none]", *search]
    if method == "widths_depth_int8":
        return search
    raise ValueError(f"method: must be one of {', '.join(METHODS)}, but got {method!r}")


def best_at(front: pd.DataFrame, dense: dict, speedup: float) -> pd.Series | None:
    """The most accurate row of ``front`` at >= ``speedup`` x lower latency than the dense model."""
    fast = front[front["latency_ms"] <= dense["latency_ms"] / speedup]
    return fast.sort_values("accuracy", ascending=False).iloc[0] if len(fast) else None


def one(method: str, seed: int, sizes: list[str], trials: int, high: float, tmp: Path) -> dict:
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    config = load_config(str(CONFIG), [*sizes, *method_overrides(method, trials, high), f"search.seed={seed}",
                                       f"search.storage_path={tmp / 'ray'}", f"tracking.experiment=compress-{method}"])
    started = time.perf_counter()
    result = run_search(config, config_name=f"{method}-s{seed}", tracking_uri=uri, out=lambda line: None)
    wall = time.perf_counter() - started
    table, front, dense = result.trials, result.frontier, result.dense
    row = {"method": method, "seed": seed, "trials": len(table), "failed": result.num_failed, "wall_s": wall,
           "dense_accuracy": dense["accuracy"], "dense_latency_ms": dense["latency_ms"], "dense_size_mb": dense["size_mb"],
           "hypervolume": normalised_hypervolume(front, dense) if len(front) else 0.0,
           "hypervolume_acc_latency": normalised_hypervolume(front, dense, ACCURACY_LATENCY) if len(front) else 0.0,
           "max_speedup": float(dense["latency_ms"] / front["latency_ms"].min()) if len(front) else None}
    for speedup in (2, 4):
        best = best_at(front, dense, speedup)
        row[f"best_acc_{speedup}x"] = None if best is None else float(best["accuracy"])
        row[f"best_{speedup}x_policy"] = None if best is None else {
            "trial": int(best["trial"]), "latency_ms": float(best["latency_ms"]), "size_mb": float(best["size_mb"]),
            "blocks_dropped": int(best.get("blocks_dropped", 0) or 0), "quantization": str(best.get("quantization", "none") or "none")}
    columns = [c for c in ("trial", "accuracy", "latency_ms", "size_mb", "macs", "blocks_dropped", "quantization") if c in front]
    row["frontier"] = front[columns].to_dict("records")
    row["int8_on_frontier"] = int((front.get("quantization", pd.Series(dtype=str)) == "int8").sum())
    row["dropped_on_frontier"] = int((front.get("blocks_dropped", pd.Series(dtype=float)).fillna(0) > 0).sum())
    return row


def stats(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


KEYS = ("hypervolume", "hypervolume_acc_latency", "best_acc_2x", "best_acc_4x", "max_speedup", "int8_on_frontier",
        "dropped_on_frontier", "wall_s")


def summary(rows: list[dict], seeds: list[int]) -> dict:
    out = {}
    for method in METHODS:
        part = [r for r in rows if r["method"] == method]
        if part:
            out[method] = {key: stats([r[key] for r in part]) for key in KEYS}
            out[method]["reached_4x"] = f"{sum(r['best_acc_4x'] is not None for r in part)}/{len(part)}"
            out[method]["reached_2x"] = f"{sum(r['best_acc_2x'] is not None for r in part)}/{len(part)}"
    return out


def markdown(summary_: dict, seeds: list[int]) -> str:
    def cell(entry: dict | None, scale: float = 1.0, digits: int = 3) -> str:
        if entry is None:
            return "not reached"
        return f"{entry['mean'] * scale:.{digits}f} ± {entry['std'] * scale:.{digits}f}"

    lines = ["| method | hypervolume (acc, lat, size) | hypervolume (acc, lat) | best accuracy at >= 2x lower latency (seeds that reach it) "
             "| at >= 4x (seeds) | largest speed-up | int8 / blocks-removed policies on the frontier |",
             "|---|---|---|---|---|---|---|"]
    for method, s in summary_.items():
        acc2 = f"{cell(s['best_acc_2x'], 100, 1)} % ({s['reached_2x']})" if s["best_acc_2x"] else f"not reached ({s['reached_2x']})"
        acc4 = f"{cell(s['best_acc_4x'], 100, 1)} % ({s['reached_4x']})" if s["best_acc_4x"] else f"not reached ({s['reached_4x']})"
        lines.append(f"| {method} | {cell(s['hypervolume'])} | {cell(s['hypervolume_acc_latency'])} | {acc2} | {acc4} "
                     f"| {cell(s['max_speedup'], 1, 2)}x | {s['int8_on_frontier']['mean']:.1f} / {s['dropped_on_frontier']['mean']:.1f} |")
    return "\n".join(lines) + f"\n\nmean ± std over seeds {', '.join(map(str, seeds))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=6, help="fine-tuned policies per method and seed")
    parser.add_argument("--population", type=int, default=3, help="NSGA-II generation size (trials / population = generations)")
    parser.add_argument("--finetune-epochs", type=float, default=0.25, help="fine-tune of every policy (the config's: 0.5)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per latency (after 2 warm-up)")
    parser.add_argument("--remeasure", action="store_true", help="re-time each frontier with its dense model at the end "
                        "(search.remeasure; minutes per run with int8 policies: off by default, latencies are the in-search ones)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more config overrides for every method, e.g. task.options.train_size=2000 (the dense model trains again)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compress_quality.json"))
    args = parser.parse_args()
    sizes = [f"finetune.epochs={args.finetune_epochs}", "measure.warmup=2", f"measure.repeats={args.repeats}",
             f"search.population_size={args.population}", f"search.remeasure={str(args.remeasure).lower()}", *args.set]
    high = load_config(str(CONFIG)).space.ratio.high
    rows: list[dict] = []
    started = time.time()

    def save() -> dict:
        result = summary(rows, args.seeds)
        Path(args.out).write_text(json.dumps({
            "config": str(CONFIG.relative_to(ROOT)), "overrides": sizes, "trials_per_method": args.trials, "seeds": args.seeds,
            "date": time.strftime("%Y-%m-%d"), "total_wall_s": time.time() - started, "summary": result, "rows": rows,
        }, indent=2, default=str) + "\n")
        return result

    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for method in args.methods:
                row = one(method, seed, sizes, args.trials, high, Path(tmp) / f"{method}-{seed}")
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "frontier"}, default=str), flush=True)
                save()
    print(markdown(save(), args.seeds))


if __name__ == "__main__":
    main()
