"""Runs one search: validate and prepare, then Ray Tune + OptunaSearch, MLflow records, frontier."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1e9")

import optuna
import pandas as pd
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from evaluators.checkpoint import ensure_dense_checkpoint, load_dense
from evaluators.pruning import discover_groups
from evaluators.tasks import make_task
from evaluators.trial import FinetuneConfig, evaluate
from search import frontier
from search.config import Config
from search.samplers import make_sampler
from search.tracking import TRIAL_METRICS, SearchTracker, ui_command
from search.trainable import TrialContext, run_trial
from spaces import Policy, SearchSpace

OBJECTIVE_METRICS = list(frontier.OBJECTIVES)
OBJECTIVE_MODES = list(frontier.OBJECTIVES.values())


@dataclasses.dataclass
class SearchResult:
    """What a finished search left in MLflow, plus its tables for the caller."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    trials: pd.DataFrame      # one row per completed trial (run_id, trial, policy, metrics, pareto)
    frontier: pd.DataFrame    # the non-dominated rows of ``trials``
    dense: dict[str, float]
    num_failed: int
    wall_s: float


class TrialRecorder(tune.Callback):
    """Driver-side Ray Tune callback: logs each finished trial to MLflow and prints progress.

    Exceptions are caught and printed: an exception in a callback would abort the whole search.
    """

    def __init__(self, tracker: SearchTracker, space: SearchSpace, total: int, out: Callable[[str], None]) -> None:
        self.tracker = tracker
        self.space = space
        self.total = total
        self.out = out
        self.rows: list[dict[str, Any]] = []
        self.num_failed = 0

    def _index(self) -> int:
        return len(self.rows) + self.num_failed + 1

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        try:
            result = trial.last_result or {}
            if not all(m in result for m in OBJECTIVE_METRICS):
                return  # an errored trial also passes here in some Ray versions; on_trial_error records it
            index = self._index()
            policy = self.space.policy(trial.config)
            metrics = {k: float(v) for k, v in result.items() if k in _REPORTED and isinstance(v, (int, float))}
            run_id = self.tracker.log_trial(index, policy, metrics, tags={"secateurs.ray_trial_id": trial.trial_id})
            self.rows.append({"run_id": run_id, "trial": index, "criterion": policy.criterion, "policy": policy.to_json(), **metrics})
            self._progress(index, f"acc {metrics['accuracy']:.4f}  {metrics['latency_ms']:.3f} ms  {metrics['size_mb']:.3f} MB")
        except Exception as exc:  # never let logging kill the search
            self.out(f"warning: could not record trial {trial.trial_id}: {exc!r}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        try:
            index = self._index()
            self.num_failed += 1
            error = ""
            if trial.error_file and Path(trial.error_file).is_file():
                error = Path(trial.error_file).read_text()
            try:
                policy = self.space.policy(trial.config)
            except Exception:
                policy = None
            self.tracker.log_failed_trial(index, policy, error, tags={"secateurs.ray_trial_id": trial.trial_id})
            reason = error.strip().splitlines()[-1] if error.strip() else "unknown error"
            self._progress(index, f"FAILED: {reason[:120]}")
        except Exception as exc:
            self.out(f"warning: could not record failed trial {trial.trial_id}: {exc!r}")

    def _progress(self, index: int, what: str) -> None:
        done = len(self.rows) + self.num_failed
        best = ""
        if self.rows:
            table = frontier.frontier_table(pd.DataFrame(self.rows))
            best = (
                f" | frontier {int(table['pareto'].sum())}, best acc {table['accuracy'].max():.4f}, "
                f"fastest {table['latency_ms'].min():.3f} ms"
            )
        self.out(f"[{done:>{len(str(self.total))}}/{self.total}] trial {index}: {what}{best}")


_REPORTED = set(TRIAL_METRICS) | {"param_sparsity", "finetune_steps", "time_prune_s", "time_finetune_s", "time_measure_s"}


def _init_ray() -> bool:
    """Start a local Ray unless one is running (or ``RAY_ADDRESS`` names one); True if we started it."""
    if ray.is_initialized():
        return False
    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        configure_logging=True,
    )
    return True


def _format_frontier(table: pd.DataFrame) -> str:
    columns = ["trial", "criterion", "accuracy", "accuracy_drop", "latency_ms", "size_mb", "macs", "params", "run_id"]
    shown = table.sort_values("latency_ms")[columns].copy()
    shown["run_id"] = shown["run_id"].str[:12]
    shown[["trial", "macs", "params"]] = shown[["trial", "macs", "params"]].astype(int)
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def run_search(config: Config, *, config_name: str = "search", tracking_uri: str | None = None, out: Callable[[str], None] | None = None) -> SearchResult:
    """Run the whole search a validated config describes and return where it was recorded.

    Input problems (task, checkpoint, space rules) raise before anything is written to MLflow.
    """
    out = out or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    # 1. Everything that can fail on bad input, before any record is made.
    task = make_task(config.task)
    config.measure.resolve_device()
    checkpoint = str(ensure_dense_checkpoint(config.task, task, log=out))
    example = task.test_data()[0][:1]
    groups = discover_groups(load_dense(task, checkpoint), example)
    space = SearchSpace(config.space, groups, seed=config.search.seed)
    out(f"{len(groups)} prunable groups, {len(space.searched_groups)} searched: {', '.join(space.searched_groups)}")

    dense_policy = Policy(criterion=config.space.criteria[0], ratios={}, seed=config.search.seed)
    dense = evaluate(dense_policy, task, checkpoint, FinetuneConfig(epochs=0), config.measure).to_dict()
    out(f"dense: acc {dense['accuracy']:.4f}  {dense['latency_ms']:.3f} ms  {dense['size_mb']:.3f} MB  {dense['macs']:,} MACs")

    # 2. Records.
    tracker = SearchTracker(tracking_uri)
    tracker.start_search(
        config.tracking.experiment,
        config.tracking.run_name or config_name,
        config_yaml=config.to_yaml(),
        params={
            "task": config.task.name,
            "sampler": config.search.sampler,
            "seed": config.search.seed,
            "num_trials": config.search.num_trials,
            "finetune.epochs": config.finetune.epochs,
            "criteria": ",".join(config.space.criteria),
            "searched_groups": len(space.searched_groups),
        },
        space=space.describe(),
    )
    tracker.log_dense({k: v for k, v in dense.items() if k in _REPORTED}, checkpoint)
    recorder = TrialRecorder(tracker, space, config.search.num_trials, out)
    status = "FAILED"
    started_ray = False
    try:
        # 3. Trials.
        started_ray = _init_ray()
        context = TrialContext(
            space=space,
            task=config.task,
            checkpoint=checkpoint,
            finetune=config.finetune,
            measure=config.measure,
            dense_accuracy=dense["accuracy"],
            dense_params=int(dense["params"]),
        )
        searcher = OptunaSearch(
            space=space,
            metric=OBJECTIVE_METRICS,
            mode=OBJECTIVE_MODES,
            sampler=make_sampler(config.search.sampler, config.search.seed, config.search.population_size),
        )
        trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": config.search.cpus_per_trial})
        storage = config.search.storage_path or str(Path(tempfile.gettempdir()) / "secateurs-ray")
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=config.search.num_trials,
                max_concurrent_trials=config.search.max_concurrent,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=f"{config_name}-{tracker.parent_run_id[:8]}",
                storage_path=str(Path(storage).expanduser().resolve()),
                verbose=0,
                callbacks=[recorder],
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            ),
        )
        out(f"searching {config.search.num_trials} policies with {config.search.sampler} "
            f"({config.search.max_concurrent} at a time); MLflow run {tracker.parent_run_id}")
        tuner.fit()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        out("interrupted: recording the frontier of the trials completed so far")
    finally:
        if started_ray:
            ray.shutdown()
        result = _finish(tracker, recorder, dense, config_name, status, started, out)
    return result


def _finish(tracker: SearchTracker, recorder: TrialRecorder, dense: dict[str, float], config_name: str, status: str, started: float, out: Callable[[str], None]) -> SearchResult:
    trials = pd.DataFrame(recorder.rows)
    if len(trials):
        trials = frontier.frontier_table(trials)
        tracker.tag_pareto(dict(zip(trials["run_id"], trials["pareto"].astype(bool))))
        front = trials[trials["pareto"]].sort_values("latency_ms").reset_index(drop=True)
    else:
        front = trials
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "frontier.csv"
        front.drop(columns=["pareto"], errors="ignore").to_csv(csv_path, index=False)
        tracker.log_artifact(csv_path)
        png_path = frontier.plot_frontier(trials, Path(tmp) / "frontier.png", dense=dense, title=config_name)
        tracker.log_artifact(png_path)
    wall_s = time.perf_counter() - started
    tracker.log_search_metrics({
        "trials_completed": len(trials),
        "trials_failed": recorder.num_failed,
        "frontier_size": len(front),
        "wall_time_s": wall_s,
    })
    tracker.end_search(status)
    if len(front):
        out("\nPareto frontier (accuracy max, latency_ms min, size_mb min):\n" + _format_frontier(front))
    else:
        out("\nno trial completed: the frontier is empty")
    out(f"\n{len(trials)} trials completed, {recorder.num_failed} failed, {len(front)} on the frontier, "
        f"{wall_s:.1f} s wall time")
    out(f"MLflow: {ui_command(tracker.tracking_uri)}\n  then open http://127.0.0.1:5000/{tracker.experiment_url()}")
    return SearchResult(
        tracking_uri=tracker.tracking_uri,
        experiment_id=tracker.experiment_id,
        parent_run_id=tracker.parent_run_id,
        trials=trials,
        frontier=front,
        dense=dense,
        num_failed=recorder.num_failed,
        wall_s=wall_s,
    )
