"""Plain training and evaluation loops over in-memory tensors (no framework, no DataLoader)."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

OPTIMIZERS = ("sgd", "adamw")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: float,
    lr: float,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    max_steps: int | None = None,
    optimizer: str = "sgd",
    teacher: nn.Module | None = None,
    distill_alpha: float = 0.0,
    distill_temperature: float = 4.0,
    amp: bool = False,
) -> int:
    """Train with a cosine learning-rate schedule; returns the number of steps taken.

    ``optimizer``: ``sgd`` (Nesterov momentum when ``momentum > 0``) or ``adamw``. ``epochs`` may
    be fractional (0.5 = half a pass over the data). With a ``teacher`` and ``distill_alpha > 0``
    the loss is ``(1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T)`` (knowledge
    distillation). ``amp`` runs forward passes in bfloat16 autocast on CUDA (ignored on CPU).
    Raises :class:`NonFiniteLossError` as soon as the loss stops being finite.
    """
    x, y = data
    steps_per_epoch = max(1, math.ceil(len(x) / batch_size))
    total = int(round(epochs * steps_per_epoch))
    if max_steps is not None:
        total = min(total, max_steps)
    if total <= 0:
        return 0
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if teacher is not None:
        teacher.eval()
    use_amp = amp and x.is_cuda
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    step = 0
    while step < total:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            with autocast():
                logits = model(x[batch])
                loss = loss_fn(logits, y[batch])
                if teacher is not None and distill_alpha > 0:
                    with torch.no_grad():
                        target = teacher(x[batch])
                    t = distill_temperature
                    kd = F.kl_div(F.log_softmax(logits.float() / t, dim=1), F.log_softmax(target.float() / t, dim=1),
                                  reduction="batchmean", log_target=True) * t * t
                    loss = (1 - distill_alpha) * loss + distill_alpha * kd
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"fine-tune loss became {loss.item()} at step {step} (lr={lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            step += 1
            if step >= total:
                break
    model.eval()
    return step


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``data``, in [0, 1]."""
    x, y = data
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        correct += (model(x[start : start + batch_size]).argmax(dim=1) == y[start : start + batch_size]).sum().item()
    return correct / len(x)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, *, batches: int, batch_size: int = 64) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``batches`` batches of ``x``
    (a cumulative average, no gradient step): a zero-training repair after pruning. Returns the
    number of batches used."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches <= 0:
        return 0
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    model.train()
    used = 0
    for start in range(0, min(len(x), batches * batch_size), batch_size):
        model(x[start : start + batch_size])
        used += 1
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()
    return used
