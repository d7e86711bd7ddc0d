"""Measurements on the real artifact: latency on this device, bytes of the saved weights, MACs."""
from __future__ import annotations

import contextlib
import fcntl
import io
import os
import tempfile
import time
from typing import Any, Callable, Hashable, Mapping, TypeVar

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from evaluators.batches import call, first_tensor

K = TypeVar("K", bound=Hashable)


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block with ``torch.set_num_threads(threads)``, restoring the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def exclusive_measurement(lock_path: str | None = None):
    """Hold a machine-wide lock while timing, so that trials running side by side on one node
    take turns instead of spoiling each other's latencies (``$SECATEURS_MEASURE_LOCK`` overrides the path)."""
    path = lock_path or os.environ.get("SECATEURS_MEASURE_LOCK") or os.path.join(tempfile.gettempdir(), "secateurs-measure.lock")
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tokens_in(inputs: Any) -> int | None:
    """How many tokens a forward pass on ``inputs`` processes: the elements of its token ids
    (``input_ids`` of a dict, else its first integer tensor of two or more dimensions, batch x
    sequence), padding included; None when the inputs hold no token ids (images, features).

    >>> tokens_in({"input_ids": torch.zeros(8, 64, dtype=torch.long), "attention_mask": torch.ones(8, 64)}), tokens_in(torch.zeros(2, 3))
    (512, None)
    """
    if isinstance(inputs, dict) and isinstance(inputs.get("input_ids"), torch.Tensor):
        return int(inputs["input_ids"].numel())
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and not value.is_floating_point() and not value.is_complex() \
                and value.dtype != torch.bool:
            return int(value.numel())
    return None


def throughput(inputs: Any, stats: Mapping[str, float]) -> dict[str, float]:
    """``{"tokens_per_s": tokens of the timed batch / median latency}`` for inputs of token ids, else ``{}``.

    >>> throughput({"input_ids": torch.zeros(4, 50, dtype=torch.long)}, {"latency_ms": 10.0})
    {'tokens_per_s': 20000.0}
    """
    tokens = tokens_in(inputs)
    if not tokens or not stats.get("latency_ms"):
        return {}
    return {"tokens_per_s": tokens / (stats["latency_ms"] / 1000.0)}


def latency_ms(model: nn.Module, inputs: Any, *, warmup: int = 10, repeats: int = 30, threads: int = 1) -> dict[str, float]:
    """Wall-clock time of one forward pass on ``inputs`` (a tensor, a tuple of positional inputs or
    a dict of keyword inputs): median, 10th and 90th percentile in ms.

    >>> stats = latency_ms(nn.Linear(4, 2), torch.zeros(8, 4), warmup=1, repeats=5)
    >>> stats["latency_p10_ms"] <= stats["latency_ms"] <= stats["latency_p90_ms"]
    True
    """
    model.eval()
    return interleaved_latency_ms({0: lambda: call(model, inputs)}, rounds=1, warmup=warmup, repeats=repeats,
                                  threads=threads, cuda=first_tensor(inputs).is_cuda)[0]


def interleaved_latency_ms(calls: Mapping[K, Callable[[], object]], *, rounds: int, warmup: int, repeats: int,
                           threads: int = 1, cuda: bool = False) -> dict[K, dict[str, float]]:
    """Time several forward passes (``calls``) round-robin: in each of ``rounds`` rounds every call
    gets ``warmup`` untimed and ``repeats`` timed runs, in turn. A drift in the machine's speed
    (another process, clock frequency) then hits all of them alike, so their ratios hold even when
    the absolute times move. Per call: median, 10th and 90th percentile of all its timed runs, in ms.
    Holds the machine-wide measurement lock throughout; on CUDA each run ends with a device sync.

    >>> stats = interleaved_latency_ms({"a": lambda: None, "b": lambda: None}, rounds=2, warmup=0, repeats=3)
    >>> sorted(stats), sorted(stats["a"])
    (['a', 'b'], ['latency_ms', 'latency_p10_ms', 'latency_p90_ms'])
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, but got {repeats}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, but got {rounds}")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: dict[K, list[float]] = {key: [] for key in calls}
    with exclusive_measurement(), torch_threads(threads), torch.inference_mode():
        for _ in range(rounds):
            for key, call in calls.items():
                for _ in range(warmup):
                    call()
                sync()
                for _ in range(repeats):
                    start = time.perf_counter()
                    call()
                    sync()
                    times[key].append((time.perf_counter() - start) * 1000.0)
    return {key: _statistics(values) for key, values in times.items()}


def _statistics(times: list[float]) -> dict[str, float]:
    p10, median, p90 = np.percentile(times, [10, 50, 90])  # linear interpolation between the closest runs
    return {"latency_ms": float(median), "latency_p10_ms": float(p10), "latency_p90_ms": float(p90)}


def state_dict_bytes(model: nn.Module) -> bytes:
    """The bytes ``torch.save(model.state_dict())`` writes: the deployable weights file."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def size_mb(model: nn.Module) -> float:
    """Size of the saved state dict in MB (10^6 bytes)."""
    return len(state_dict_bytes(model)) / 1e6


def macs_and_params(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass on ``example_inputs`` and the parameter count."""
    was_training = model.training
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    model.train(was_training)
    return int(macs), int(params)
