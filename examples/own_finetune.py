"""A task that fine-tunes pruned models with its own loop: Adam with gradient clipping and, when
distillation is on, an MSE pull towards the dense teacher's logits. A Lightning ``Trainer`` or a
Hugging Face ``Trainer`` plugs in the same way: the hook gets the pruned model and the budget
(:class:`evaluators.tasks.FinetuneRun`) and trains it in place. Used by ``configs/own_finetune.yaml``.

Data and model: the built-in digits task. With ``task.options.journal`` set to a file, each call
appends a JSON line saying what it was given and did.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import torch
from torch import nn

from evaluators.builtin_tasks import make_digits_task
from evaluators.tasks import FinetuneRun, Task, TaskConfig


def finetune(run: FinetuneRun, journal: str | None = None) -> int:
    optimizer = torch.optim.Adam(run.model.parameters(), lr=run.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=run.lr, total_steps=max(run.steps, 1))
    run.model.train()
    steps = 0
    for batch in run.batches():  # secateurs' training batches, shuffled, pass after pass
        if steps >= run.steps:
            break
        loss = run.loss(run.model, batch)
        if run.teacher is not None:
            with torch.no_grad():
                target = run.teacher(batch[0])
            loss = (1 - run.distill_alpha) * loss + run.distill_alpha * nn.functional.mse_loss(run.model(batch[0]), target)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        steps += 1
    if journal:
        with open(journal, "a") as handle:
            handle.write(json.dumps({"budget": run.steps, "steps": steps, "lr": run.lr, "epochs": run.epochs,
                                     "batch_size": run.batch_size, "teacher": run.teacher is not None}) + "\n")
    return steps


def make_task(config: TaskConfig) -> Task:
    digits = make_digits_task(TaskConfig(name="digits", dense_epochs=config.dense_epochs))
    return dataclasses.replace(digits, name="own_finetune", finetune=functools.partial(finetune, journal=config.options.get("journal")))
