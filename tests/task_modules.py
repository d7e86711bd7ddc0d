"""Task factories the tests load by import path (``tests.task_modules:...``), as users name theirs;
the Ray workers of the end-to-end tests import them from here too."""
from __future__ import annotations

import dataclasses
import math

import torch

from evaluators.builtin_tasks import make_digits_task
from evaluators.tasks import Task, TaskConfig, top1_accuracy


def returns_a_dict(config: TaskConfig):
    return {"model": None}


class LegacyTask:
    """The protocol user modules returned before the Task dataclass: methods returning tensors."""

    name = "legacy"
    num_classes = 3

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)

    def build_model(self):
        return torch.nn.Linear(5, 3)

    def train_data(self):
        return self.x, self.y

    def test_data(self):
        return self.x[:10], self.y[:10]


def legacy(config: TaskConfig):
    return LegacyTask()


def choice_of_models(config: TaskConfig) -> Task:
    """A task offering its own model names through ``task.model``."""
    widths = {"narrow": 4, "wide": 32}
    if config.model not in widths:
        raise ValueError(f"task.model: {config.model!r} is not one of this task's models; valid: {', '.join(widths)}")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    width = widths[config.model]
    return Task(model=lambda: torch.nn.Sequential(torch.nn.Linear(5, width), torch.nn.ReLU(), torch.nn.Linear(width, 3)),
                train_data=(x, y), eval_data=(x, y), num_classes=3)


def nan_when_pruned(model: torch.nn.Module, batches) -> dict[str, float]:
    """Top-1 accuracy, but NaN once the first conv has lost more than a third of its 32 filters."""
    scores = top1_accuracy(model, batches)
    return {"accuracy": math.nan} if model.features[0].out_channels < 22 else scores


def digits_nan_when_pruned(config: TaskConfig) -> Task:
    """Digits whose evaluation returns NaN for models pruned hard in ``features.0``: those trials fail."""
    digits = make_digits_task(TaskConfig(name="digits", dense_epochs=config.dense_epochs))
    return dataclasses.replace(digits, name="nan_when_pruned", evaluate=nan_when_pruned)


def digits_declaring_map(config: TaskConfig) -> Task:
    """Digits declaring an objective its evaluation does not return."""
    digits = make_digits_task(TaskConfig(name="digits", dense_epochs=config.dense_epochs))
    return dataclasses.replace(digits, name="declares_map", objectives={"map": "max"})


def digits_nan_always(config: TaskConfig) -> Task:
    """Digits whose evaluation returns NaN even for the dense model."""
    digits = make_digits_task(TaskConfig(name="digits", dense_epochs=config.dense_epochs))
    return dataclasses.replace(digits, name="nan_always", evaluate=lambda model, batches: {"accuracy": math.nan, "f1": 0.5})


class ResidualMLP(torch.nn.Module):
    """A user's own residual model, written without any library block: a linear stem, ``depth``
    blocks ``relu(x + fc2(relu(fc1(x))))`` and a linear head, on flattened 8x8 digits."""

    def __init__(self, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.ReLU())
        self.blocks = torch.nn.ModuleList(ResidualLayer(width) for _ in range(depth))
        self.head = torch.nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class ResidualLayer(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(width, 2 * width)
        self.fc2 = torch.nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.fc2(torch.relu(self.fc1(x))))


def digits_residual_mlp(config: TaskConfig) -> Task:
    """Digits with :class:`ResidualMLP`: three removable blocks, found by tracing."""
    digits = make_digits_task(TaskConfig(name="digits", dense_epochs=config.dense_epochs))
    return dataclasses.replace(digits, name="digits_residual_mlp", model=ResidualMLP)
