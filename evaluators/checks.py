"""Checks of a task before any work, and of what its evaluation returns: one line per problem.

:func:`check_task` runs once when a task is built: one batch of each data set, one forward pass
and one loss, so that a model with the wrong number of outputs, float or out-of-range labels,
tensors of different lengths, an empty evaluation set, NaN inputs, numpy arrays or a batch the
model cannot take stop the command with a line that says what was found and what was expected.
:func:`check_scores` and :func:`check_objectives` check what an evaluation returned.

>>> check_objectives({"rmse": "min"}, {"rmse": 0.3, "mae": 0.2})
{'rmse': 'min'}
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from evaluators.batches import Batch, batch_size_of, leaves, cross_entropy_loss, forward, inputs_of, logits_of, targets_of

DIRECTIONS = ("min", "max")
# What a trial measures besides the task's evaluation: each may be an objective too.
MEASURED: tuple[str, ...] = ("latency_ms", "latency_p10_ms", "latency_p90_ms", "size_mb", "macs", "params", "param_sparsity",
                             "tokens_per_s")  # tokens_per_s: models of token ids only
CHANGE_SUFFIX = "_change"  # <name>_change = trial value - dense value, for every score and for macs and params
# Names a trial records beside the scores; an evaluation may not return them.
RESERVED: tuple[str, ...] = (*MEASURED, "accuracy_drop", "finetune_steps", "bn_recalibration_batches", "time_prune_s",
                             "time_finetune_s", "time_measure_s", "onnx_max_abs_diff", "fidelity", "blocks_dropped", "quantized_ops")
CHECK_EXAMPLES = 8


class TaskError(ValueError):
    """A task that cannot work: the message names the field, what was found and what was expected."""


class EvaluationError(ValueError):
    """An evaluation that returned something other than finite numbers by name (a failed trial)."""


def describe(value: Any) -> str:
    """A batch or model inputs in a few words: structure, dtypes and shapes.

    >>> describe({"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": torch.zeros(2)})
    'dict(input_ids: int64 (2, 5), labels: float32 (2,))'
    """
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"numpy {value.dtype} {value.shape}"
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + ")"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}(" + ", ".join(describe(v) for v in value) + ")"
    return type(value).__name__


def _first_batch(source: Any, field: str) -> Batch:
    try:
        batch = next(iter(source.batches(CHECK_EXAMPLES)), None)
    except TaskError:
        raise
    except ValueError as exc:
        raise TaskError(str(exc)) from None
    except Exception as exc:
        raise TaskError(f"{field}: reading the first batch failed: {type(exc).__name__}: {exc}") from None
    if batch is None:
        raise TaskError(f"{field}: is empty; expected at least one example")
    if not isinstance(batch, (torch.Tensor, tuple, list, dict)):
        raise TaskError(f"{field}: a batch must be a tensor, a tuple (inputs..., targets) or a dict, but got {describe(batch)}")
    for path, leaf in leaves(batch):
        if isinstance(leaf, np.ndarray):
            raise TaskError(f"{field}: batches must hold torch tensors, but {path or 'the batch'} is a numpy array; "
                            "convert with torch.from_numpy (a Dataset's examples are converted by its DataLoader)")
    return batch


def _check_finite(batch: Batch, field: str, whole: Any = None) -> None:
    """Every floating-point model input finite (over all of ``whole`` when the data is in memory)."""
    for path, leaf in leaves(inputs_of(whole if whole is not None else batch)):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
            where = "the data" if whole is not None else "the first batch"
            raise TaskError(f"{field}: {where} has non-finite values (NaN or inf) in its inputs{path}; expected finite numbers")


def _check_class_targets(targets: Any, field: str, classes: int, whole_targets: Any = None) -> None:
    if targets is None:
        raise TaskError(f"{field}: batches have no targets, which the default loss and evaluation need: give batches as "
                        "(inputs, targets) or dicts with 'labels'; or give the task its own loss and evaluate")
    if not isinstance(targets, torch.Tensor):
        raise TaskError(f"{field}: targets must be a tensor of class ids, but got {describe(targets)}")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TaskError(f"{field}: labels are {str(targets.dtype).removeprefix('torch.')}; the default loss (cross-entropy) "
                        "and evaluation (accuracy) need integer class ids: give the task a loss(model, batch) and "
                        "evaluate(model, batches) for other targets")
    values = whole_targets if isinstance(whole_targets, torch.Tensor) else targets
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= classes):
        raise TaskError(f"{field}: labels must lie in [0, {classes - 1}] for a model with {classes} outputs, but got values "
                        f"from {int(values.min())} to {int(values.max())}")


def check_task(task: Any) -> None:
    """Check a :class:`~evaluators.tasks.Task` before any work: one batch of each data set, one
    forward pass in eval mode and one loss in train mode on a fresh model. Raises one
    :class:`TaskError` line naming what is wrong."""
    try:
        model = task.build_model()
    except Exception as exc:
        raise TaskError(f"Task.model: building the model failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise TaskError(f"Task.model: must return a torch.nn.Module, but returned {type(model).__name__}")
    default_loss = task.loss is cross_entropy_loss
    from evaluators.tasks import top1_accuracy

    default_eval = task.evaluate is top1_accuracy
    sources = [("train_data", task.train_source), ("eval_data", task.eval_source)]
    if task.calibration_source is not task.train_source:
        sources.append(("calibration_data", task.calibration_source))
    first: dict[str, Batch] = {}
    for field, source in sources:
        batch = _first_batch(source, field)
        whole = getattr(source, "data", None)  # in memory: check every row
        _check_finite(batch, field, whole)
        first[field] = batch
    model.eval()
    outputs: dict[str, torch.Tensor] = {}
    for field, batch in first.items():
        try:
            with torch.no_grad():
                output = forward(model, batch)
        except Exception as exc:
            message = " ".join(str(exc).split())[:300]
            raise TaskError(f"{field}: the model cannot take its batches: it got inputs {describe(inputs_of(batch))} and raised "
                            f"{type(exc).__name__}: {message}") from None
        try:
            logits = logits_of(output)
        except TypeError:
            raise TaskError(f"{field}: the model's output holds no tensor (got {type(output).__name__}); expected a tensor, "
                            "a tuple starting with one, or an object with .logits") from None
        size = batch_size_of(batch)
        if logits.dim() == 0 or logits.shape[0] != size:
            raise TaskError(f"{field}: the model gives outputs of shape {tuple(logits.shape)} for a batch of {size} examples; "
                            "expected the batch size first")
        outputs[field] = logits
    if task.num_classes is not None:
        shape = tuple(outputs["eval_data"].shape)
        if len(shape) != 2 or shape[1] != task.num_classes:
            raise TaskError(f"Task.model: gives outputs of shape {shape}; expected (N, {task.num_classes}) for "
                            f"{task.num_classes} classes")
    for field, batch in first.items():
        if (field == "eval_data" and not default_eval) or (field != "eval_data" and not default_loss):
            continue
        logits = outputs[field]
        if logits.dim() != 2:
            raise TaskError(f"{field}: the model gives outputs of shape {tuple(logits.shape)}; the default loss and evaluation "
                            "need class scores (N, classes): give the task its own loss and evaluate")
        source = dict(sources)[field]
        whole = getattr(source, "data", None)
        whole_targets = targets_of(whole) if whole is not None else None
        _check_class_targets(targets_of(batch), field, logits.shape[1], whole_targets)
    _check_loss(task, model, first["train_data"])


def _check_loss(task: Any, model: nn.Module, batch: Batch) -> None:
    model.train()
    try:
        loss = task.loss(model, batch)
    except TaskError:
        raise
    except Exception as exc:
        message = " ".join(str(exc).split())[:300]
        raise TaskError(f"Task.loss: failed on a batch of train_data ({describe(batch)}): {type(exc).__name__}: {message}") from None
    finally:
        model.eval()
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TaskError(f"Task.loss: must return a scalar tensor, but returned {describe(loss)}")
    if not bool(torch.isfinite(loss.detach()).all()):
        raise TaskError(f"Task.loss: is {float(loss.detach())} on the first batch of train_data; expected a finite number")
    if not loss.requires_grad:
        raise TaskError("Task.loss: does not depend on the model's parameters (no gradient flows to them)")


def check_scores(scores: Any, expected: Iterable[str] | None = None) -> dict[str, float]:
    """What an evaluation returned, as ``{name: float}``: a mapping of names to finite numbers
    (a 0-d tensor counts), holding every name of ``expected``. Raises :class:`EvaluationError`.

    >>> check_scores({"f1": torch.tensor(0.5)})
    {'f1': 0.5}
    >>> check_scores({"f1": float("nan")})
    Traceback (most recent call last):
    evaluators.checks.EvaluationError: the task's evaluation returned f1 = nan; every value must be a finite number
    """
    if not isinstance(scores, Mapping) or not scores:
        raise EvaluationError(f"the task's evaluation must return a non-empty dict of metric names to numbers, but returned "
                              f"{describe(scores) if not isinstance(scores, Mapping) else 'an empty dict'}")
    checked: dict[str, float] = {}
    for name, value in scores.items():
        if not isinstance(name, str) or not name:
            raise EvaluationError(f"the task's evaluation returned a metric named {name!r}; names must be non-empty strings")
        if name in RESERVED or name.endswith(CHANGE_SUFFIX):
            raise EvaluationError(f"the task's evaluation returned {name!r}, a name secateurs records itself; rename it "
                                  f"(reserved: {', '.join(RESERVED)} and names ending in {CHANGE_SUFFIX})")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, Real):
            raise EvaluationError(f"the task's evaluation returned {name} = {value!r} ({type(value).__name__}); every value "
                                  "must be a number")
        if not math.isfinite(value):
            raise EvaluationError(f"the task's evaluation returned {name} = {value}; every value must be a finite number")
        checked[name] = float(value)
    missing = [name for name in (expected or ()) if name not in checked]
    if missing:
        raise EvaluationError(f"the task's evaluation returned no {', '.join(missing)} (the dense model's did); it returned "
                              f"{', '.join(checked)}")
    return checked


def derived_names(scores: Iterable[str]) -> list[str]:
    """The names a trial derives from its scores: ``<name>_change`` for each score, ``macs`` and
    ``params``, and ``accuracy_drop`` when there is an ``accuracy``."""
    names = [f"{s}{CHANGE_SUFFIX}" for s in (*scores, "macs", "params")]
    return names + (["accuracy_drop"] if "accuracy" in scores else [])


def check_objectives(objectives: Any, returned: Mapping[str, float], field: str = "objectives") -> dict[str, str]:
    """Check declared objectives (``{name: "min" | "max"}``) against the scores the dense model's
    evaluation ``returned``: each name must be returned, measured (``latency_ms``, ``size_mb``,
    ``macs``, ``params``, ...) or derived (``<name>_change``, ``accuracy_drop``). Returns them as a
    plain dict; raises one :class:`TaskError` line naming ``field``, the value and what is valid.

    >>> check_objectives({"map": "max"}, {"accuracy": 0.9})
    Traceback (most recent call last):
    evaluators.checks.TaskError: objectives.map: the task's evaluation does not return 'map'; it returns accuracy; also valid: latency_ms, latency_p10_ms, latency_p90_ms, size_mb, macs, params, param_sparsity, accuracy_change, macs_change, params_change, accuracy_drop
    """
    if not isinstance(objectives, Mapping) or not objectives:
        raise TaskError(f"{field}: must map metric names to min or max, e.g. {{accuracy: max}}, but got {objectives!r}")
    scores = [k for k in returned if k not in MEASURED]
    valid = set(scores) | set(MEASURED) | set(derived_names(scores))
    checked: dict[str, str] = {}
    for name, direction in objectives.items():
        if direction not in DIRECTIONS:
            raise TaskError(f"{field}.{name}: direction must be min or max, but got {direction!r}")
        if name not in valid:
            raise TaskError(f"{field}.{name}: the task's evaluation does not return {name!r}; it returns {', '.join(scores)}; "
                            f"also valid: {', '.join([*MEASURED, *derived_names(scores)])}")
        checked[str(name)] = direction
    return checked
