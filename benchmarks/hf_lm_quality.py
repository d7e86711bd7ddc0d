"""Benchmark: the search against uniform width and uniform depth sweeps on a tiny Llama causal LM.

The model of ``configs/hf_llama_lm.yaml`` (grouped-query attention, 8 query / 4 key-value heads,
hidden 64) made deeper (``--layers``, default 8) so that depth has room, trained once here on the
SST-2 sentences. Per seed, three methods with the same number of fine-tuned trials (``--trials``):

- ``search``: ``secateurs search`` (heads, MLP neurons and how many layers to drop, searched together;
  real local Ray, MLflow on a temporary sqlite file), every trial it ran;
- ``width``: the uniform width sweep: the same fraction of every layer's heads (whole key-value
  groups, rounded) and MLP neurons, at ``--trials`` levels from 0.125 to 0.75, magnitude (l1);
- ``depth``: the uniform depth sweep: drop the k least important layers (ShortGPT block influence on
  the dense model), k = 1 .. ``--trials``.

Every policy (the search's replayed from its ``policy.json``) is then pruned, fine-tuned with the
config's recipe and measured in this one process, one torch thread, in an interleaved order, so that
all are timed alike: held-out perplexity, latency (``measure.batch_size`` sequences of ``seq_len``
tokens, median), tokens per second of that forward pass, parameters. Per method and seed: the
(perplexity, latency) frontier, its hypervolume (perplexity / dense up to 1.5, latency / dense up
to 1), the best perplexity at >= 1.5x measured speed-up; per sweep level, the measured speed-up
against the parameter reduction (whole model, embeddings included) and their ratio.

    SECATEURS_DATA=../shared/data PYTHONPATH=$PWD python benchmarks/hf_lm_quality.py [--seeds 0 1 2] [--trials 6]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from evaluators import depth
from evaluators.checkpoint import ensure_dense_checkpoint, load_dense
from evaluators.hf.pruning import discover
from evaluators.measure import torch_threads
from evaluators.tasks import make_task
from evaluators.trial import evaluate
from search.config import load_config
from search.driver import run_search
from spaces import Policy

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "hf_llama_lm.yaml"
PPL_LIMIT, LAT_LIMIT = 1.5, 1.0  # hypervolume box: perplexity / dense, latency / dense


def frontier(points: list[dict]) -> list[dict]:
    """The points no other point beats in both perplexity and latency, fastest first.

    >>> [p["latency_ms"] for p in frontier([{"perplexity": 2, "latency_ms": 1}, {"perplexity": 1, "latency_ms": 2},
    ...                                    {"perplexity": 3, "latency_ms": 3}])]
    [1, 2]
    """
    kept = [p for p in points if not any(q["perplexity"] <= p["perplexity"] and q["latency_ms"] <= p["latency_ms"]
                                         and (q["perplexity"], q["latency_ms"]) != (p["perplexity"], p["latency_ms"]) for q in points)]
    return sorted(kept, key=lambda p: p["latency_ms"])


def hypervolume(points: list[dict], dense: dict) -> float:
    """The area the (latency / dense, perplexity / dense) frontier dominates inside the box from
    (0, 0) to (``LAT_LIMIT``, ``PPL_LIMIT``), as a fraction of the box (higher is better)."""
    front = [(p["latency_ms"] / dense["latency_ms"], p["perplexity"] / dense["perplexity"]) for p in frontier(points)]
    front = [(lat, ppl) for lat, ppl in front if lat < LAT_LIMIT and ppl < PPL_LIMIT]
    area, right = 0.0, LAT_LIMIT
    for lat, ppl in sorted(front, reverse=True):  # slowest first: each adds a strip of its own width
        area += (right - lat) * (PPL_LIMIT - ppl)
        right = lat
    return area / (LAT_LIMIT * PPL_LIMIT)


def overrides(args: argparse.Namespace, seed: int, storage: Path) -> list[str]:
    return [f"task.model_options.num_hidden_layers={args.layers}", f"task.options.train_size={args.train_size}",
            f"task.options.test_size={args.test_size}", f"task.dense_epochs={args.dense_epochs}",
            f"space.depth.max_drop={args.layers - 2}", f"finetune.epochs={args.finetune_epochs}",
            f"search.num_trials={args.trials}", "search.baselines=[]", f"search.population_size={args.trials}",
            f"search.seed={seed}", f"search.storage_path={storage}", "measure.repeats=20", "measure.warmup=5"]


def search_policies(config, store: str, tmp: Path) -> list[Policy]:
    result = run_search(config, config_name="hf_lm_quality", tracking_uri=store, out=lambda line: None)
    client = MlflowClient(store)
    runs = client.search_runs([result.experiment_id], max_results=1000, filter_string=(
        f"tags.`mlflow.parentRunId` = '{result.parent_run_id}' and tags.`secateurs.kind` = 'trial'"))
    policies = []
    for run in runs:
        text = Path(client.download_artifacts(run.info.run_id, "policy.json", str(tmp / run.info.run_id))).read_text()
        policies.append((Policy.from_json(text), run.data.metrics["perplexity"]))
    return policies


def measure(policy: Policy, task, checkpoint: str, config, epochs: float) -> dict:
    metrics = evaluate(policy, task, checkpoint, dataclasses.replace(config.finetune, epochs=epochs), config.measure)
    return {"perplexity": metrics.scores["perplexity"], "latency_ms": metrics.latency_ms, "tokens_per_s": metrics.tokens_per_s,
            "params": metrics.params, "size_mb": metrics.size_mb, "drop_blocks": list(policy.drop_blocks),
            "ratios": dict(policy.ratios), "criterion": policy.criterion}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=400)
    parser.add_argument("--dense-epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=float, default=0.5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hf_lm_quality.json"))
    args = parser.parse_args()
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        store = f"sqlite:///{tmp / 'mlflow.db'}"
        config = load_config(CONFIG, overrides(args, args.seeds[0], tmp / "ray"))
        task = make_task(config.task)
        with torch_threads(1):
            checkpoint = str(ensure_dense_checkpoint(config.task, task, log=print, threads=1))
            model = load_dense(task, checkpoint)
            names = [b.name for b in depth.discover(model, task.example())]
            order = depth.order(model, task.calibration(), names, "block_influence")
            groups = [u.name for u in discover(model) if u.kind in ("heads", "neurons")]
            dense = measure(Policy("l1", {}, granularity="structured"), task, checkpoint, config, 0.0)
        print(f"dense: perplexity {dense['perplexity']:.3f}, {dense['latency_ms']:.3f} ms, {dense['tokens_per_s']:.0f} tokens/s, "
              f"{dense['params']:,} params; layers least important first: {', '.join(order)}")
        levels = [round(0.125 * (i + 1), 3) for i in range(args.trials)]
        runs: dict[int, dict[str, list[dict]]] = {}
        replay_diffs = []
        for seed in args.seeds:
            config = load_config(CONFIG, overrides(args, seed, tmp / f"ray{seed}"))
            t0 = time.perf_counter()
            searched = search_policies(config, store, tmp)
            print(f"seed {seed}: search of {len(searched)} trials in {time.perf_counter() - t0:.0f} s")
            todo = [("search", p, reported) for p, reported in searched]
            todo += [("width", Policy("l1", {g: r for g in groups}, seed=seed, round_to=8, gqa="kv_groups", granularity="structured"), None) for r in levels]
            todo += [("depth", Policy("l1", {}, seed=seed, drop_blocks=tuple(order[:k]), granularity="structured"), None)
                     for k in range(1, min(args.trials, len(order) - 1) + 1)]
            todo = [todo[i] for i in sorted(range(len(todo)), key=lambda i: (i % args.trials, i))]  # interleaved
            for i in range(len(todo), -1, -6):  # the dense model timed among them, every 6th
                todo.insert(i, ("dense", Policy("l1", {}, granularity="structured"), None))
            runs[seed] = {"search": [], "width": [], "depth": [], "dense": []}
            with torch_threads(1):
                for method, policy, reported in todo:
                    point = measure(policy, task, checkpoint, config, 0.0 if method == "dense" else config.finetune.epochs)
                    if reported is not None:
                        replay_diffs.append(abs(point["perplexity"] - reported))
                    runs[seed][method].append(point)
                    print(f"  {method:6s} ppl {point['perplexity']:8.3f}  {point['latency_ms']:7.3f} ms  "
                          f"{point['tokens_per_s']:9.0f} tok/s  {point['params']:>8,} params  drop {len(point['drop_blocks'])}")

    # the dense latency: the median of its timings among the others (the machine's load drifts)
    timed = [p for s in args.seeds for p in runs[s].pop("dense")]
    dense["latency_ms"] = statistics.median(p["latency_ms"] for p in timed)
    dense["tokens_per_s"] = statistics.median(p["tokens_per_s"] for p in timed)
    summary = {}
    for method in ("search", "width", "depth"):
        hvs, best = [], []
        for seed in args.seeds:
            points = runs[seed][method]
            hvs.append(hypervolume(points, dense))
            fast = [p["perplexity"] for p in points if dense["latency_ms"] / p["latency_ms"] >= 1.5]
            best.append(min(fast) if fast else None)
        found = [b for b in best if b is not None]
        summary[method] = {"hypervolume_mean": statistics.mean(hvs), "hypervolume_per_seed": hvs,
                           "best_ppl_at_1.5x_per_seed": best, "best_ppl_at_1.5x_mean": statistics.mean(found) if found else None}
        if method != "search":
            speed = [dense["latency_ms"] / p["latency_ms"] for s in args.seeds for p in runs[s][method]]
            shrink = [dense["params"] / p["params"] for s in args.seeds for p in runs[s][method]]
            summary[method].update(speedup_mean=statistics.mean(speed), param_reduction_mean=statistics.mean(shrink),
                                   speedup_per_param_reduction=statistics.mean(a / b for a, b in zip(speed, shrink)))
    report = {"args": vars(args), "dense": dense, "dense_latencies_ms": [p["latency_ms"] for p in timed], "layer_order": order, "runs": runs, "summary": summary,
              "search_replay_max_ppl_diff": max(replay_diffs, default=0.0), "wall_s": time.perf_counter() - started,
              "torch": torch.__version__}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(summary, dense, args)
    Path(args.out).with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {args.out} ({report['wall_s'] / 60:.1f} min)")


def markdown(summary: dict, dense: dict, args: argparse.Namespace) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = [f"Tiny Llama LM ({args.layers} layers, hidden 64, 8 query / 4 key-value heads), {args.trials} fine-tuned "
             f"trials per method, seeds {', '.join(map(str, args.seeds))}; dense: perplexity {dense['perplexity']:.2f}, "
             f"{dense['latency_ms']:.2f} ms, {dense['tokens_per_s']:.0f} tokens/s, {dense['params']:,} params.", "",
             "| method | hypervolume (mean) | best perplexity at >= 1.5x speed-up (mean) | speed-up (mean) | parameter reduction (mean) | speed-up / parameter reduction |",
             "|---|---|---|---|---|---|"]
    for method, s in summary.items():
        lines.append(f"| {method} | {s['hypervolume_mean']:.4f} | {fmt(s['best_ppl_at_1.5x_mean'], '.2f')} | "
                     f"{fmt(s.get('speedup_mean'), '.2f')} | {fmt(s.get('param_reduction_mean'), '.2f')} | "
                     f"{fmt(s.get('speedup_per_param_reduction'), '.2f')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
