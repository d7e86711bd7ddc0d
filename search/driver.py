"""Runs one search: validate and prepare, then Ray Tune + OptunaSearch, MLflow records, frontier."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# Tune snapshots its experiment state at its own pace (every 10 s or more); --resume replays from
# MLflow what finished after the last snapshot (search.searcher.SecateursSearch).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import optuna
import pandas as pd
import ray
import yaml
from ray import tune

from evaluators.checkpoint import ensure_dense_checkpoint, load_dense
from evaluators.pruning import check_space, discover_groups
from evaluators.tasks import Task, make_task
from evaluators.trial import FinetuneConfig, evaluate, measure_latencies
from search import frontier
from search.config import Config, ConfigError, validate
from search.samplers import make_sampler
from search.constraints import parse_all
from search.recorder import REPORTED as _REPORTED
from search.recorder import HypervolumePlateau, TrialRecorder, feasible_mask, normalised_hypervolume
from search import records, sensitivity
from search.baselines import Baseline, reference_points
from search.screening import ScreeningScheduler, fine_tuned_trials, recorded_screening
from search.searcher import RecordedTrial, SecateursSearch
from search.tracking import SearchTracker, ui_command
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
    trials: pd.DataFrame      # one row per completed trial (run_id, trial, kind, metrics, ratio.<group>, pareto)
    frontier: pd.DataFrame    # the non-dominated rows of ``trials``, with ``policy`` (the policy.json each ran)
    dense: dict[str, float]
    num_failed: int
    wall_s: float
    status: str = "FINISHED"  # MLflow status of the parent run: FINISHED, KILLED or FAILED


def _init_ray(address: str | None) -> bool:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start a private local Ray; True if this
    call started or connected it (and so should shut it down).

    Without an address we pass ``address="local"``: plain ``ray.init()`` would instead join any
    cluster that ``ray start`` left on this machine, and hang if that cluster is gone.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(
        address=address,
        include_dashboard=False if address == "local" else None,
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


@dataclasses.dataclass
class _Prepared:
    task: Task
    checkpoint: str
    space: SearchSpace
    first: list[Baseline] = dataclasses.field(default_factory=list)  # baselines and seeds, evaluated first

    @property
    def baselines(self) -> list[Baseline]:
        return [b for b in self.first if b.kind == "baseline"]


def _prepare(config: Config, out: Callable[[str], None], checkpoint: str | None = None) -> _Prepared:
    """Everything that can fail on bad input, done before any record is made."""
    task = make_task(config.task)
    config.measure.resolve_device()
    config.measure.check_inputs(task.test_data()[0][:1])
    checkpoint = checkpoint or str(ensure_dense_checkpoint(config.task, task, log=out))
    groups = discover_groups(load_dense(task, checkpoint), task.test_data()[0][:1], config.space.granularity, config.space.nm_block)
    check_space(config.space.granularity, config.space.criteria, groups)
    space = SearchSpace(config.space, groups, seed=config.search.seed)
    out(f"{len(groups)} prunable groups, {len(space.searched_groups)} searched: {', '.join(space.searched_groups)}")
    return _Prepared(task, checkpoint, space)


def _first_points(config: Config, prepared: _Prepared, tracker: SearchTracker, out: Callable[[str], None]) -> None:
    """The sensitivity step (when configured: it may narrow the space and gives seeds), then the
    baselines on the final space; recorded on the parent run as ``baselines.json``."""
    seeds: list[Baseline] = []
    if config.search.sensitivity is not None:
        settings = config.search.sensitivity
        checkpoint = Path(prepared.checkpoint).read_bytes()
        rows = sensitivity.analyse(config, prepared.space, checkpoint, tracker, out)
        if settings.narrow is not None:
            prepared.space, highs = sensitivity.narrowed(prepared.space, rows, settings.narrow)
            tracker.log_json(highs, "narrowed.json")
            out(f"sensitivity: narrowed {len(highs)} ranges (proxy drop <= {settings.narrow:g}): "
                + ", ".join(f"{g} <= {h:g}" for g, h in highs.items()))
        seeds = sensitivity.seed_points(prepared.space, rows, settings.seed_drops)
        if settings.seed_latency:
            seeds += [s for s in sensitivity.latency_seed_points(config, prepared.space, rows, checkpoint, tracker, out)
                      if all(s.point != t.point for t in seeds)]
        seeds = seeds[: config.search.num_trials]
    model = load_dense(prepared.task, prepared.checkpoint)
    baselines = reference_points(prepared.space, model, prepared.task.test_data()[0][:1], config.baseline_kinds(), config.search.baseline_ratios)
    prepared.first = baselines + [s for s in seeds if all(s.point != b.point for b in baselines)]
    tracker.log_json([b.to_dict() for b in prepared.first], "baselines.json")


def _tuner_parts(config: Config, prepared: _Prepared, dense: dict[str, float], replay: dict[str, dict] | None = None):
    context = TrialContext(
        space=prepared.space,
        task=config.task,
        checkpoint=Path(prepared.checkpoint).read_bytes(),  # travels through the object store to every node
        finetune=config.finetune,
        measure=config.measure,
        dense_accuracy=dense["accuracy"],
        dense_params=int(dense["params"]),
        screening_bn_batches=config.search.screening.bn_batches if config.search.screening else None,
        replay=replay,
    )
    return tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": config.search.cpus_per_trial, "gpu": config.search.gpus_per_trial})


def run_search(
    config: Config,
    *,
    config_name: str = "search",
    tracking_uri: str | None = None,
    out: Callable[[str], None] | None = None,
    address: str | None = None,
) -> SearchResult:
    """Run the whole search a validated config describes and return where it was recorded.

    Input problems (task, checkpoint, space rules) raise before anything is written to MLflow.
    """
    out = out or _stderr
    started = time.perf_counter()
    _quiet()
    prepared = _prepare(config, out)
    dense_policy = Policy(criterion=config.space.criteria[0], ratios={}, seed=config.search.seed)
    measured = evaluate(dense_policy, prepared.task, prepared.checkpoint, FinetuneConfig(epochs=0), config.measure)
    dense = {k: v for k, v in measured.to_dict().items() if v is not None}
    out(f"dense: acc {dense['accuracy']:.4f}  {dense['latency_ms']:.3f} ms  {dense['size_mb']:.3f} MB  {dense['macs']:,} MACs")

    tracker = SearchTracker(tracking_uri)
    tracker.group_names = [g.name for g in prepared.space.groups]
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
            "searched_groups": len(prepared.space.searched_groups),
        },
        space=prepared.space.describe(),
    )
    tracker.log_dense({k: v for k, v in dense.items() if k in _REPORTED}, prepared.checkpoint)
    storage = _storage_path(config.search.storage_path)
    experiment_name = f"{config_name}-{tracker.parent_run_id[:8]}"
    experiment_path = f"{storage.rstrip('/')}/{experiment_name}"
    tracker.set_tags({"secateurs.ray_experiment": experiment_path, "secateurs.config_name": config_name})

    def make_tuner(recorder: TrialRecorder, stopper: tune.Stopper | None) -> tune.Tuner:
        searcher = SecateursSearch(
            space=prepared.space,
            metric=OBJECTIVE_METRICS,
            mode=OBJECTIVE_MODES,
            sampler=make_sampler(config.search.sampler, config.search.seed, config.search.population_size),
            points_to_evaluate=[b.point for b in prepared.first] or None,
            origins=[b.name for b in prepared.first],
            constraints=parse_all(config.search.constraints),
            dense=dense,
            fine_tunes=config.search.fine_tune_budget,
            exempt=len(prepared.baselines),
        )
        return tune.Tuner(
            _tuner_parts(config, prepared, dense),
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=_budget(config, prepared),
                max_concurrent_trials=config.search.max_concurrent,
                reuse_actors=True,
                scheduler=ScreeningScheduler(config.search.screening.warmup, [b.name for b in prepared.baselines])
                if config.search.screening else None,
                time_budget_s=config.search.time_budget_s,
            ),
            run_config=tune.RunConfig(
                name=experiment_name,
                storage_path=storage,
                verbose=0,
                callbacks=[recorder],
                stop=stopper,
                failure_config=tune.FailureConfig(max_failures=config.search.max_failures, fail_fast=False),
            ),
        )

    return _run(config, tracker, prepared, dense, config_name, make_tuner, started, out, address, fresh=True)


def resume_search(
    run_id: str,
    *,
    tracking_uri: str | None = None,
    out: Callable[[str], None] | None = None,
    address: str | None = None,
) -> SearchResult:
    """Continue a search whose driver died (or was interrupted) from its MLflow parent run.

    Completed trials are kept and not run again; trials that were in flight are run again; the
    same parent run receives the new trials and the final frontier.
    """
    out = out or _stderr
    started = time.perf_counter()
    _quiet()
    tracker = SearchTracker(tracking_uri)
    try:
        parent = tracker.attach(run_id)
    except LookupError as exc:
        raise ConfigError(f"--resume: {exc}") from None
    with tempfile.TemporaryDirectory() as tmp:
        config_path = tracker.client.download_artifacts(run_id, "config.yaml", tmp)
        config = validate(yaml.safe_load(Path(config_path).read_text()))
    experiment_path = parent.data.tags.get("secateurs.ray_experiment", "")
    if not experiment_path or not tune.Tuner.can_restore(experiment_path):
        raise ConfigError(f"--resume: the Ray Tune state of run {run_id} ({experiment_path or 'not recorded'}) is missing; cannot resume")
    dense_runs = tracker.child_runs("dense")
    if not len(dense_runs):
        raise ConfigError(f"--resume: run {run_id} has no dense reference run; cannot resume")
    dense_run = dense_runs.iloc[0]
    prepared = _prepare(config, out, checkpoint=dense_run["tags.secateurs.checkpoint"])
    with tempfile.TemporaryDirectory() as tmp:
        logged = json.loads(Path(tracker.client.download_artifacts(run_id, "baselines.json", tmp)).read_text())
    prepared.first = [Baseline.from_dict(b) for b in logged]
    done, failed, _ = tracker.trial_table()
    if len(done) + failed >= _budget(config, prepared) or parent.info.status == "FINISHED":
        raise ConfigError(f"--resume: search {run_id} already finished ({len(done) + failed} of {_budget(config, prepared)} "
                          "trials recorded); nothing to resume")
    tracker.group_names = [g.name for g in prepared.space.groups]
    dense = {k: float(v) for k, v in records.row_values(dense_run, "metrics.").items()}
    config_name = parent.data.tags.get("secateurs.config_name", "search")
    out(f"resuming search {run_id}: {len(done)} trials completed, {failed} failed, budget {_budget(config, prepared)}")
    tracker.set_running()

    # MLflow records each trial when it ends; Ray checkpoints its state only every so often. What
    # MLflow holds is replayed, not run again, and each recorded trial is counted once.
    recorded = tracker.recorded_trials()
    replay = {ray_id: {k: v for k, v in record.items() if k in ("metrics", "error")} for ray_id, record in recorded}

    def make_tuner(recorder: TrialRecorder, stopper: tune.Stopper | None) -> tune.Tuner:
        tuner = tune.Tuner.restore(experiment_path, trainable=_tuner_parts(config, prepared, dense, replay), resume_unfinished=True)
        searcher = tuner._local_tuner._tune_config.search_alg
        if isinstance(searcher, SecateursSearch):  # Ray restores its state during fit(), then it replays these
            searcher.replay_recorded([RecordedTrial(ray_id, r["origin"], r["sampled"]) for ray_id, r in recorded])
        # The restored RunConfig carries pickled copies of the old recorder and stopper; use these.
        run_config = tuner._local_tuner.get_run_config()
        run_config.callbacks = [recorder]
        run_config.stop = stopper
        # The restored scheduler is the one pickled when the search started: give it the screening
        # results MLflow recorded since, so that screening goes on where it stopped.
        scheduler = tuner._local_tuner._tune_config.scheduler
        if isinstance(scheduler, ScreeningScheduler):
            scheduler.screened = recorded_screening(done)
            out(f"screening: {len(scheduler.screened)} recorded screening results restored")
        return tuner

    return _run(config, tracker, prepared, dense, config_name, make_tuner, started, out, address, fresh=False)


def _storage_path(configured: str | None) -> str:
    """Where Tune keeps the experiment state: a URI (``s3://``, ``gs://``, ``file://``) as given,
    else an absolute local path (default ``<tmp>/secateurs-ray``)."""
    if configured and "://" in configured:
        return configured
    return str(Path(configured or Path(tempfile.gettempdir()) / "secateurs-ray").expanduser().resolve())


def _budget(config: Config, prepared: _Prepared) -> int:
    """Trials a search runs: the baselines first, then ``num_trials`` sampled policies."""
    return config.search.num_trials + len(prepared.baselines)


def _run(config, tracker, prepared, dense, config_name, make_tuner, started, out, address, fresh) -> SearchResult:
    tracker.set_tags({"secateurs.hypervolume_reference": "accuracy=0, latency_ms=dense, size_mb=dense (objectives divided by dense)"})
    status = "FAILED"
    started_ray = False
    try:
        started_ray = _init_ray(address)
        if fresh:
            _first_points(config, prepared, tracker, out)
        recorder = TrialRecorder(
            tracker, prepared.space, _budget(config, prepared), out,
            dense=dense,
            constraints=parse_all(config.search.constraints),
            baselines=prepared.first,
        )
        stopper = HypervolumePlateau(recorder, config.search.patience) if config.search.patience else None
        tuner = make_tuner(recorder, stopper)
        kinds = ", ".join(dict.fromkeys(b.name.split()[0] for b in prepared.baselines)) or "none"
        seeds = len(prepared.first) - len(prepared.baselines)
        fine_tunes = config.search.fine_tune_budget
        budget = (f"until {fine_tunes} sampled policies are fine-tuned (at most {config.search.num_trials} sampled)"
                  if fine_tunes is not None else f"{config.search.num_trials} policies")
        out(f"searching {budget} with {config.search.sampler}"
            f"{f' ({seeds} seeded by sensitivity)' if seeds else ''} after {len(prepared.baselines)} baselines ({kinds}), "
            f"{config.search.max_concurrent} at a time; MLflow run {tracker.parent_run_id}")
        fit_started = time.perf_counter()
        tuner.fit()
        fit_wall = time.perf_counter() - fit_started
        if recorder.replayed:
            out(f"resume: {recorder.replayed} trials that MLflow recorded after Ray's last checkpoint were replayed from the record, not run again")
        tracker.log_search_metrics({"fit_wall_s": fit_wall})
        rows, failed, _ = tracker.trial_table()
        if fine_tunes is not None and fine_tuned_trials(rows) >= fine_tunes:
            status = "FINISHED"
            out(f"stopped: {fine_tunes} sampled policies were fine-tuned (search.screening.fine_tunes), "
                f"{len(rows) + failed} trials recorded")
        elif stopper is not None and stopper.stop_all():
            status = "FINISHED"
            out(f"stopped early: the hypervolume did not grow for {config.search.patience} trials")
        elif config.search.time_budget_s is not None and fit_wall >= config.search.time_budget_s and len(rows) + failed < _budget(config, prepared):
            status = "FINISHED"
            out(f"stopped: the time budget of {config.search.time_budget_s:g} s was spent ({len(rows) + failed} trials recorded)")
        elif len(rows) + failed < _budget(config, prepared):
            status = "KILLED"  # Tune ends fit() quietly on Ctrl-C
            out(f"interrupted: resume with `secateurs search --resume {tracker.parent_run_id}`")
        else:
            status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        out(f"interrupted: resume with `secateurs search --resume {tracker.parent_run_id}`")
    finally:
        if started_ray:
            ray.shutdown()
        if status == "FINISHED" and config.search.remeasure:
            _remeasure_frontier(config, tracker, prepared, dense, out)
        result = _finish(tracker, dense, config_name, status, started, out)
    return result


def _remeasure_frontier(config: Config, tracker: SearchTracker, prepared: _Prepared, dense: dict[str, float], out, passes: int = 3) -> None:
    """Time the dense model and the frontier's policies again, together (round-robin, with no trial
    running), and record those latencies; the in-search ones stay as ``latency_ms_in_search``.

    New timings can reshape the frontier. Then the dense model and the new frontier are timed
    together again (at most ``passes`` times), so that the reported frontier and the dense latency
    it is compared with come from one measurement."""
    dense_run_id = tracker.child_runs("dense").iloc[0]["run_id"]
    dense_in_search = dense["latency_ms"]
    in_search: dict[str, float] = {}
    timed: set[str] = set()
    for _ in range(passes):
        table = pd.DataFrame(tracker.trial_table()[0])
        if table.empty:
            return
        table = table[feasible_mask(table)]
        if table.empty:
            return
        front = table[frontier.frontier_table(table)["pareto"].to_numpy()]
        if set(front["run_id"]) <= timed:
            return
        out(f"re-measuring the latency of the dense model and {len(front)} frontier policies, together")
        policies = {"dense": Policy(criterion=config.space.criteria[0], ratios={}), **tracker.policies(list(front["run_id"]))}
        for row in front.itertuples():
            in_search.setdefault(row.run_id, row.latency_ms)
        fresh = measure_latencies(policies, prepared.task, prepared.checkpoint, config.measure)
        dense_fresh = fresh.pop("dense")
        dense.update(dense_fresh)
        tracker.update_metrics(dense_run_id, {**dense_fresh, "latency_ms_in_search": dense_in_search})
        for run_id, metrics in fresh.items():
            tracker.update_metrics(run_id, {**metrics, "latency_ms_in_search": in_search[run_id]})
        timed = set(fresh)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _quiet() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def _finish(tracker: SearchTracker, dense: dict[str, float], config_name: str, status: str, started: float, out: Callable[[str], None]) -> SearchResult:
    rows, num_failed, _ = tracker.trial_table()  # MLflow is the record: the frontier is computed from it
    trials = pd.DataFrame(rows, columns=None if rows else ["run_id", "trial", "criterion", *frontier.OBJECTIVES])
    if len(trials):
        trials = trials.sort_values("trial").reset_index(drop=True)
        feasible = feasible_mask(trials)
        trials["pareto"] = False
        if feasible.any():
            trials.loc[feasible, "pareto"] = frontier.frontier_table(trials[feasible])["pareto"].to_numpy()
        tracker.tag_pareto(dict(zip(trials["run_id"], trials["pareto"].astype(bool))))
        front = trials[trials["pareto"]].sort_values("latency_ms").reset_index(drop=True)
        policies = tracker.policies(list(front["run_id"]))  # the policies the frontier's trials ran (policy.json)
        front["policy"] = [policies[run_id].to_json() for run_id in front["run_id"]]
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
        "trials_failed": num_failed,
        "frontier_size": len(front),
        "hypervolume_final": normalised_hypervolume(front, dense) if len(front) else 0.0,
        "wall_time_s": wall_s,
    })
    tracker.end_search(status)
    if len(front):
        out("\nPareto frontier (accuracy max, latency_ms min, size_mb min):\n" + _format_frontier(front))
    else:
        out("\nno trial completed: the frontier is empty")
    out(f"\n{len(trials)} trials completed, {num_failed} failed, {len(front)} on the frontier, "
        f"{wall_s:.1f} s wall time ({status.lower()})")
    if tracker.tracking_uri.startswith(("http://", "https://")):
        out(f"MLflow: open {tracker.tracking_uri.rstrip('/')}/{tracker.experiment_url()}")
    else:
        out(f"MLflow: {ui_command(tracker.tracking_uri)}\n  then open http://127.0.0.1:5000/{tracker.experiment_url()}")
    return SearchResult(
        tracking_uri=tracker.tracking_uri,
        experiment_id=tracker.experiment_id,
        parent_run_id=tracker.parent_run_id,
        trials=trials,
        frontier=front,
        dense=dense,
        num_failed=num_failed,
        wall_s=wall_s,
        status=status,
    )
