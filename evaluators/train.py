"""Plain training and evaluation loops over in-memory tensors (no framework, no DataLoader)."""
from __future__ import annotations

import math

import torch
from torch import nn


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
) -> int:
    """SGD (Nesterov momentum when ``momentum > 0``) with a cosine learning-rate schedule; returns the number of steps taken.

    ``epochs`` may be fractional (0.5 = half a pass over the data). Raises
    :class:`NonFiniteLossError` as soon as the loss stops being finite.
    """
    x, y = data
    steps_per_epoch = max(1, math.ceil(len(x) / batch_size))
    total = int(round(epochs * steps_per_epoch))
    if max_steps is not None:
        total = min(total, max_steps)
    if total <= 0:
        return 0
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    step = 0
    while step < total:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            loss = loss_fn(model(x[batch]), y[batch])
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"fine-tune loss became {loss.item()} at step {step} (lr={lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
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
