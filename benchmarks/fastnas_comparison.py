"""Benchmark: accuracy lost at about 2x fewer MACs, secateurs against NVIDIA ModelOpt's FastNAS.

Both start from the converged dense ResNet-20 (``configs/cifar10_resnet20_converged.yaml``; train
it with ``benchmarks/dense_cifar10.py``) and both models get the same final fine-tune
(``--final-epochs`` epochs of secateurs' loop: SGD, cosine, the config's fine-tune learning rate,
augmentation). FastNAS (``modelopt.torch.prune``, mode ``fastnas``, ``flops: 50%``, channels in
multiples of 4, scored on the same evaluation data after BatchNorm re-calibration) prunes one shot;
secateurs takes the most accurate policy with at most FastNAS's MACs (and at least 0.9 of them)
from a search of the same config held to that band (``--search-seconds`` of wall time, the search of
``benchmarks/search_quality.py`` with both bounds as constraints, its sensitivity step seeding it
with the policy of its drop-per-MAC path at FastNAS's MACs: ``search.sensitivity.seed_macs``). Reported: each
model's MACs and its test accuracy after the final fine-tune, and the accuracy each lost against the
dense model.

Needs NVIDIA ModelOpt and torchprofile: ``make install-bench`` (torchprofile without the torchvision
it declares and never imports; see ``pyproject.toml``).

    SECATEURS_DATA=../shared/data python benchmarks/fastnas_comparison.py [--final-epochs 5]
"""
from __future__ import annotations

import argparse
import dataclasses
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from evaluators.checkpoint import ensure_dense_checkpoint, load_dense
from evaluators.measure import torch_threads
from evaluators.pruning import discover_groups, effective_macs_and_params
from evaluators.tasks import make_task
from evaluators.train import train
from evaluators.trial import prune_model
from search.choose import choose
from search.config import load_config
from search.baselines import reference_points
from search.driver import run_search
from search.frontier import feasible_mask
from spaces import Policy, SearchSpace

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cifar10_resnet20_converged.yaml"
# The search of benchmarks/search_quality.py (its refinement given 0.4 of the budget), held to
# FastNAS's MAC budget from both sides: only policies with at most the MACs of FastNAS's model and at
# least 0.9 of them are feasible (the frontier, the refinement, the sampler's constraint), and the
# uniform baseline starts at the least pruned uniform level whose MACs are measured in the band,
# else the one nearest it (the third run assumed 0.3 gave about 0.49x the dense MACs; measured
# later, 0.532x: outside the band, and that run found no policy in it; 0.35 gives 0.4519x, just
# under it). Changed on 2026-11-30 after the first
# run, whose only constraint (<= 0.5x) let the frontier's best policy land at 3.71x fewer MACs, and
# again after the second, whose band (0.4-0.5x) let it land at 2.36x against FastNAS's 1.99x.
# Seventh run (2026-12-01): the sensitivity step tries three ratios and seeds the search with the
# policy its drop-per-MAC path gives at FastNAS's MACs (``seed_macs``, added after an experiment
# outside the benchmark: that policy, fine-tuned the final 2 epochs, lost 2.65 points with three
# ratios and 3.40 with the one ratio, 0.5, the earlier runs used).
SENSITIVITY = "{{ratios: [{ratios}], samples: 500, seed_macs: [{high}]}}"
# --ratio-high (eighth run, after an experiment outside the benchmark): the config's ratio range
# goes up to 0.7, and FastNAS pruned three of stage 1's inner convolutions by 50-75%; with the range
# (and the sensitivity ratios) up to 0.85, the MAC seed of that experiment lost 1.70 points after
# the final fine-tune instead of 2.65.
SEARCH = ["search.sampler=tpe", "search.num_trials=1000",
          "search.screening={warmup: 4}", "space.round_to=[1, 8]", "search.refine={epochs: 2, candidates: 4, share: 0.4}",
          "search.baselines=[uniform]"]  # at the uniform level measured nearest the band (nearest_level)


def band(fastnas_macs: int, dense_macs: int) -> tuple[float, float]:
    """The search's MAC band, as fractions of the dense MACs: at most FastNAS's (rounded down), at
    least 0.9 of that.

    >>> band(20839306, 41407114)
    (0.4529, 0.5032)
    """
    high = math.floor(1e4 * fastnas_macs / dense_macs) / 1e4
    return round(0.9 * high, 4), high


def uniform_macs(config, task, checkpoint, dense_macs: int) -> dict[float, float]:
    """Each uniform level of the config's space (its ratio step) and the MACs its pruned model keeps
    (a fraction of the dense MACs), measured by pruning the dense model with it, as a trial does."""
    model = load_dense(task, checkpoint).eval()
    example = task.example()
    space = SearchSpace(config.space, discover_groups(model, example, config.space.granularity, config.space.nm_block), seed=0)
    step = config.space.ratio.step or 0.05
    levels = [round(step * i, 4) for i in range(1, int(round(config.space.ratio.high / step)) + 1)]
    kept = {}
    for baseline in reference_points(space, model, example, ["uniform"], levels):
        pruned, _ = prune_model(space.policy(baseline.point), task, checkpoint)
        kept[float(baseline.name.split()[1])] = effective_macs_and_params(pruned, example)[0] / dense_macs
    return kept


def nearest_level(kept: dict[float, float], low: float, high: float) -> float:
    """The least pruned level whose MACs are in [``low``, ``high``], else the one nearest the band.

    >>> nearest_level({0.3: 0.5319, 0.35: 0.4519, 0.4: 0.3907}, 0.4529, 0.5032)
    0.35
    >>> nearest_level({0.3: 0.5319, 0.35: 0.4719}, 0.4529, 0.5032)
    0.35
    """
    inside = [level for level, r in kept.items() if low <= r <= high]
    if inside:
        return min(inside)
    return min(kept, key=lambda level: max(low - kept[level], kept[level] - high))


def fine_tune(model: torch.nn.Module, task, config, epochs: float, threads: int) -> float:
    """The final fine-tune both models get; returns the test accuracy after it."""
    with torch_threads(threads):
        train(model, task.train_source, dataclasses.replace(config.finetune, epochs=epochs), seed=0,
              loss=task.loss, transform=task.train_transform)
        model.eval()
        return task.score(model)["accuracy"]


def fastnas(dense: torch.nn.Module, task, threads: int) -> torch.nn.Module:
    import modelopt.torch.prune as mtp

    calibration = [b for _, b in zip(range(16), task.train_batches(64, seed=0))]

    def score(model: torch.nn.Module) -> float:
        model.eval()
        return task.score(model)["accuracy"]

    with torch_threads(threads), tempfile.TemporaryDirectory() as tmp:
        pruned, _ = mtp.prune(
            model=copy.deepcopy(dense), dummy_input=task.example(),
            mode=[("fastnas", {"nn.Conv2d": {"*": {"channel_divisor": 4}}, "nn.BatchNorm2d": {"*": {"feature_divisor": 4}}})],
            constraints={"flops": "50%"},
            config={"data_loader": calibration, "score_func": score, "checkpoint": str(Path(tmp) / "fastnas.pth")},
        )
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--final-epochs", type=float, default=5.0)
    parser.add_argument("--search-seconds", type=float, default=360.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratio-high", type=float, default=None,
                        help="search each group's ratio up to this (step 0.05; the config's rules still cap the residual streams at 0.5), "
                             "and try it in the sensitivity step too (default: the config's 0.7)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fastnas_comparison.json"))
    parser.add_argument("--log", type=Path, default=None, help="write the search's output here, stamped with seconds")
    args = parser.parse_args()
    config = load_config(str(CONFIG))
    task = make_task(config.task)
    checkpoint = ensure_dense_checkpoint(config.task, task)
    dense = load_dense(task, checkpoint).eval()
    example = task.example()
    dense_macs, _ = effective_macs_and_params(dense, example)
    dense_accuracy = task.score(dense)["accuracy"]
    rows = {"dense": {"macs": dense_macs, "accuracy": dense_accuracy}}
    started = time.time()

    model = fastnas(dense, task, args.threads)
    macs, _ = effective_macs_and_params(model, example)
    one_shot = task.score(model.eval())["accuracy"]
    rows["fastnas"] = {"macs": macs, "mac_reduction": dense_macs / macs, "accuracy_one_shot": one_shot,
                       "accuracy": fine_tune(model, task, config, args.final_epochs, args.threads)}
    print(json.dumps(rows), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        low, high = band(rows["fastnas"]["macs"], dense_macs)
        kept = uniform_macs(config, task, checkpoint, dense_macs)
        level = nearest_level(kept, low, high)
        rows["uniform_baseline"] = {"level": level, "macs_vs_dense": kept[level], "in_band": low <= kept[level] <= high}
        ratios = [0.25, 0.5, 0.75] + ([args.ratio_high] if args.ratio_high and args.ratio_high > 0.75 else [])
        wider = [f"space.ratio={{low: 0.0, high: {args.ratio_high}, step: 0.05}}"] if args.ratio_high else []
        search = load_config(str(CONFIG), [*SEARCH, *wider, f"search.sensitivity={SENSITIVITY.format(ratios=', '.join(map(str, ratios)), high=high)}", f"search.baseline_ratios=[{level}]", f"search.time_budget_s={args.search_seconds}", f"search.seed={args.seed}",
                                           f"search.storage_path={Path(tmp) / 'ray'}",
                                           f"search.constraints=['macs <= {high} * dense', 'macs >= {low} * dense']"])
        started_search = time.perf_counter()

        def out(line: str) -> None:  # the search's output, stamped with the seconds since it started
            if args.log is not None:
                with open(args.log, "a") as f:
                    f.write(f"{time.perf_counter() - started_search:8.1f} {line}\n")

        result = run_search(search, config_name="fastnas-comparison", tracking_uri=uri, out=out)
        trials = result.trials
        rows["search_trials"] = {"recorded": len(trials), "fine_tuned": int((trials["fidelity"].fillna(1.0) > 0).sum()) if "fidelity" in trials else len(trials),
                                 "feasible": int(feasible_mask(trials).sum()) if len(trials) else 0,
                                 "in_band": int(((trials["macs"] <= high * dense_macs) & (trials["macs"] >= low * dense_macs)).sum())
                                 if len(trials) else 0,
                                 "macs_vs_dense": [round(float(m) / dense_macs, 4) for m in trials["macs"]] if len(trials) else []}
        front = result.frontier
        half = front[(front["macs"] <= high * dense_macs) & (front["macs"] >= low * dense_macs)]
        if len(half):
            row = choose(half, prefer="accuracy")  # secateurs pick --prefer accuracy (search.fidelity's ranking)
            policy = Policy.from_json(row["policy"])  # the policy the trial ran, rebuilt from the dense model as FastNAS's was
            model, _ = prune_model(policy, task, checkpoint)
            rows["secateurs"] = {"macs": int(row["macs"]), "mac_reduction": dense_macs / row["macs"], "accuracy_in_search": float(row["accuracy"]),
                                 "accuracy_one_shot": task.score(model.eval())["accuracy"],
                                 "accuracy": fine_tune(model, task, config, args.final_epochs, args.threads),
                                 "search_wall_s": result.wall_s, "macs_band": [low, high], "policy": policy.to_dict()}
    for name in ("fastnas", "secateurs"):
        if name in rows:
            rows[name]["lost_points"] = 100 * (dense_accuracy - rows[name]["accuracy"])
    result_json = {"date": time.strftime("%Y-%m-%d"), "final_epochs": args.final_epochs, "ratio_high": args.ratio_high, "wall_s": time.time() - started, "rows": rows}
    Path(args.out).write_text(json.dumps(result_json, indent=2, default=float) + "\n")
    print(json.dumps(result_json, indent=2, default=float))


if __name__ == "__main__":
    main()
