"""Tasks: a model factory plus train/test data. Built-in ones by name, user ones by import path."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from evaluators import datasets
from evaluators.models import MODELS, build_model

# Options each built-in task takes in ``task.options``: name -> (default, minimum). All are
# integers; a None default means "all" and null is then allowed.
TASK_OPTIONS: dict[str, dict[str, tuple[int | None, int]]] = {
    "digits": {},
    "fashion_mnist": {"train_size": (None, 1), "test_size": (None, 1)},
    "cifar10": {"train_size": (None, 1), "test_size": (None, 1)},
    "sst2": {"max_len": (50, 1), "min_count": (1, 1), "max_vocab": (20000, 3)},
}


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The ``task:`` section of a config.

    ``name`` is a built-in task (``digits``, ``fashion_mnist``, ``cifar10``, ``sst2``) or an import
    path ``pkg.module:factory`` whose factory takes this config and returns a :class:`Task`. If
    ``checkpoint`` is null the dense model is trained for ``dense_epochs`` and cached, keyed by this
    section's content. Data files are looked up under ``data_root``, else ``$SECATEURS_DATA``, else
    ``~/.cache/secateurs/data`` (see :mod:`evaluators.datasets`).

    >>> TaskConfig(name="digits").dense_epochs
    20
    >>> TaskConfig(name="sst2", options={"max_len": 32}).options
    {'max_len': 32}
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
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # task knobs, see TASK_OPTIONS
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # keyword arguments of the model

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
        for field in ("options", "model_options"):
            value = getattr(self, field)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"{field}: must be a mapping from names to values, but got {value!r}")
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                raise ValueError(f"{field}: values must be plain numbers, strings, booleans or lists, but got {value!r}") from None
        if self.name in TASK_OPTIONS:
            _check_task_options(self.name, self.options)

    def cache_key(self) -> str:
        """Everything that determines the dense model's weights, as canonical JSON.

        Empty ``options`` / ``model_options`` are left out, so keys made before they existed still hold.
        """
        data = dataclasses.asdict(self)
        data.pop("checkpoint")
        for field in ("options", "model_options"):
            if not data[field]:
                data.pop(field)
        return json.dumps(data, sort_keys=True)

    def __hash__(self) -> int:  # the dict fields are not hashable; the canonical JSON is
        return hash((self.cache_key(), self.checkpoint))


def _check_task_options(task: str, options: dict[str, Any]) -> None:
    valid = TASK_OPTIONS[task]
    for key, value in options.items():
        if key not in valid:
            names = ", ".join(sorted(valid)) or "none"
            raise ValueError(f"options: unknown option {key!r} for task {task}; valid: {names}")
        default, minimum = valid[key]
        if value is None and default is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            allowed = f"an integer >= {minimum}" + (" or null (all)" if default is None else "")
            raise ValueError(f"options: {key} for task {task} must be {allowed}, but got {value!r}")


def task_options(config: TaskConfig) -> dict[str, Any]:
    """The built-in task's options: its defaults overlaid with ``config.options``.

    >>> task_options(TaskConfig(name="sst2", options={"max_len": 32}))["max_len"], task_options(TaskConfig(name="sst2"))["min_count"]
    (32, 1)
    """
    return {**{k: default for k, (default, _) in TASK_OPTIONS[config.name].items()}, **config.options}


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
    kwargs.update(config.model_options)
    return TensorTask(
        name="digits",
        num_classes=10,
        model_factory=functools.partial(build_model, model_name, num_classes=10, **kwargs),
        train=(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        test=(torch.from_numpy(x_test), torch.from_numpy(y_test)),
    )


def _model_factory(
    task: str, config: TaskConfig, default: str, inputs: dict[str, Any], example: torch.Tensor, num_classes: int
) -> Callable[[], nn.Module]:
    """The factory of the task's model (``config.model`` or ``default``), given the arguments in
    ``inputs`` that its constructor takes plus ``config.model_options``; built and run once on
    ``example`` so that a model that does not fit the data fails now, not in a trial."""
    name = config.model or default
    parameters = inspect.signature(MODELS[name]).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = [k for k in config.model_options if k not in parameters and not takes_any]
    if unknown:
        valid = ", ".join(k for k, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL)
        raise ValueError(f"task {task}: model_options {', '.join(map(repr, unknown))} not taken by model {name!r}; valid: {valid}")
    kwargs = {k: v for k, v in inputs.items() if k in parameters or takes_any}
    factory = functools.partial(build_model, name, **{**kwargs, **config.model_options})
    try:
        model = factory().eval()
        with torch.no_grad():
            shape = tuple(model(example[:2]).shape)
    except Exception as exc:  # any failure here means: this model does not fit this data
        raise ValueError(
            f"task {task}: model {name!r} does not fit its inputs ({example.dtype}, shape (N, "
            f"{', '.join(map(str, example.shape[1:]))})): {type(exc).__name__}: {exc}"
        ) from None
    if shape != (min(2, len(example)), num_classes):
        raise ValueError(f"task {task}: model {name!r} gives outputs of shape {shape}; expected (N, {num_classes})")
    return factory


def _image_task(name: str, config: TaskConfig, default_model: str, train: datasets.Split, test: datasets.Split) -> TensorTask:
    x_train, x_test = torch.from_numpy(train.x), torch.from_numpy(test.x)
    inputs = {"num_classes": 10, "in_channels": x_train.shape[1], "in_features": int(np.prod(x_train.shape[1:]))}
    return TensorTask(
        name=name,
        num_classes=10,
        model_factory=_model_factory(name, config, default_model, inputs, x_test, 10),
        train=(x_train, torch.from_numpy(train.y)),
        test=(x_test, torch.from_numpy(test.y)),
    )


def make_fashion_mnist_task(config: TaskConfig) -> Task:
    """Fashion-MNIST (60,000 / 10,000 28x28 grayscale images, 10 classes) from its IDX files, as
    Debian's ``dataset-fashion-mnist`` installs them; normalised, NCHW float32. Default model:
    ``fashion_cnn``. Options ``train_size`` / ``test_size`` take class-balanced subsets."""
    options = task_options(config)
    train, test, _ = datasets.load_fashion_mnist(
        datasets.resolve_data_root(config.data_root), train_size=options["train_size"], test_size=options["test_size"]
    )
    return _image_task("fashion_mnist", config, "fashion_cnn", train, test)


def make_cifar10_task(config: TaskConfig) -> Task:
    """CIFAR-10 (32x32 RGB, 10 classes) from a ``cifar10*.npz`` or ``cifar-10-batches-py/``;
    normalised by channel, NCHW float32, no augmentation. Default model: ``resnet20``. Options
    ``train_size`` / ``test_size`` take class-balanced subsets (the same whatever ``seed``)."""
    options = task_options(config)
    train, test, _ = datasets.load_cifar10(
        datasets.resolve_data_root(config.data_root), train_size=options["train_size"], test_size=options["test_size"]
    )
    return _image_task("cifar10", config, "resnet20", train, test)


def make_sst2_task(config: TaskConfig) -> Task:
    """SST-2 binary sentiment from ``sst2.csv``: lowercase word tokens, a vocabulary from the train
    split (options ``min_count``, ``max_vocab``), ids padded/truncated to ``max_len``. Trains on the
    train split, tests on the test split. Default model: ``text_lstm``."""
    options = task_options(config)
    train, test, vocab, _ = datasets.load_sst2(
        datasets.resolve_data_root(config.data_root),
        max_len=options["max_len"], min_count=options["min_count"], max_vocab=options["max_vocab"],
    )
    x_train, x_test = torch.from_numpy(train.x), torch.from_numpy(test.x)
    inputs = {"num_classes": 2, "vocab_size": len(vocab), "max_len": options["max_len"], "pad_idx": vocab[datasets.PAD]}
    return TensorTask(
        name="sst2",
        num_classes=2,
        model_factory=_model_factory("sst2", config, "text_lstm", inputs, x_test, 2),
        train=(x_train, torch.from_numpy(train.y)),
        test=(x_test, torch.from_numpy(test.y)),
    )


TASKS: dict[str, Callable[[TaskConfig], Task]] = {
    "digits": make_digits_task,
    "fashion_mnist": make_fashion_mnist_task,
    "cifar10": make_cifar10_task,
    "sst2": make_sst2_task,
}


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
