"""Tasks: the model, data, loss, evaluation and objectives secateurs prunes for.

A task is a :class:`Task`. Built-in ones are named (``digits``, ``fashion_mnist``, ``cifar10``,
``sst2``; see :mod:`evaluators.builtin_tasks`); a user's is an import path ``pkg.module:factory``
whose factory takes the ``task:`` section (:class:`TaskConfig`) and returns a :class:`Task`.
It runs where the data is read: in the driver and again in each Ray worker, so every worker opens
the data itself and nothing big is shipped from the driver.

>>> import torch
>>> from torch import nn
>>> task = Task(model=lambda: nn.Linear(3, 2),
...             train_data=(torch.randn(8, 3), torch.randint(0, 2, (8,))),
...             eval_data=(torch.randn(4, 3), torch.randint(0, 2, (4,))))
>>> sorted(task.score(task.build_model()))
['accuracy']
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from evaluators.batches import (CALIBRATION_SAMPLES, Batch, Calibration, Inputs, batch_size_of, cross_entropy_loss, forward, inputs_of,
                                logits_of, map_tensors, slice_batch, targets_of)
from evaluators.checks import DIRECTIONS, TaskError, check_scores, check_task
from evaluators.data import DataSource, as_source, count_batches, endless_batches

Loss = Callable[[nn.Module, Batch], torch.Tensor]
Evaluate = Callable[[nn.Module, Iterable[Batch]], Mapping[str, float]]
Transform = Callable[[Batch, torch.Generator], Batch]

DEFAULT_OBJECTIVES: dict[str, str] = {"accuracy": "max"}


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The ``task:`` section of a config.

    ``name`` is a built-in task (``digits``, ``fashion_mnist``, ``cifar10``, ``sst2``) or an import
    path ``pkg.module:factory`` whose factory takes this config and returns a :class:`Task`; for
    such a task ``model``, ``options`` and ``model_options`` mean what the factory makes of them.
    If ``checkpoint`` is null the dense model is trained for ``dense_epochs`` and cached, keyed by
    this section's content, the training data and the model's architecture and code; ``retrain``
    trains it again even when cached. Data files are looked up under ``data_root``, else
    ``$SECATEURS_DATA``, else ``~/.cache/secateurs/data`` (see :mod:`evaluators.datasets`).

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
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # task knobs (built-in ones: see TASK_OPTIONS)
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # keyword arguments of the model
    retrain: bool = False  # train the dense model again even if a cached one fits (not part of the cache key)

    def __post_init__(self) -> None:
        from evaluators.builtin_tasks import TASKS, check_builtin

        if ":" not in self.name and self.name not in TASKS:
            raise ValueError(f"name: unknown task {self.name!r}; valid: {', '.join(sorted(TASKS))} or 'pkg.module:factory'")
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
        if self.name in TASKS:
            check_builtin(self)

    def cache_key(self) -> str:
        """Everything in this section that determines the dense model's weights, as canonical JSON.

        Empty ``options`` / ``model_options`` are left out, so keys made before they existed still hold.
        """
        data = dataclasses.asdict(self)
        data.pop("checkpoint")
        data.pop("retrain")
        for field in ("options", "model_options"):
            if not data[field]:
                data.pop(field)
        return json.dumps(data, sort_keys=True)

    def __hash__(self) -> int:  # the dict fields are not hashable; the canonical JSON is
        return hash((self.cache_key(), self.checkpoint, self.retrain))


def top1_accuracy(model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
    """The default evaluation: the share of examples whose largest logit is their integer target.

    >>> import torch
    >>> top1_accuracy(nn.Identity(), [(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1]))])
    {'accuracy': 0.5}
    """
    correct = total = 0
    for batch in batches:
        targets = targets_of(batch)
        if targets is None:
            raise TaskError("the default evaluation (top-1 accuracy) needs targets: batches as (inputs, targets) or dicts "
                            "with 'labels'; or give the task an evaluate(model, batches)")
        correct += int((logits_of(forward(model, batch)).argmax(dim=1) == targets).sum())
        total += len(targets)
    if total == 0:
        raise TaskError("eval_data: yielded no example; expected at least one")
    return {"accuracy": correct / total}


@dataclasses.dataclass(frozen=True)
class FinetuneRun:
    """What a task's own fine-tune hook (``Task.finetune``) receives: the pruned model and its budget.

    The hook trains ``model`` in place however it likes (its own loop, a Lightning or Hugging Face
    Trainer) and returns the number of optimizer steps it took (None: ``steps``). ``batches()``
    yields secateurs' training batches on ``device``, shuffled and augmented, pass after pass.

    >>> def finetune(run: FinetuneRun) -> int:
    ...     opt = torch.optim.Adam(run.model.parameters(), lr=run.lr)
    ...     for _, batch in zip(range(run.steps), run.batches()):
    ...         opt.zero_grad(); run.loss(run.model, batch).backward(); opt.step()
    ...     return run.steps
    """

    model: nn.Module
    steps: int                    # the budget: finetune.epochs passes (fractions allowed), capped by finetune.max_steps
    epochs: float
    lr: float
    batch_size: int
    device: torch.device
    seed: int
    teacher: nn.Module | None     # the dense model (eval mode) when finetune.distill_alpha > 0, else None
    distill_alpha: float
    distill_temperature: float
    settings: Mapping[str, Any]   # every finetune knob (momentum, weight_decay, optimizer, amp, ...)
    loss: Loss
    batches: Callable[[], Iterator[Batch]]


FinetuneHook = Callable[[FinetuneRun], "int | None"]


@dataclasses.dataclass
class Task:
    """A model and its data, as a user module returns it.

    - ``model``: a function (or class) that builds a fresh model of the dense architecture.
    - ``train_data`` / ``eval_data`` / ``calibration_data`` (default: ``train_data``): tensors in
      memory, a torch ``Dataset`` (map-style or iterable), a ``DataLoader``, or a function
      ``make(batch_size)`` returning one (see :mod:`evaluators.data`). A batch is a tensor, a tuple
      ``(inputs..., targets)`` or a dict (``labels`` = targets; see :mod:`evaluators.batches`).
    - ``loss(model, batch) -> tensor``: used to fine-tune, to train the dense model, and by the
      calibration-based criteria (default: cross-entropy on integer targets).
    - ``evaluate(model, batches) -> {name: number}``: scores the model on the evaluation batches
      (default: top-1 accuracy, ``{"accuracy": ...}``). Every name it returns is recorded.
    - ``objectives``: the default objectives and their directions, e.g. ``{"rmse": "min"}``.
    - ``example_input``: model inputs of one example for tracing, with a batch dimension (default:
      the first evaluation example's inputs). Latency is timed on evaluation inputs.
    - ``finetune(run: FinetuneRun)``: the user's own fine-tune loop (default: secateurs' loop with ``loss``).
    - ``train_transform(batch, generator)``: augmentation of training batches (dense training and fine-tuning).
    - ``num_classes``: when given, the model's outputs and the labels are checked against it.

    >>> task = Task(model=lambda: nn.Linear(3, 1), train_data=torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 1)),
    ...             eval_data=(torch.randn(4, 3), torch.randn(4, 1)),
    ...             loss=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]),
    ...             evaluate=lambda m, batches: {"mse": float(sum(((m(x) - y) ** 2).sum() for x, y in batches) / 4)},
    ...             objectives={"mse": "min"})
    >>> list(task.score(task.build_model()))
    ['mse']
    """

    model: Callable[[], nn.Module]
    train_data: Any
    eval_data: Any
    calibration_data: Any = None
    loss: Loss = cross_entropy_loss
    evaluate: Evaluate = top1_accuracy
    objectives: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_OBJECTIVES))
    example_input: Inputs | None = None
    finetune: FinetuneHook | None = None
    train_transform: Transform | None = None
    num_classes: int | None = None
    name: str = "custom"
    eval_batch_size: int = 256
    num_workers: int = 0  # DataLoader worker processes for Dataset data (0: read in the process that trains)

    def __post_init__(self) -> None:
        for field in ("model", "loss", "evaluate"):
            if not callable(getattr(self, field)):
                raise TaskError(f"Task.{field}: must be callable, but got {type(getattr(self, field)).__name__}")
        for field in ("finetune", "train_transform"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise TaskError(f"Task.{field}: must be callable or None, but got {type(value).__name__}")
        if not isinstance(self.objectives, Mapping) or not self.objectives:
            raise TaskError(f"Task.objectives: must map metric names to 'min' or 'max', but got {self.objectives!r}")
        for key, direction in self.objectives.items():
            if direction not in DIRECTIONS:
                raise TaskError(f"Task.objectives.{key}: direction must be min or max, but got {direction!r}")
        for field, minimum in (("eval_batch_size", 1), ("num_workers", 0)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise TaskError(f"Task.{field}: must be an integer >= {minimum}, but got {value!r}")
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise TaskError(f"Task.num_classes: must be an integer >= 1 or None, but got {self.num_classes!r}")
        self.train_source: DataSource = as_source(self.train_data, "train_data", num_workers=self.num_workers)
        self.eval_source: DataSource = as_source(self.eval_data, "eval_data", num_workers=self.num_workers)
        self.calibration_source: DataSource = (self.train_source if self.calibration_data is None else
                                               as_source(self.calibration_data, "calibration_data", num_workers=self.num_workers))
        self._cache: dict[Any, Any] = {}

    def build_model(self) -> nn.Module:
        """A fresh model of the dense architecture (random weights)."""
        return self.model()

    def eval_batches(self, device: torch.device | str | None = None, limit: int | None = None) -> Iterator[Batch]:
        """The evaluation batches (on ``device``), the first ``limit`` examples only when given."""
        seen = 0
        for batch in self.eval_source.batches(self.eval_batch_size, device=device):
            if limit is not None:
                size = batch_size_of(batch)
                if seen + size > limit:
                    if limit > seen:
                        yield slice_batch(batch, 0, limit - seen)
                    return
                seen += size
            yield batch

    def score(self, model: nn.Module, device: torch.device | str | None = None, limit: int | None = None) -> dict[str, float]:
        """``evaluate`` on the evaluation data (model in eval mode, no gradients), checked: a dict of
        finite numbers (else :class:`~evaluators.checks.EvaluationError`)."""
        model.eval()
        with torch.no_grad():
            return check_scores(self.evaluate(model, self.eval_batches(device, limit)))

    def inputs(self, examples: int) -> Inputs:
        """Model inputs of the first ``examples`` evaluation examples (repeated when there are
        fewer): what latency is timed on and exports are checked with."""
        key = ("inputs", examples)
        if key not in self._cache:
            first = self.eval_source.first(examples)
            if first is None:
                raise TaskError("eval_data: is empty; expected at least one example")
            inputs = inputs_of(first)
            have = batch_size_of(first)
            if have < examples:
                repeat = -(-examples // have)
                inputs = map_tensors(inputs, lambda t: t.repeat(repeat, *([1] * (t.dim() - 1)))[:examples])
            self._cache[key] = inputs
        return self._cache[key]

    def example(self) -> Inputs:
        """Model inputs of one example with a batch dimension: ``example_input``, else the first evaluation example's."""
        return self.example_input if self.example_input is not None else self.inputs(1)

    def calibration(self, samples: int = CALIBRATION_SAMPLES, batch_size: int = 64, seed: int = 0) -> Calibration:
        """``samples`` calibration examples in batches, with the task's loss (for ``taylor`` and
        ``wanda``): a fixed draw (``seed``) from data in memory or a map-style Dataset, so that data
        sorted by class still gives a mix; the first ones of a stream. Read once per process."""
        key = ("calibration", samples, batch_size, seed)
        if key not in self._cache:
            batches = self.calibration_source.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
            self._cache[key] = Calibration.from_batches(batches, self.loss, samples=samples)
        return self._cache[key]

    def steps_per_epoch(self, batch_size: int) -> int:
        """Training batches in one pass (counted by reading one pass when the data has no length)."""
        key = ("steps", batch_size)
        if key not in self._cache:
            self._cache[key] = count_batches(self.train_source, batch_size)
        return self._cache[key]

    def train_batches(self, batch_size: int, *, seed: int, device: torch.device | str | None = None) -> Iterator[Batch]:
        """Training batches pass after pass, shuffled (seeded) and augmented by ``train_transform``."""
        return endless_batches(self.train_source, batch_size, generator=torch.Generator().manual_seed(seed), device=device,
                               transform=self.train_transform)

    def fingerprint(self) -> str:
        """A digest of the training data, for the dense model's cache key."""
        if "fingerprint" not in self._cache:
            self._cache["fingerprint"] = self.train_source.fingerprint()
        return self._cache["fingerprint"]


def _from_legacy(obj: Any) -> Task | None:
    """A task object of the old protocol (``build_model()``, ``train_data()`` and ``test_data()``
    returning tensors ``(x, y)``, ``num_classes``) as a :class:`Task`; None if ``obj`` is not one."""
    if not all(callable(getattr(obj, m, None)) for m in ("build_model", "train_data", "test_data")):
        return None
    return Task(model=obj.build_model, train_data=tuple(obj.train_data()), eval_data=tuple(obj.test_data()),
                num_classes=getattr(obj, "num_classes", None), name=str(getattr(obj, "name", "custom")))


def _load_factory(path: str) -> Callable[[TaskConfig], Any]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"task.name: cannot import {module_name!r} from {path!r}: {exc} (is its folder on PYTHONPATH? "
                         "Ray workers must import it too)") from None
    except Exception as exc:  # whatever the module raises as it is imported
        raise ValueError(f"task.name: cannot import {module_name!r} from {path!r}: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"task.name: {path!r} names no callable {attr!r} in module {module_name!r}")
    return factory


@functools.lru_cache(maxsize=4)
def _make_task_cached(config: TaskConfig) -> Task:
    from evaluators.builtin_tasks import TASKS

    factory = TASKS.get(config.name) or _load_factory(config.name)
    try:
        task = factory(config)
    except (ValueError, MemoryError):
        raise
    except Exception as exc:  # a user factory failing (a file missing, ...): bad input, said in one line
        raise TaskError(f"task.name: {config.name!r} failed to build its task: {type(exc).__name__}: {exc}") from None
    if not isinstance(task, Task):
        task = _from_legacy(task) or task
    if not isinstance(task, Task):
        raise TaskError(f"task.name: {config.name!r} returned {type(task).__name__}; expected an evaluators.tasks.Task "
                        "(see the README, 'Bring your own model')")
    check_task(task)
    return task


def make_task(config: TaskConfig) -> Task:
    """Build (once per process) the task a config names, and check it (one forward pass, outputs,
    labels, lengths, finite values; see :func:`evaluators.checks.check_task`)."""
    return _make_task_cached(config)

