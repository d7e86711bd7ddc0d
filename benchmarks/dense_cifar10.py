"""Train the dense ResNet-20 the search-quality benchmarks prune: a converged model, not a weak one.

It trains on all 10,000 training images of the CIFAR-10 subset with standard augmentation (random
crop with padding 4, horizontal flip: ``task.options.augment``), SGD with a cosine schedule, and
scores the 2,000 test images after each epoch, so the curve shows where it stops improving. The
weights go where secateurs' dense cache keeps them for ``configs/cifar10_resnet20_converged.yaml``,
so every search on that config (and ``benchmarks/search_quality.py``) starts from this model.

    SECATEURS_DATA=../shared/data python benchmarks/dense_cifar10.py [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from evaluators.checkpoint import cached_checkpoint_path, dense_training
from evaluators.measure import torch_threads
from evaluators.tasks import make_task
from evaluators.train import train
from search.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "cifar10_resnet20_converged.yaml"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dense_cifar10_resnet20.json"))
    args = parser.parse_args()
    config = load_config(args.config).task
    task = make_task(config)
    path = cached_checkpoint_path(config, task)
    torch.manual_seed(config.seed)
    model = task.build_model()
    curve: list[dict] = []
    started = time.perf_counter()

    def on_epoch(epoch: int, steps: int, loss: float, seconds: float) -> None:
        accuracy = task.score(model)["accuracy"]
        model.train()
        curve.append({"epoch": epoch, "loss": loss, "test_accuracy": accuracy, "seconds": seconds})
        print(f"epoch {epoch}/{config.dense_epochs}: loss {loss:.4f}, test accuracy {accuracy:.4f} ({seconds:.0f} s)", flush=True)

    with torch_threads(args.threads):
        train(model, task.train_source, dense_training(config), seed=config.seed, loss=task.loss,
              transform=task.train_transform, on_epoch=on_epoch)
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        torch.save(model.state_dict(), handle)
    os.replace(handle.name, path)
    last = [c["test_accuracy"] for c in curve[-max(1, len(curve) // 10):]]
    result = {"config": args.config, "task": json.loads(config.cache_key()), "checkpoint": str(path),
              "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "wall_s": time.perf_counter() - started,
              "final_test_accuracy": curve[-1]["test_accuracy"], "last_tenth_range": [min(last), max(last)], "curve": curve}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"dense ResNet-20: test accuracy {curve[-1]['test_accuracy']:.4f}; over the last tenth of the epochs "
          f"{min(last):.4f}-{max(last):.4f}; saved at {path}")


if __name__ == "__main__":
    main()
