"""Plain training and evaluation loops over a task's batches (no framework).

Data is anything :func:`evaluators.data.as_source` takes: tensors in memory are sliced into
batches (no DataLoader), a Dataset is read through a DataLoader, batch by batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from evaluators.batches import Batch, cross_entropy_loss, forward, logits_of
from evaluators.data import as_source, count_batches, endless_batches

OPTIMIZERS = ("sgd", "adamw")


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



class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def make_optimizer(model: nn.Module, optimizer: str, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """``sgd`` (Nesterov momentum when ``momentum > 0``) or ``adamw`` over the model's parameters."""
    if optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")


def budget(steps_per_epoch: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps for ``epochs`` passes of ``steps_per_epoch`` batches, capped by ``max_steps``.

    >>> budget(10, 0.25, None), budget(10, 3, 7)
    (2, 7)
    """
    total = int(round(epochs * steps_per_epoch))
    return min(total, max_steps) if max_steps is not None else total


def train(
    model: nn.Module,
    data: Any,
    config: FinetuneConfig,
    *,
    seed: int = 0,
    teacher: nn.Module | None = None,
    loss: Callable[[nn.Module, Batch], torch.Tensor] = cross_entropy_loss,
    transform: Callable[[Batch, torch.Generator], Batch] | None = None,
    on_epoch: Callable[[int, int, float, float], None] | None = None,
) -> int:
    """Train as ``config`` says (a :class:`FinetuneConfig`: epochs, lr, batch size, optimizer, ...) with
    a cosine learning-rate schedule on the model's device; returns the steps taken.

    ``data``: tensors ``(x, y)`` or anything :func:`evaluators.data.as_source` takes. ``loss(model,
    batch)`` (default cross-entropy); ``transform(batch, generator)`` augments each batch.
    ``config.optimizer``: ``sgd`` (Nesterov momentum when ``momentum > 0``) or ``adamw``.
    ``config.epochs`` may be fractional (0.5 = half a pass over the data). With a ``teacher`` and
    ``config.distill_alpha > 0`` the loss is ``(1 - alpha) * loss + alpha * T^2 * KL(teacher_T ||
    student_T)`` over the outputs' softmax (knowledge distillation). ``config.amp`` runs forward
    passes in bfloat16 autocast on CUDA (ignored on CPU); ``config.bn_recalibration_batches`` is
    the caller's (:func:`recalibrate_batchnorm` before training). ``on_epoch(epoch, steps,
    mean_loss, seconds)`` is called after each full pass. Raises :class:`NonFiniteLossError` as soon
    as the loss stops being finite.

    >>> x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    >>> train(nn.Linear(4, 2), (x, y), FinetuneConfig(epochs=2, batch_size=32))  # 2 passes of 2 batches
    4
    """
    batch_size, epochs, max_steps, lr = config.batch_size, config.epochs, config.max_steps, config.lr
    distill_alpha, distill_temperature = config.distill_alpha, config.distill_temperature
    source = as_source(data, "train_data")
    device = _device_of(model)
    known = source.batches_per_epoch(batch_size)
    if known is None and max_steps is not None:  # a stream of unknown length: no need to count it
        steps_per_epoch, total = None, (max_steps if epochs > 0 else 0)
    else:
        steps_per_epoch = max(1, known if known is not None else count_batches(source, batch_size))
        total = budget(steps_per_epoch, epochs, max_steps)
    if total <= 0:
        return 0
    opt = make_optimizer(model, config.optimizer, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    distill = teacher is not None and distill_alpha > 0
    if teacher is not None:
        teacher.eval()
    use_amp = config.amp and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
    captured: list[Any] = []
    hook = model.register_forward_hook(lambda module, args, output: captured.append(output)) if distill else None
    generator = torch.Generator().manual_seed(seed)
    batches = endless_batches(source, batch_size, generator=generator, device=device, transform=transform)
    model.train()
    step, epoch_loss, epoch_start = 0, 0.0, time.perf_counter()
    try:
        for batch in batches:
            with autocast():
                value = loss(model, batch)
                if distill:
                    student = logits_of(captured[-1])
                    captured.clear()
                    with torch.no_grad():
                        target = logits_of(forward(teacher, batch))
                    t = distill_temperature
                    kd = F.kl_div(F.log_softmax(student.float() / t, dim=1), F.log_softmax(target.float() / t, dim=1),
                                  reduction="batchmean", log_target=True) * t * t
                    value = (1 - distill_alpha) * value + distill_alpha * kd
            if not torch.isfinite(value):
                raise NonFiniteLossError(f"fine-tune loss became {value.item()} at step {step} (lr={lr})")
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            schedule.step()
            step += 1
            if on_epoch is not None and steps_per_epoch is not None:
                epoch_loss += float(value.detach())
                if step % steps_per_epoch == 0:
                    on_epoch(step // steps_per_epoch, step, epoch_loss / steps_per_epoch, time.perf_counter() - epoch_start)
                    epoch_loss, epoch_start = 0.0, time.perf_counter()
            if step >= total:
                break
    finally:
        if hook is not None:
            hook.remove()
    model.eval()
    return step


@torch.no_grad()
def accuracy(model: nn.Module, data: Any, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (tensors ``(x, y)`` or any batched data), in [0, 1]."""
    from evaluators.tasks import top1_accuracy

    model.eval()
    return top1_accuracy(model, as_source(data, "eval_data").batches(batch_size, device=_device_of(model)))["accuracy"]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Any, *, batches: int, batch_size: int = 64) -> int:
    """Re-estimate every BatchNorm's running mean and variance on the first ``batches`` batches of
    ``data`` (a cumulative average, no gradient step): a zero-training repair after pruning.
    ``data``: input tensors, ``(x, y)`` or any batched data. Returns the number of batches used.
    (``torch.optim.swa_utils.update_bn`` does the same over a whole loader of positional inputs;
    this one stops after ``batches`` and takes any batch of the contract in ``evaluators.batches``.)"""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches <= 0:
        return 0
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    model.train()
    used = 0
    for batch in as_source(data, "calibration_data").batches(batch_size, device=_device_of(model)):
        if used >= batches:
            break
        forward(model, batch)
        used += 1
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()
    return used

