"""What a batch is, and how a model is called on one: the contract between a task's data and
everything that runs a model (training, evaluation, calibration, tracing, timing, export).

A batch may be

- a tensor: the model's only input, no targets (``model(x)``);
- a tuple or list ``(inputs..., targets)``: every element but the last goes to the model as
  positional arguments, the last is the targets (``(x, y)`` -> ``model(x)``; ``(ids, mask, y)`` ->
  ``model(ids, mask)``);
- a dict: every key but ``labels`` goes to the model as a keyword argument, ``labels`` (if present)
  is the targets (``{"input_ids", "attention_mask", "labels"}`` -> ``model(input_ids=...,
  attention_mask=...)``).

Model inputs (what :func:`inputs_of` returns and :func:`call` takes) are a tensor, a tuple of
positional inputs, or a dict of keyword inputs.

>>> x, y = torch.zeros(4, 3), torch.zeros(4).long()
>>> inputs_of((x, y)) is x, targets_of((x, y)) is y
(True, True)
>>> sorted(inputs_of({"input_ids": x, "labels": y})), batch_size_of({"input_ids": x, "labels": y})
(['input_ids'], 4)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LABELS = "labels"
CALIBRATION_SAMPLES = 256  # examples that data-dependent criteria see by default

Batch = Any   # tensor | tuple | list | dict, see the module docstring
Inputs = Any  # tensor | tuple of positional inputs | dict of keyword inputs


def inputs_of(batch: Batch) -> Inputs:
    """The model inputs of ``batch`` (a tensor, a tuple of positional inputs or a dict of keyword inputs)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != LABELS}
    if isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            return batch[0] if batch else ()
        return batch[0] if len(batch) == 2 else tuple(batch[:-1])
    raise TypeError(f"a batch must be a tensor, a tuple/list (inputs..., targets) or a dict, but got {type(batch).__name__}")


def targets_of(batch: Batch) -> Any:
    """The targets of ``batch`` (None when it has none: a bare tensor, a dict without ``labels``)."""
    if isinstance(batch, torch.Tensor):
        return None
    if isinstance(batch, dict):
        return batch.get(LABELS)
    if isinstance(batch, (tuple, list)):
        return batch[-1] if len(batch) >= 2 else None
    raise TypeError(f"a batch must be a tensor, a tuple/list (inputs..., targets) or a dict, but got {type(batch).__name__}")


def call(model: nn.Module, inputs: Inputs) -> Any:
    """Run ``model`` on model inputs: ``model(x)``, ``model(*inputs)`` or ``model(**inputs)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def forward(model: nn.Module, batch: Batch) -> Any:
    """Run ``model`` on the inputs of ``batch``."""
    return call(model, inputs_of(batch))


def logits_of(output: Any) -> torch.Tensor:
    """The tensor a model's output holds: itself, ``.logits`` (Hugging Face outputs), or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the output tensor in a model output of type {type(output).__name__}")


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (tensors, tuples, lists and dicts, nested)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def to_device(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor in it moved to ``device``."""
    return map_tensors(value, lambda t: t.to(device))


def first_tensor(value: Any) -> torch.Tensor:
    """The first tensor in ``value`` (depth first)."""
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        try:
            return first_tensor(item)
        except TypeError:
            continue
    raise TypeError(f"no tensor in a value of type {type(value).__name__}")


def batch_size_of(batch: Batch) -> int:
    """The number of examples in ``batch`` (the leading size of its first tensor)."""
    return int(first_tensor(batch).shape[0])


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Examples ``start:stop`` of ``batch`` (every tensor sliced along its first dimension)."""
    return map_tensors(batch, lambda t: t[start:stop])


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """One batch holding every example of ``batches`` (same structure; tensors concatenated)."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches))
    if isinstance(first, dict):
        return {k: concat_batches([b[k] for b in batches]) if isinstance(first[k], (torch.Tensor, dict, tuple, list)) else first[k]
                for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches([b[i] for b in batches]) for i in range(len(first)))
    return first


def cross_entropy_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The default loss: cross-entropy of the model's logits against the batch's integer targets."""
    targets = targets_of(batch)
    if targets is None:
        raise ValueError("the default loss (cross-entropy) needs targets: batches as (inputs, targets) or dicts with "
                         "'labels'; or give the task a loss(model, batch)")
    return F.cross_entropy(logits_of(forward(model, batch)), targets)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A few batches that data-dependent criteria (``taylor``, ``wanda``) and BatchNorm
    re-estimation run through the model, with the task's loss (``taylor`` needs its gradients).

    >>> cal = Calibration.from_tensors(torch.zeros(10, 3), torch.zeros(10).long(), batch_size=4)
    >>> [batch_size_of(b) for b in cal.batches]
    [4, 4, 2]
    """

    batches: tuple[Batch, ...]
    loss: Callable[[nn.Module, Batch], torch.Tensor] = cross_entropy_loss

    @classmethod
    def from_batches(cls, batches: Iterable[Batch], loss: Callable[[nn.Module, Batch], torch.Tensor] = cross_entropy_loss, *,
                     samples: int = CALIBRATION_SAMPLES) -> Calibration:
        """The first ``samples`` examples of ``batches`` (an iterable is read no further than that)."""
        taken, seen = [], 0
        for batch in batches:
            if seen >= samples:
                break
            size = batch_size_of(batch)
            taken.append(batch if seen + size <= samples else slice_batch(batch, 0, samples - seen))
            seen += size
        return cls(tuple(taken), loss)

    @classmethod
    def from_tensors(cls, x: torch.Tensor, y: torch.Tensor | None = None, *, batch_size: int = 64,
                     samples: int = CALIBRATION_SAMPLES, loss: Callable[[nn.Module, Batch], torch.Tensor] = cross_entropy_loss,
                     seed: int | None = None) -> Calibration:
        """Batches of ``(x, y)`` (or of ``x`` alone): the first ``samples`` examples, or with ``seed``
        a fixed draw of ``samples`` examples (kept in their order) when there are more.

        >>> x = torch.arange(10.0)[:, None]
        >>> Calibration.from_tensors(x, samples=3, seed=0).batches[0].flatten().tolist()
        [1.0, 4.0, 7.0]
        """
        if seed is not None and len(x) > samples:
            pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:samples].sort().values
            x, y = x[pick], None if y is None else y[pick]
        n = min(len(x), samples)
        return cls(tuple((x[i:i + batch_size], y[i:i + batch_size]) if y is not None else x[i:i + batch_size]
                         for i in range(0, n, batch_size)), loss)


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of a nested batch (dicts, tuples, lists) with its path, for error messages.

    >>> list(leaves({"input_ids": 1, "pair": (2, 3)}))
    [("['input_ids']", 1), ("['pair'][0]", 2), ("['pair'][1]", 3)]
    """
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, f"{path}[{k!r}]")
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, value
