"""Tasks: a model factory plus train/test data. Built-in ones by name, user ones by import path."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn

from evaluators.models import MODELS, build_model


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The ``task:`` section of a config.

    ``name`` is a built-in task (``digits``) or an import path ``pkg.module:factory`` whose
    factory takes this config and returns a :class:`Task`. If ``checkpoint`` is null the dense
    model is trained for ``dense_epochs`` and cached, keyed by this section's content.

    >>> TaskConfig(name="digits").dense_epochs
    20
    """

    __pydantic_config__ = {"extra": "forbid"}

    name: str = "digits"
    model: str | None = None
    checkpoint: str | None = None
    data_root: str | None = None
    dense_epochs: int = 20
    dense_lr: float = 0.05
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if ":" not in self.name and self.name not in TASKS:
            raise ValueError(f"name: unknown task {self.name!r}; valid: {', '.join(sorted(TASKS))} or 'pkg.module:factory'")
        if self.model is not None and self.model not in MODELS:
            raise ValueError(f"model: unknown model {self.model!r}; valid: {', '.join(sorted(MODELS))}")
        if self.dense_epochs < 1:
            raise ValueError(f"dense_epochs: must be >= 1, but got {self.dense_epochs}")
        if not self.dense_lr > 0:
            raise ValueError(f"dense_lr: must be > 0, but got {self.dense_lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, but got {self.batch_size}")

    def cache_key(self) -> str:
        """Everything that determines the dense model's weights, as canonical JSON."""
        data = dataclasses.asdict(self)
        data.pop("checkpoint")
        return json.dumps(data, sort_keys=True)


class Task(Protocol):
    """What secateurs needs from a task: a fresh dense model and classification data as tensors."""

    name: str
    num_classes: int

    def build_model(self) -> nn.Module: ...

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclasses.dataclass
class TensorTask:
    """A classification task whose data fits in memory as tensors.

    >>> t = TensorTask("toy", 2, lambda: nn.Linear(3, 2), (torch.zeros(4, 3), torch.zeros(4).long()),
    ...                (torch.zeros(2, 3), torch.zeros(2).long()))
    >>> t.test_data()[0].shape
    torch.Size([2, 3])
    """

    name: str
    num_classes: int
    model_factory: Callable[[], nn.Module]
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]

    def build_model(self) -> nn.Module:
        return self.model_factory()

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.test


def make_digits_task(config: TaskConfig) -> Task:
    """scikit-learn's bundled 8x8 digits (1,797 images), split 80/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0 - 0.5)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    model_name = config.model or "digits_cnn"
    kwargs = {"in_features": 64} if model_name == "mlp" else {}
    return TensorTask(
        name="digits",
        num_classes=10,
        model_factory=functools.partial(build_model, model_name, num_classes=10, **kwargs),
        train=(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        test=(torch.from_numpy(x_test), torch.from_numpy(y_test)),
    )


TASKS: dict[str, Callable[[TaskConfig], Task]] = {"digits": make_digits_task}


def _load_factory(path: str) -> Callable[[TaskConfig], Task]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"task.name: cannot import {module_name!r} from {path!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"task.name: {path!r} names no callable {attr!r} in module {module_name!r}")
    return factory


@functools.lru_cache(maxsize=4)
def _make_task_cached(config: TaskConfig) -> Task:
    factory = TASKS.get(config.name) or _load_factory(config.name)
    return factory(config)


def make_task(config: TaskConfig) -> Task:
    """Build (once per process) the task a config names."""
    return _make_task_cached(config)
