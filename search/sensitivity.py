"""The search's sensitivity step (``search.sensitivity``): every searched group pruned alone at a few
ratios and scored by :mod:`evaluators.sensitivity`'s cheap proxy, one Ray task per group (with a
trial's resources), before the first trial. The table and plot go to the parent run
(``sensitivity.csv``, ``sensitivity.png``); the search then

- starts from seed policies: for each of ``seed_drops``, every group at the ratio where its proxy
  drop reaches that value (MLflow tag ``secateurs.seed``, counted in ``num_trials``);
- with ``narrow``, caps each group's range at the ratio where its proxy drop reaches ``narrow``.
"""
from __future__ import annotations

import dataclasses
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import ray

from evaluators import sensitivity
from evaluators.tasks import TaskConfig, make_task
from search.baselines import Baseline, snap, space_point
from search.config import Config
from search.tracking import SearchTracker
from spaces import Policy, Rule, SearchSpace


def _analyse_group(task: TaskConfig, checkpoint: bytes, template: Policy, ratios: dict[str, list[float]],
                   options: dict[str, Any], device: str) -> list[dict[str, Any]]:
    from evaluators.trial import MeasureConfig

    return sensitivity.analyse(make_task(task), checkpoint, template, ratios, device=MeasureConfig(device=device).resolve_device(), **options)


def _ratios(space: SearchSpace, tried: list[float]) -> dict[str, list[float]]:
    """The ratios tried per searched group of the first granularity: ``tried`` clipped to its range."""
    out = {}
    for d in space.dimensions(space.config.granularity[0]):
        if d.range is None:
            continue
        values = sorted({snap(r, d.range.low, d.range.high, d.range.step) for r in tried} - {0.0})
        for m in d.members:
            out[m] = values
    return {m: v for m, v in out.items() if v}


def analyse(config: Config, space: SearchSpace, checkpoint: bytes, tracker: SearchTracker,
            out: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run the analysis on Ray (one task per group), log its table and plot; returns the rows."""
    settings = config.search.sensitivity
    started = time.perf_counter()
    template = Policy(criterion=space.config.criteria[0], ratios={}, granularity=space.config.granularity[0],
                      round_to=space.config.round_to, min_channels=space.config.min_channels,
                      group_min_channels=space.group_min_channels, seed=space.seed,
                      nm_block=space.config.nm_block)
    ratios = _ratios(space, settings.ratios)
    options = {"bn_batches": settings.bn_batches, "batch_size": config.finetune.batch_size, "samples": settings.samples}
    out(f"sensitivity: pruning each of {len(ratios)} groups alone at {sum(map(len, ratios.values()))} ratios in all")
    remote = ray.remote(num_cpus=config.search.cpus_per_trial, num_gpus=config.search.gpus_per_trial)(_analyse_group)
    checkpoint_ref = ray.put(checkpoint)
    futures = [remote.remote(config.task, checkpoint_ref, template, {g: r}, options, config.measure.device) for g, r in ratios.items()]
    rows = [row for part in ray.get(futures) for row in part]
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "sensitivity.csv"
        sensitivity.to_frame(rows).to_csv(csv_path, index=False)
        tracker.log_artifact(csv_path)
        if rows:
            tracker.log_artifact(sensitivity.plot(rows, Path(tmp) / "sensitivity.png", title="accuracy drop of each group pruned alone (no fine-tuning)"))
    tracker.log_search_metrics({"sensitivity_wall_s": time.perf_counter() - started})
    worst = sorted(rows, key=lambda r: -r["accuracy_drop"])[:3]
    out("sensitivity: most fragile " + ", ".join(f"{r['group']}@{r['ratio']:g} (-{r['accuracy_drop']:.3f})" for r in worst))
    return rows


def seed_points(space: SearchSpace, rows: list[dict[str, Any]], drops: list[float]) -> list[Baseline]:
    """For each proxy drop: every searched group at the ratio where its own drop reaches it (a group
    the analysis did not cover stays at its range's low)."""
    granularity = space.config.granularity[0]
    sizes = {g.name: g.size for g in space.groups}
    low = {m: d.range.low for d in space.dimensions(granularity) if d.range is not None for m in d.members}
    seeds: list[Baseline] = []
    for drop in drops:
        point = space_point(space, granularity, {**low, **sensitivity.safe_ratios(rows, drop)}, space.config.criteria[0], sizes)
        if all(point != s.point for s in seeds):
            seeds.append(Baseline(f"sensitivity drop<={drop:g}", point, kind="seed"))
    return seeds


def narrowed(space: SearchSpace, rows: list[dict[str, Any]], max_drop: float) -> tuple[SearchSpace, dict[str, float]]:
    """``space`` with each single group's upper ratio lowered to where its proxy drop reaches ``max_drop``
    (rounded down to the step, never below the range's low). Returns the new space and the new highs."""
    safe = sensitivity.safe_ratios(rows, max_drop)
    rules, highs = list(space.config.rules), {}
    for d in space.dimensions(space.config.granularity[0]):
        if d.range is None or d.joint or d.members != (d.group,) or d.group not in safe:
            continue
        low, step = d.range.low, d.range.step
        high = max(low, low + math.floor((safe[d.group] - low) / step + 1e-9) * step if step else safe[d.group])
        high = round(min(high, d.range.high), 10)
        if high < d.range.high:
            rules.append(Rule(regex=re.escape(d.group), high=high, granularity=space.config.granularity[0]))
            highs[d.group] = high
    config = dataclasses.replace(space.config, rules=rules)
    return SearchSpace(config, space.groups, seed=space.seed), highs

