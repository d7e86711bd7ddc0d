"""Benchmark: is a MAC reduction a real speed-up? ResNet-20 (CIFAR-10 shapes) pruned uniformly.

For several uniform channel-pruning ratios, measures CPU latency of the pruned model against the
dense one, interleaved round by round in one process (so machine noise hits all models alike),
and reports measured speed-up / MAC reduction (1.0 = the speed-up the MAC count promises) and the
run-to-run spread of latency (relative IQR of the per-round medians).

    python benchmarks/speedup_vs_macs.py [--batch 32] [--threads 1] [--rounds 15]

Weights do not change latency on dense kernels, so the models are freshly initialised: no data
or training needed. Writes benchmarks/results/speedup_vs_macs.json.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.fx.experimental.optimization import fuse

from evaluators import measure, pruning
from evaluators.models import build_model
from spaces import Policy

ROOT = Path(__file__).resolve().parents[1]


def iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds; each takes a median of --repeats")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--ratios", default="0.2,0.3,0.4,0.5,0.6")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the convolutions (torch.fx) before timing")
    parser.add_argument("--round-to", type=int, default=1, help="keep channel counts a multiple of this (Policy.round_to)")
    parser.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                        help="onnxruntime: export each model to ONNX once and time ONNX Runtime (it folds BatchNorm into the convs)")
    args = parser.parse_args()

    torch.manual_seed(0)
    example = torch.randn(1, 3, 32, 32)
    batch = torch.randn(args.batch, 3, 32, 32)
    dense = build_model(args.model).eval()
    groups = pruning.discover_groups(dense, example)
    models = {"dense": dense}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        model = build_model(args.model).eval()
        model.load_state_dict(dense.state_dict())
        pruning.apply(Policy(criterion="l1", ratios={g.name: ratio for g in groups}, round_to=args.round_to), model, example)
        models[f"uniform {ratio:.1f}"] = model.eval()
    if args.fold_bn:
        models = {k: fuse(m) for k, m in models.items()}
    if args.channels_last:
        models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
        batch = batch.to(memory_format=torch.channels_last)
    macs = {name: measure.macs_and_params(m, example)[0] for name, m in models.items()}

    per_round: dict[str, list[float]] = {name: [] for name in models}
    with contextlib.ExitStack() as stack:
        if args.backend == "onnxruntime":
            from evaluators.onnx_backend import onnxruntime_call

            calls = {name: stack.enter_context(onnxruntime_call(m, batch, threads=args.threads))[0] for name, m in models.items()}
        else:
            calls = {name: functools.partial(m, batch) for name, m in models.items()}
        for _ in range(args.rounds):  # one round-robin pass per round, so that each round gives one median per model
            stats = measure.interleaved_latency_ms(calls, rounds=1, warmup=3, repeats=args.repeats, threads=args.threads)
            for name in models:
                per_round[name].append(stats[name]["latency_ms"])

    dense_ms = statistics.median(per_round["dense"])
    rows = []
    for name in models:
        median = statistics.median(per_round[name])
        mac_reduction = macs["dense"] / macs[name]
        speedup = dense_ms / median
        rows.append({
            "model": name,
            "macs": macs[name],
            "mac_reduction": round(mac_reduction, 3),
            "latency_ms_median": round(median, 3),
            "latency_rel_iqr": round(iqr(per_round[name]) / median, 4),
            "speedup": round(speedup, 3),
            "speedup_per_mac_reduction": round(speedup / mac_reduction, 3),
        })
    summary = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, torch {torch.__version__}",
        "model": args.model, "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
        "repeats_per_round": args.repeats, "channels_last": args.channels_last, "fold_bn": args.fold_bn, "backend": args.backend, "round_to": args.round_to, "rows": rows,
    }
    out = ROOT / "benchmarks" / "results" / f"speedup_vs_macs_{args.model}_b{args.batch}_t{args.threads}{'_cl' if args.channels_last else ''}{'_foldbn' if args.fold_bn else ''}{'_ort' if args.backend == 'onnxruntime' else ''}{f'_r{args.round_to}' if args.round_to > 1 else ''}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"| {args.model}, batch {args.batch}, {args.threads} thread(s), {args.backend} | MACs | MAC reduction | latency (median) | rel. IQR | speed-up | speed-up / MAC reduction |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['macs'] / 1e6:.1f} M | {r['mac_reduction']:.2f}x | {r['latency_ms_median']:.2f} ms | "
              f"{100 * r['latency_rel_iqr']:.1f}% | {r['speedup']:.2f}x | {r['speedup_per_mac_reduction']:.2f} |")
    print(f"\nwritten to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
