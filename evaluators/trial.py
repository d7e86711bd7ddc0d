"""One trial: rebuild the dense model, apply a policy, fine-tune briefly, measure.

Pure function of its inputs; returns a :class:`Metrics` record. Runs unchanged in a Ray
worker or in-process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Hashable, Mapping, TypeVar

import torch

from evaluators import measure, pruning
from evaluators.batches import Calibration
from evaluators.checkpoint import load_dense
from evaluators.tasks import Task
from evaluators.train import OPTIMIZERS, accuracy, recalibrate_batchnorm, train
from spaces import Policy

K = TypeVar("K", bound=Hashable)

DEVICES = ("cpu", "cuda", "auto")
BACKENDS = ("torch", "onnxruntime")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """The ``finetune:`` section: the brief training each pruned model gets before it is measured.

    >>> FinetuneConfig(epochs=0.5).epochs
    0.5
    """

    __pydantic_config__ = {"extra": "forbid"}

    epochs: float = 1.0        # passes over the training data (fractions allowed; 0 = no fine-tune)
    lr: float = 0.01           # peak learning rate of SGD with a cosine schedule
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_steps: int | None = None  # cap on optimizer steps, whatever the epochs
    optimizer: str = "sgd"     # sgd (Nesterov when momentum > 0) or adamw
    distill_alpha: float = 0.0  # weight of knowledge distillation from the dense model (0 = off)
    distill_temperature: float = 4.0
    bn_recalibration_batches: int = 0  # re-estimate BatchNorm statistics on this many batches before fine-tuning
    amp: bool = True           # bfloat16 autocast when fine-tuning on CUDA (no effect on CPU)

    def __post_init__(self) -> None:
        if not 0 <= self.epochs < math.inf:
            raise ValueError(f"epochs: must be a finite number >= 0, but got {self.epochs}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr: must be a finite number > 0, but got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: must satisfy 0 <= momentum < 1, but got {self.momentum}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay: must be a finite number >= 0, but got {self.weight_decay}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, but got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: must be one of {', '.join(OPTIMIZERS)}, but got {self.optimizer!r}")
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"distill_alpha: must satisfy 0 <= alpha <= 1, but got {self.distill_alpha}")
        if not 0 < self.distill_temperature < math.inf:
            raise ValueError(f"distill_temperature: must be a finite number > 0, but got {self.distill_temperature}")
        if self.bn_recalibration_batches < 0:
            raise ValueError(f"bn_recalibration_batches: must be >= 0, but got {self.bn_recalibration_batches}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps: must be >= 0 or null, but got {self.max_steps}")


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
    """The ``measure:`` section: how latency is timed.

    >>> MeasureConfig(batch_size=1).threads
    1
    """

    __pydantic_config__ = {"extra": "forbid"}

    batch_size: int = 32   # inputs per timed forward pass
    threads: int = 1       # torch intra-op threads while timing
    warmup: int = 10       # untimed passes first
    repeats: int = 30      # timed passes; latency_ms is their median
    device: str = "cpu"    # cpu, cuda, or auto (cuda when present)
    backend: str = "torch"  # torch (eager), or onnxruntime: export to ONNX, check outputs, time ONNX Runtime (CPU)
    channels_last: bool = False  # torch backend, image inputs: time with channels-last weights and inputs (as deployed so)

    def __post_init__(self) -> None:
        for name in ("batch_size", "threads", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, but got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup: must be >= 0, but got {self.warmup}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {', '.join(BACKENDS)}, but got {self.backend!r}")
        if self.backend == "onnxruntime" and self.device == "cuda":
            raise ValueError("backend: onnxruntime times on the CPU; use device: cpu with it")
        if self.device not in DEVICES:
            raise ValueError(f"device: must be one of {', '.join(DEVICES)}, but got {self.device!r}")
        if self.channels_last and self.backend != "torch":
            raise ValueError(f"channels_last: applies to the torch backend; {self.backend} chooses its own memory layout")

    def check_inputs(self, example: torch.Tensor) -> None:
        """Refuse settings the task's inputs cannot take (``example``: one test input batch)."""
        if self.channels_last and example.dim() != 4:
            raise ValueError(f"measure.channels_last: needs image inputs (N, C, H, W), but the task's inputs have shape "
                             f"{tuple(example.shape)}; set it to false")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("measure.device: 'cuda' was asked for but torch sees no CUDA device")
        return torch.device(self.device)


@dataclasses.dataclass(frozen=True)
class Metrics:
    """What one trial measured. Sizes are in MB (10^6 bytes) of the saved state dict."""

    accuracy: float
    accuracy_drop: float
    latency_ms: float
    latency_p10_ms: float
    latency_p90_ms: float
    size_mb: float
    macs: int
    params: int
    param_sparsity: float
    finetune_steps: int
    time_prune_s: float
    time_finetune_s: float
    time_measure_s: float
    bn_recalibration_batches: int = 0
    onnx_max_abs_diff: float | None = None  # with measure.backend onnxruntime: ONNX vs torch outputs

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def prune_model(policy: Policy, task: Task, checkpoint: str | Path | bytes) -> tuple[torch.nn.Module, float]:
    """Rebuild the dense model from ``checkpoint`` and apply ``policy``; returns it and the seconds taken."""
    start = time.perf_counter()
    model = load_dense(task, checkpoint)
    if policy.ratios:
        pruning.apply(policy, model, task.test_data()[0][:1], calibration=Calibration.from_tensors(*task.train_data(), seed=0))
    return model, time.perf_counter() - start


def finetune_model(model: torch.nn.Module, policy: Policy, task: Task, checkpoint: str | Path | bytes,
                   finetune: FinetuneConfig, device: torch.device | str = "cpu") -> dict[str, float]:
    """Fine-tune a pruned ``model`` in place (moved to ``device``, left in eval mode); returns the
    steps, BatchNorm re-calibration batches and seconds taken."""
    if policy.finetune:  # knobs the search sampled override the config's
        finetune = dataclasses.replace(finetune, **policy.finetune)
    start = time.perf_counter()
    model.to(device)
    x_train, y_train = task.train_data()
    x_train, y_train = x_train.to(device), y_train.to(device)
    torch.manual_seed(policy.seed)
    recalibrated = recalibrate_batchnorm(model, x_train, batches=finetune.bn_recalibration_batches, batch_size=finetune.batch_size)
    teacher = load_dense(task, checkpoint).to(device) if finetune.distill_alpha > 0 else None
    steps = train(
        model,
        (x_train, y_train),
        epochs=finetune.epochs,
        lr=finetune.lr,
        batch_size=finetune.batch_size,
        momentum=finetune.momentum,
        weight_decay=finetune.weight_decay,
        seed=policy.seed,
        max_steps=finetune.max_steps,
        optimizer=finetune.optimizer,
        teacher=teacher,
        distill_alpha=finetune.distill_alpha,
        distill_temperature=finetune.distill_temperature,
        amp=finetune.amp,
    )
    model.eval()
    return {"finetune_steps": steps, "bn_recalibration_batches": recalibrated, "time_finetune_s": time.perf_counter() - start}


def prune_and_finetune(
    policy: Policy,
    task: Task,
    checkpoint: str | Path | bytes,
    finetune: FinetuneConfig,
    device: torch.device | str = "cpu",
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Rebuild the dense model from ``checkpoint``, apply ``policy`` and fine-tune it.

    Returns the model (on ``device``, in eval mode) and the phase timings. Replaying the same
    policy on the same checkpoint gives the same model: this is how a frontier policy is exported.
    """
    model, time_prune = prune_model(policy, task, checkpoint)
    return model, {"time_prune_s": time_prune, **finetune_model(model, policy, task, checkpoint, finetune, device)}


def _time(model: torch.nn.Module, batch: torch.Tensor, config: MeasureConfig) -> dict[str, float]:
    if config.backend == "onnxruntime":
        from evaluators.onnx_backend import onnxruntime_latency_ms

        return onnxruntime_latency_ms(model, batch, warmup=config.warmup, repeats=config.repeats, threads=config.threads)
    with _layout(model, batch, config) as batch:
        return measure.latency_ms(model, batch, warmup=config.warmup, repeats=config.repeats, threads=config.threads)


@contextlib.contextmanager
def _layout(model: torch.nn.Module, batch: torch.Tensor, config: MeasureConfig):
    """With ``measure.channels_last``: the model's weights and the batch in channels-last memory
    format while timing (yields the batch to time); the model's weights go back to contiguous after."""
    if not config.channels_last:
        yield batch
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield batch.contiguous(memory_format=torch.channels_last)
    finally:
        model.to(memory_format=torch.contiguous_format)


def _timing_batch(task: Task, measure_config: MeasureConfig) -> torch.Tensor:
    """The first ``batch_size`` test inputs (repeated if the test set is smaller): what latency is timed on."""
    batch = task.test_data()[0][: measure_config.batch_size]
    if len(batch) < measure_config.batch_size:
        repeat = -(-measure_config.batch_size // len(batch))
        batch = batch.repeat(repeat, *([1] * (batch.dim() - 1)))[: measure_config.batch_size]
    return batch


def measure_model(model: torch.nn.Module, task: Task, measure_config: MeasureConfig) -> dict[str, float]:
    """Accuracy, latency, size, MACs and parameters of ``model`` as it is (moved to the measure device)."""
    device = measure_config.resolve_device()
    start = time.perf_counter()
    model.to(device).eval()
    x_test, y_test = task.test_data()
    acc = accuracy(model, (x_test.to(device), y_test.to(device)))
    timing = _time(model, _timing_batch(task, measure_config).to(device), measure_config)
    model.cpu()
    macs, params = pruning.effective_macs_and_params(model, x_test[:1])  # zeros of unstructured/N:M masks do not count
    return {
        "accuracy": acc,
        # the file export writes: the dense state dict, or the compressed sparse one when that is smaller
        "size_mb": min(measure.size_mb(model), len(pruning.sparse_state_dict_bytes(model)) / 1e6),
        "macs": macs,
        "params": params,
        "time_measure_s": time.perf_counter() - start,
        **timing,
    }


def evaluate(
    policy: Policy,
    task: Task,
    checkpoint: str | Path | bytes,
    finetune: FinetuneConfig,
    measure_config: MeasureConfig,
    *,
    dense_accuracy: float | None = None,
    dense_params: int | None = None,
) -> Metrics:
    """Prune the dense checkpoint with ``policy``, fine-tune, and measure the result."""
    if dense_params is None:
        dense_params = sum(p.numel() for p in load_dense(task, checkpoint).parameters())
    model, timings = prune_and_finetune(policy, task, checkpoint, finetune, measure_config.resolve_device())
    measured = measure_model(model, task, measure_config)
    return Metrics(
        accuracy_drop=(dense_accuracy - measured["accuracy"]) if dense_accuracy is not None else 0.0,
        param_sparsity=1.0 - measured["params"] / dense_params,
        **measured,
        **timings,
    )


def screen(
    policy: Policy,
    task: Task,
    checkpoint: str | Path | bytes,
    measure_config: MeasureConfig,
    *,
    bn_batches: int,
    batch_size: int = 64,
    dense_accuracy: float | None = None,
    dense_params: int,
) -> tuple[torch.nn.Module, Metrics]:
    """The cheap first fidelity of a trial: prune, re-estimate BatchNorm statistics on ``bn_batches``
    training batches (no gradient step), and measure everything. Latency, size and MACs are final
    (fine-tuning changes no shape and no mask); the accuracy is a lower-fidelity proxy.
    Returns the model (on the measure device) for :func:`promote`."""
    device = measure_config.resolve_device()
    model, time_prune = prune_model(policy, task, checkpoint)
    start = time.perf_counter()
    model.to(device)
    torch.manual_seed(policy.seed)
    recalibrated = recalibrate_batchnorm(model, task.train_data()[0].to(device), batches=bn_batches, batch_size=batch_size)
    time_recalibrate = time.perf_counter() - start
    measured = measure_model(model, task, measure_config)
    model.to(device)
    return model, Metrics(
        accuracy_drop=(dense_accuracy - measured["accuracy"]) if dense_accuracy is not None else 0.0,
        param_sparsity=1.0 - measured["params"] / dense_params,
        finetune_steps=0,
        time_prune_s=time_prune,
        time_finetune_s=time_recalibrate,
        bn_recalibration_batches=recalibrated,
        **measured,
    )


def promote(model: torch.nn.Module, screened: Metrics, policy: Policy, task: Task, checkpoint: str | Path | bytes,
            finetune: FinetuneConfig, measure_config: MeasureConfig, *, dense_accuracy: float | None = None) -> Metrics:
    """The full fidelity of a screened trial: fine-tune the screened model, then measure its accuracy
    again (its latency, size and MACs are those :func:`screen` measured)."""
    device = measure_config.resolve_device()
    timings = finetune_model(model, policy, task, checkpoint, finetune, device)
    start = time.perf_counter()
    x_test, y_test = task.test_data()
    acc = accuracy(model, (x_test.to(device), y_test.to(device)))
    return dataclasses.replace(
        screened,
        accuracy=acc,
        accuracy_drop=(dense_accuracy - acc) if dense_accuracy is not None else 0.0,
        finetune_steps=timings["finetune_steps"],
        time_finetune_s=screened.time_finetune_s + timings["time_finetune_s"],
        time_measure_s=screened.time_measure_s + time.perf_counter() - start,
    )


def measure_latencies(policies: Mapping[K, Policy], task: Task, checkpoint: str | Path | bytes,
                      measure_config: MeasureConfig, *, rounds: int = 5) -> dict[K, dict[str, float]]:
    """Latency of the model each policy makes, without fine-tuning it (on dense kernels the time
    depends on the shapes alone), timed together: round-robin over ``rounds`` rounds, so that all
    see the same machine (see :func:`evaluators.measure.interleaved_latency_ms`). ``measure.warmup``
    and ``measure.repeats`` are spread over the rounds (rounded up), so a model costs about what one
    in-search timing does. Used to re-time the frontier, with the dense model (an empty policy), at
    the end of a search."""
    device = measure_config.resolve_device()
    batch = _timing_batch(task, measure_config).to(device)
    example = task.test_data()[0][:1]
    with contextlib.ExitStack() as stack:
        calls, extra = {}, {}
        for key, policy in policies.items():
            model = load_dense(task, checkpoint)
            if policy.ratios:
                pruning.apply(policy, model, example, calibration=Calibration.from_tensors(*task.train_data(), seed=0))
            model = model.to(device).eval()
            if measure_config.backend == "onnxruntime":
                from evaluators.onnx_backend import onnxruntime_call

                calls[key], diff = stack.enter_context(onnxruntime_call(model, batch, threads=measure_config.threads))
                extra[key] = {"onnx_max_abs_diff": diff}
            else:
                calls[key], extra[key] = functools.partial(model, stack.enter_context(_layout(model, batch, measure_config))), {}
        stats = measure.interleaved_latency_ms(calls, rounds=rounds, warmup=-(-measure_config.warmup // rounds),
                                               repeats=-(-measure_config.repeats // rounds), threads=measure_config.threads, cuda=batch.is_cuda)
    return {key: {**stats[key], **extra[key]} for key in policies}
