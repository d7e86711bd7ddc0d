"""The function Ray Tune runs for each trial. Top level and importable: Ray pickles it by reference."""
from __future__ import annotations

import dataclasses
from typing import Any

import ray
from ray import tune

from evaluators.tasks import TaskConfig, make_task
from evaluators.trial import FinetuneConfig, MeasureConfig, evaluate
from spaces import SearchSpace


@dataclasses.dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its sampled parameters (shipped once through Ray's object store)."""

    space: SearchSpace
    task: TaskConfig
    checkpoint: str
    finetune: FinetuneConfig
    measure: MeasureConfig
    dense_accuracy: float
    dense_params: int


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    """Turn sampled parameters into a policy, evaluate it, report the metrics (one report per trial)."""
    policy = context.space.policy(params)
    metrics = evaluate(
        policy,
        make_task(context.task),
        context.checkpoint,
        context.finetune,
        context.measure,
        dense_accuracy=context.dense_accuracy,
        dense_params=context.dense_params,
    )
    tune.report({**metrics.to_dict(), "node_id": ray.get_runtime_context().get_node_id()})
