"""A regression task scored by RMSE (minimised): scikit-learn's bundled diabetes data (442 patients,
10 features, a disease-progression score), written once to ``.npy`` files and read lazily from them
by a ``Dataset``, one example at a time. Used by ``configs/custom_metric.yaml``.

``task.model`` picks the model (``mlp``, the default, or ``wide``); ``task.data_root`` is where the
files go (default ``~/.cache/secateurs/examples/diabetes``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from evaluators.tasks import Task, TaskConfig

SCALE = 100.0  # the model predicts the score / 100; RMSE and MAE are reported in the score's own units
MODELS = {"mlp": (64, 64), "wide": (256, 128)}


class DiabetesFiles(torch.utils.data.Dataset):
    """Examples read one at a time from memory-mapped ``.npy`` files (opened on first use, so that
    DataLoader worker processes open their own)."""

    def __init__(self, folder: Path, split: str) -> None:
        self.paths = (folder / f"{split}_x.npy", folder / f"{split}_y.npy")
        self.arrays: tuple[np.ndarray, np.ndarray] | None = None
        self.length = int(np.load(self.paths[1], mmap_mode="r").shape[0])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.arrays is None:
            self.arrays = tuple(np.load(p, mmap_mode="r") for p in self.paths)  # type: ignore[assignment]
        x, y = self.arrays
        return torch.from_numpy(np.array(x[index], dtype=np.float32)), torch.tensor([y[index] / SCALE], dtype=torch.float32)


def regressor(hidden: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    width = 10
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 1))


def mse_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def regression_metrics(model: nn.Module, batches) -> dict[str, float]:
    squared = absolute = total = 0.0
    targets = []
    for x, y in batches:
        error = (model(x) - y) * SCALE
        squared += float((error ** 2).sum())
        absolute += float(error.abs().sum())
        total += len(y)
        targets.append(y * SCALE)
    spread = float(((torch.cat(targets) - torch.cat(targets).mean()) ** 2).sum())
    return {"rmse": math.sqrt(squared / total), "mae": absolute / total, "r2": 1 - squared / spread}


def write_files(folder: Path) -> None:
    """The diabetes data split 80/20 with a fixed seed, one ``.npy`` per array (written atomically)."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True, scaled=True)
    order = np.random.default_rng(0).permutation(len(y))
    cut = int(0.8 * len(y))
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", order[:cut]), ("test", order[cut:])):
        for name, array in (("x", x[rows].astype(np.float32)), ("y", y[rows].astype(np.float32))):
            tmp = folder / f".{split}_{name}.{os.getpid()}.npy"
            np.save(tmp, array)
            os.replace(tmp, folder / f"{split}_{name}.npy")


def make_task(config: TaskConfig) -> Task:
    if (config.model or "mlp") not in MODELS:
        raise ValueError(f"task.model: unknown model {config.model!r} for the diabetes example; valid: {', '.join(MODELS)}")
    folder = Path(config.data_root or "~/.cache/secateurs/examples/diabetes").expanduser()
    if not (folder / "test_y.npy").exists():
        write_files(folder)
    hidden = MODELS[config.model or "mlp"]
    return Task(
        name="diabetes",
        model=lambda: regressor(hidden),
        train_data=DiabetesFiles(folder, "train"),
        eval_data=DiabetesFiles(folder, "test"),
        loss=mse_loss,
        evaluate=regression_metrics,
        objectives={"rmse": "min"},
    )
