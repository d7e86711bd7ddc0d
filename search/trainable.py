"""The function Ray Tune runs for each trial. Top level and importable: Ray pickles it by reference."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import ray
from ray import tune

from evaluators.tasks import TaskConfig, make_task
from evaluators.trial import FinetuneConfig, MeasureConfig, Reference, evaluate, promote, screen
from spaces import SearchSpace


@dataclasses.dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its sampled parameters (shipped once through Ray's object store)."""

    space: SearchSpace
    task: TaskConfig
    checkpoint: str
    finetune: FinetuneConfig
    measure: MeasureConfig
    dense: Reference  # the dense model's scores, MACs and parameters: trials record their change against it
    screening_bn_batches: int | None = None  # search.screening: report a screening result first


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    """Turn sampled parameters into a policy, evaluate it, report the metrics: once, or with
    screening twice (``fidelity`` 0, then 1 unless the scheduler stops the trial in between).
    ``time_trial_s``: the seconds since the trial function started (what the phase timings leave out:
    building the task, the policy, reporting), so that overhead can be told apart from work;
    ``time_started_unix_s``: when it started, so that the gaps between trials can be measured."""
    started = time.perf_counter()
    origin = {"node_id": ray.get_runtime_context().get_node_id(), "time_started_unix_s": time.time()}
    policy = context.space.policy(params)
    task = make_task(context.task)
    if context.screening_bn_batches is None:
        metrics = evaluate(policy, task, context.checkpoint, context.finetune, context.measure, dense=context.dense)
        tune.report({**metrics.to_dict(), **metrics.tags(), **origin, "time_trial_s": time.perf_counter() - started})
        return
    model, screened = screen(policy, task, context.checkpoint, context.measure, bn_batches=context.screening_bn_batches,
                             batch_size=context.finetune.batch_size, dense=context.dense)
    tune.report({**screened.to_dict(), **screened.tags(), "fidelity": 0, **origin,
                 "time_trial_s": time.perf_counter() - started})  # the scheduler may stop it here
    final = promote(model, screened, policy, task, context.checkpoint, context.finetune, context.measure, dense=context.dense)
    tune.report({**final.to_dict(), **final.tags(), "fidelity": 1, **{f"screening_{k}": v for k, v in screened.scores.items()}, **origin,
                 "time_trial_s": time.perf_counter() - started})
