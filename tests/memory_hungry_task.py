"""A task whose model runs out of memory for real when its first conv is pruned below 24 filters.

In training mode such a model lowers its process's address-space limit (``RLIMIT_AS``) to 256 MB
above what it uses, then allocates until the allocator fails: the out-of-memory error a trial hits
is torch's own, not one raised by hand. The limit is put back afterwards, so the Ray worker lives on.
Used by ``tests/search/test_oom.py`` through its import path ``tests.memory_hungry_task:make_task``.
"""
from __future__ import annotations

import dataclasses
import resource

import torch

from evaluators.builtin_tasks import make_digits_task
from evaluators.models import DigitsCNN
from evaluators.tasks import TaskConfig

HEADROOM = 256 * 2**20


def _address_space() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


class HungryCNN(DigitsCNN):
    def forward(self, x):
        if self.training and self.features[0].out_channels < 24:
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (_address_space() + HEADROOM, hard))
            try:
                hoard = []
                while True:  # 64 MB at a time, each written, until the allocator fails
                    hoard.append(torch.ones(16 * 2**20))
            finally:
                hoard = None
                resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return super().forward(x)


def make_task(config: TaskConfig):
    task = make_digits_task(TaskConfig(dense_epochs=config.dense_epochs))
    return dataclasses.replace(task, name="memory_hungry", model=HungryCNN)
