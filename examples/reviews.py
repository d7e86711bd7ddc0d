"""A text classifier whose batches are dicts and whose model takes two inputs: token ids and an
attention mask (``model(input_ids=..., attention_mask=...)``, as Hugging Face models do). Reviews
of varying length are generated once into ``.npy`` files and read lazily, one at a time; scored by
accuracy and F1. Used by ``configs/reviews.yaml``.

``task.options``: ``vocab`` (token ids, default 200), ``length`` (padded length, default 32);
``task.model_options`` go to :class:`BagOfEmbeddings`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from evaluators.tasks import Task, TaskConfig


class ReviewFiles(torch.utils.data.Dataset):
    """One review at a time from memory-mapped ``.npy`` files, as a dict with ``labels``."""

    def __init__(self, folder: Path, split: str) -> None:
        self.ids = np.load(folder / f"{split}_ids.npy", mmap_mode="r")
        self.labels = np.load(folder / f"{split}_labels.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        ids = torch.from_numpy(np.array(self.ids[index]))
        return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": int(self.labels[index])}


class BagOfEmbeddings(nn.Module):
    """Token embeddings averaged over the unmasked positions, then an MLP."""

    def __init__(self, vocab: int = 200, dim: int = 32, hidden: int = 64, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        return self.mlp((self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1))


def accuracy_and_f1(model: nn.Module, batches) -> dict[str, float]:
    tp = fp = fn = correct = total = 0
    for batch in batches:
        predicted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).argmax(1)
        labels = batch["labels"]
        tp += int(((predicted == 1) & (labels == 1)).sum())
        fp += int(((predicted == 1) & (labels == 0)).sum())
        fn += int(((predicted == 0) & (labels == 1)).sum())
        correct += int((predicted == labels).sum())
        total += len(labels)
    return {"accuracy": correct / total, "f1": 2 * tp / max(2 * tp + fp + fn, 1)}


def write_reviews(folder: Path, vocab: int, length: int, n: int = 5000) -> None:
    """Reviews of 6 to ``length`` tokens; positive when "good" tokens (the first third of the ids)
    outnumber "bad" ones (the second third)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(2, vocab, (n, length))
    ids[np.arange(length) >= rng.integers(6, length + 1, (n, 1))] = 0
    third = vocab // 3
    labels = (((ids >= 2) & (ids < third)).sum(1) > ((ids >= third) & (ids < 2 * third)).sum(1)).astype(np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", slice(0, 4000)), ("test", slice(4000, n))):
        for name, array in (("ids", ids[rows]), ("labels", labels[rows])):
            tmp = folder / f".{split}_{name}.{os.getpid()}.npy"
            np.save(tmp, array)
            os.replace(tmp, folder / f"{split}_{name}.npy")


def make_task(config: TaskConfig) -> Task:
    vocab, length = int(config.options.get("vocab", 200)), int(config.options.get("length", 32))
    folder = Path(config.data_root or "~/.cache/secateurs/examples/reviews").expanduser() / f"v{vocab}-l{length}"
    if not (folder / "test_labels.npy").exists():
        write_reviews(folder, vocab, length)
    return Task(
        name="reviews",
        model=lambda: BagOfEmbeddings(vocab=vocab, **config.model_options),
        train_data=ReviewFiles(folder, "train"),
        eval_data=ReviewFiles(folder, "test"),
        evaluate=accuracy_and_f1,
        objectives={"accuracy": "max"},
        num_classes=2,
    )
