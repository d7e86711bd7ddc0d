"""A task whose model refuses to train when its first conv is pruned below 24 filters.

Used by the end-to-end tests to make some trials raise inside a Ray worker (imported there by
its import path ``tests.fragile_task:make_task``).
"""
from __future__ import annotations

import dataclasses

from evaluators.models import DigitsCNN
from evaluators.builtin_tasks import make_digits_task
from evaluators.tasks import TaskConfig


class FragileCNN(DigitsCNN):
    def forward(self, x):
        if self.training and self.features[0].out_channels < 24:
            raise RuntimeError(f"fragile model: only {self.features[0].out_channels} filters left in features.0")
        return super().forward(x)


def make_task(config: TaskConfig):
    task = make_digits_task(TaskConfig(dense_epochs=config.dense_epochs))
    return dataclasses.replace(task, name="fragile", model=FragileCNN)
