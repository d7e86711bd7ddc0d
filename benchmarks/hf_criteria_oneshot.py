"""One-shot pruning (no fine-tuning) of the tiny Llama LM of evaluators.hf.tasks trained on the SST-2
sentences: held-out perplexity after removing half the key-value groups and half the MLP neurons of
every layer by each criterion (and at random), and after dropping layers by ShortGPT block influence
against dropping the same number at random. A sanity check of the criteria, one process, one thread.

    PYTHONPATH=$PWD SECATEURS_DATA=/work/shared/data python benchmarks/hf_criteria_oneshot.py [--epochs 2]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from evaluators.hf import importance, pruning, tasks
from evaluators.measure import torch_threads
from evaluators.tasks import TaskConfig


def prune_width(model, scores: dict[str, torch.Tensor]) -> None:
    for u in pruning.discover(model):
        if u.kind == "heads":
            pruning.prune_heads(model, u.name, pruning.heads_to_keep(u, scores[u.name], u.size // 2, "kv_groups"))
        elif u.kind == "neurons":
            pruning.prune_neurons(model, u.name, torch.argsort(scores[u.name], descending=True)[: u.size // 2].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    task = tasks.make_causal_lm_task(TaskConfig(name="evaluators.hf.tasks:make_causal_lm_task", seed=args.seed))
    with torch_threads(1):
        dense = task.build_model()
        start = time.perf_counter()
        tasks.fit(dense, task, epochs=args.epochs, lr=3e-3, batch_size=32, seed=args.seed)
        train_s = time.perf_counter() - start
        evaluate = lambda m: task.evaluate(m, task.test_batches(64))["perplexity"]  # noqa: E731
        print(f"dense: {pruning.parameter_count(dense):,} params, trained {args.epochs:g} epochs in {train_s:.0f} s, "
              f"held-out perplexity {evaluate(dense):.1f}")
        calibration = task.calibration(samples=128, seed=args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        for criterion in (*importance.CRITERIA, "random"):
            model = copy.deepcopy(dense)
            units = pruning.discover(model)
            if criterion == "random":
                scores = {u.name: torch.rand(u.size, generator=generator) for u in units if u.kind != "layer"}
            else:
                scores = importance.unit_scores(model, units, criterion, calibration)
            prune_width(model, scores)
            print(f"width/2 by {criterion:10}: {pruning.parameter_count(model):,} params, perplexity {evaluate(model):.1f}")
        layers = len(pruning.layer_shapes(dense))
        influence = importance.block_influence(dense, calibration.batches)
        print("block influence per layer:", ", ".join(f"{s:.3f}" for s in influence))
        for count in range(1, layers // 2 + 1):
            model = copy.deepcopy(dense)
            pruning.drop_layers(model, importance.layers_to_drop(model, count, calibration.batches))
            chosen = evaluate(model)
            model = copy.deepcopy(dense)
            pruning.drop_layers(model, torch.randperm(layers, generator=generator)[:count].tolist())
            print(f"drop {count} layer(s): by block influence perplexity {chosen:.1f}, random {evaluate(model):.1f}")


if __name__ == "__main__":
    main()
