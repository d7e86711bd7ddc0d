"""Runs one search: validate and prepare, then Ray Tune + OptunaSearch, MLflow records, frontier.

``run_search`` starts a search; ``resume_search`` continues one from its MLflow parent run. Both
end in the same loop (:func:`_run`): the trials still to run, under one Tuner whose searcher knows
every trial MLflow holds. Ray's start-up and the Tuner live in :mod:`search.ray_runtime`; the end
of a search (re-timing, frontier, report) in :mod:`search.outcome`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Callable, Iterator

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import optuna
import pandas as pd
import ray
import torch
import yaml

from evaluators import depth, deploy
from evaluators.checkpoint import ensure_dense_checkpoint, load_dense
from evaluators.checks import check_objectives
from evaluators.pruning import PruningError, check_ratios, check_space, discover_groups
from evaluators.tasks import Task, make_task, top1_accuracy
from evaluators.trial import FinetuneConfig, Reference, evaluate, prune_model
from search import frontier, outcome, ray_runtime, records, sensitivity
from search.baselines import Baseline, reference_points
from search.config import Config, ConfigError, validate
from search.constraints import parse_all
from search.objectives import DEFAULT, Objectives, recorded_metrics
from search.outcome import SearchResult
from search.recorder import REPORT_S, HypervolumePlateau, TimeBudget, TrialRecorder, end_estimate, retiming_s, trial_metrics, trial_s
from search.refine import COUNT_TAG, EPOCHS_TAG, candidates, chosen_before, epochs_that_fit, refine_frontier, rungs_makespan
from search.samplers import make_sampler
from search.screening import ScreeningScheduler, fine_tuned_trials, recorded_screening
from search.searcher import RecordedTrial, SecateursSearch
from search.tracking import SearchTracker, check_tracking_uri
from search.trainable import TrialContext, run_trial
from spaces import Block, Policy, SearchSpace, SpaceError
from spaces.depth import resolve as resolve_depth
from spaces.space import RATIO_PREFIX

Log = Callable[[str], None]
__all__ = ["SearchResult", "resume_search", "run_search"]


@dataclasses.dataclass
class _Prepared:
    task: Task
    checkpoint: str
    space: SearchSpace
    first: list[Baseline] | None = None  # baselines and seeds, evaluated first (None: not chosen yet)

    @property
    def baselines(self) -> list[Baseline]:
        return [b for b in self.first or () if b.kind == "baseline"]


@dataclasses.dataclass
class _Session:
    """One run of the driver over a search: a new one, or a resume of one MLflow holds."""

    config: Config
    config_name: str
    tracker: SearchTracker
    prepared: _Prepared
    dense: dict[str, float]
    out: Log
    address: str | None
    started: float                # time.perf_counter() when the command started
    spent_before_s: float = 0.0   # wall seconds earlier sessions of this search spent (a resume)
    ray_name: str = "search"      # Tune's experiment name for this session
    objectives: Objectives = DEFAULT  # what the search optimises (search.objectives, else the task's + costs)
    started_ray: bool = False     # this session started (or connected) Ray, and shuts it down

    @property
    def budget(self) -> int:
        """Trials a search runs: the baselines first, then ``num_trials`` sampled policies."""
        return self.config.search.num_trials + len(self.prepared.baselines)

    def elapsed_s(self) -> float:
        """Wall seconds the search has taken, earlier sessions included."""
        return self.spent_before_s + time.perf_counter() - self.started

    def seconds_left(self) -> float | None:
        budget = self.config.search.time_budget_s
        return None if budget is None else budget - self.elapsed_s()

    def end_s(self, rows: list[dict]) -> float:
        """Seconds the end of the search will take (refinement, re-timing, report), from ``rows``."""
        search = self.config.search
        end = end_estimate(rows, self.config.measure, refine=search.refine.plan(search.refine.epochs, search.refine.candidates) if search.refine else (),
                           finetune_epochs=self.config.finetune.epochs, concurrency=search.max_concurrent, objectives=self.objectives)
        if search.refine is not None and search.refine.share is not None:  # that part of the budget, or more if epochs needs it
            end = max(end, end_estimate(rows, self.config.measure, objectives=self.objectives) + search.refine.share * search.time_budget_s)
        return end

    def trial_fits(self, rows: list[dict], longest: float | None = None) -> bool:
        """Whether a trial started now is expected to end before ``search.time_budget_s`` stops the
        trials (when what is left is what the end of the search takes: :meth:`end_s`); True without a
        budget or a finished trial. Expected as long as ``longest``, the longest trial of this session
        in wall seconds (:meth:`search.recorder.TrialRecorder.longest_trial_s`, one running counted so
        far), or a median trial's own seconds (:func:`search.recorder.trial_s`), whichever is longer:
        policies cost unequal times (a lightly pruned one fine-tunes slower), and one cut off at the
        stop loses all its compute, where the time not started is the refinement's."""
        left, median = self.seconds_left(), trial_s(rows)
        expected = max((s for s in (median, longest) if s is not None), default=None)
        return left is None or median is None or left - expected > self.end_s(rows)

    def log_elapsed(self) -> None:
        """Record the time spent so far (parent metric ``elapsed_s``), which a resume starts from."""
        self.tracker.log_elapsed(self.elapsed_s())


def _prepare(config: Config, out: Log, checkpoint: str | None = None) -> _Prepared:
    """Everything that can fail on bad input, done before any record is made."""
    task = make_task(config.task)  # checked: one forward pass, outputs, labels, lengths, finite values
    _check_names(config, task)
    device = config.measure.resolve_device()
    config.measure.check_inputs(task.example())
    # the space against the model's structure (an untrained copy: groups and blocks do not depend on the
    # weights), so that bad input, e.g. a head ratio that breaks grouped-query attention, stops the
    # search before the dense model trains, which may take minutes
    fresh = task.build_model().eval()
    blocks = _quantization_and_blocks(config, task, fresh, device.type)
    groups = discover_groups(fresh, task.example(), config.space.granularity, config.space.nm_block)
    check_space(config.space.granularity, config.space.criteria, groups)
    check_ratios(fresh, task.example(), SearchSpace(dataclasses.replace(config.space, depth=None), groups, seed=config.search.seed))
    del fresh
    # the dense model trains with the torch threads a trial gets (Ray sets OMP_NUM_THREADS to its CPUs)
    threads = max(1, int(config.search.cpus_per_trial))
    checkpoint = checkpoint or str(ensure_dense_checkpoint(config.task, task, log=out, threads=threads))
    dense_model = load_dense(task, checkpoint)
    order = _block_order(config, task, dense_model, blocks)
    space = SearchSpace(config.space, groups, seed=config.search.seed, blocks=blocks, block_order=order)
    return _Prepared(task, checkpoint, space)


def _check_criteria(config: Config, prepared: _Prepared, out: Log) -> None:
    """Prune the dense model once with each granularity and criterion the space can sample (every
    searched ratio at the middle of its range), so that a pairing that cannot prune this model
    (``bn_scale`` on a model without BatchNorm, ...) stops the search now, not in every trial.
    Then says what will be searched: every input check has passed."""
    space = prepared.space
    for granularity in config.space.granularity:
        for criterion in config.space.criteria:
            params = {"granularity": granularity, "criterion": criterion, **space.default_params()}
            for d in space.dimensions(granularity):
                if d.range is not None:
                    steps = round((d.range.high - d.range.low) / d.range.step) if d.range.step else 2
                    params[RATIO_PREFIX + d.group] = d.range.low + (steps // 2) * (d.range.step or (d.range.high - d.range.low) / 2)
            try:
                prune_model(space.policy(params), prepared.task, prepared.checkpoint)
            except PruningError as exc:
                raise ConfigError(f"space.criteria: {criterion!r} cannot prune this model at granularity {granularity!r}: {exc}") from None
    out(f"{len(space.groups)} prunable groups, {len(space.searched_groups)} searched: {', '.join(space.searched_groups)}")
    if space.depth is not None:
        searched = (f"how many to drop, 0..{space.depth.max_drop}, least important ({config.space.depth.criterion}) first: "
                    f"{', '.join(space.depth.droppable)}" if config.space.depth.choice == "count"
                    else f"each kept or dropped: {', '.join(space.depth.decisions)}")
        out(f"{len(space.blocks)} removable blocks ({', '.join(b.name for b in space.blocks)}); searched: {searched}")
    if config.space.quantization != ["none"]:
        out(f"quantization: {', '.join(config.space.quantization)} (measured on the artifact, {config.measure.backend})")


def _check_local_resources(config: Config, address: str | None) -> None:
    """Before any work, for a search on a local Ray: does this machine have what one trial asks for?"""
    if (address or os.environ.get("RAY_ADDRESS") or "local") == "local":
        ray_runtime.check_resources(config.search.cpus_per_trial, config.search.gpus_per_trial, ray_runtime.local_nodes(), "this machine")


def _start_ray(config: Config, address: str | None, out: Log) -> bool:
    """Start (or connect to) Ray and check that one of its nodes can run a trial; True if this call
    started it. Nothing is recorded before: a search that could never run a trial is refused."""
    local = (address or os.environ.get("RAY_ADDRESS") or "local") == "local"
    started = ray_runtime.init_ray(address)
    try:
        where = "the local Ray" if local else "the Ray cluster"
        ray_runtime.check_resources(config.search.cpus_per_trial, config.search.gpus_per_trial, ray_runtime.cluster_nodes(), where)
    except ValueError as exc:
        if started:
            ray.shutdown()
        raise ConfigError(str(exc)) from None
    if not local and not ray_runtime.token_auth():
        out("warning: this Ray cluster does not use token authentication (RAY_AUTH_MODE=token): anyone who can reach "
            "its ports can run code on it; see README, 'What listens where'")
    return started


def _quantization_and_blocks(config: Config, task: Task, model: torch.nn.Module, device: str) -> list[Block]:
    """The quantization choices checked against the measure device and the model (one line each),
    and with ``space.depth`` the model's removable blocks (found on a fresh model: which modules can
    go does not depend on the weights), its rules checked against them, saying why a module they
    match is not removable."""
    try:
        deploy.check_quantization(config.space.quantization, config.measure.backend, device)
        deploy.check_model(config.space.quantization, config.measure.backend, model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if config.space.depth is None:
        return []
    blocks = depth.discover(model, task.example())
    names = [b.name for b in blocks]
    try:
        resolved = resolve_depth(config.space.depth, blocks, names)
    except SpaceError:  # again, with why the modules it names are not removable
        resolved = resolve_depth(config.space.depth, blocks, names, not_removable=depth.rejected(model, task.example()))
    if depth.keeps_one(model) and resolved.can_drop_all(len(names)):
        raise ConfigError(f"space.depth: a policy could remove all {len(names)} layers ({names[0]} ... {names[-1]}), and a "
                          f"{type(model).__name__} needs at least one; exclude one (rules: [{{match: {names[0]}, exclude: true}}]) "
                          f"or use choice: count with max_drop <= {len(names) - 1}")
    return blocks


def _block_order(config: Config, task: Task, model: torch.nn.Module, blocks: list[Block]) -> list[str]:
    """``space.depth.choice: count``: the blocks least important first, by its criterion on the
    trained dense model and the task's calibration batches (else no order)."""
    if config.space.depth is None or config.space.depth.choice != "count":
        return []
    try:
        return depth.order(model, task.calibration(), [b.name for b in blocks], config.space.depth.criterion)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _measure_dense(config: Config, prepared: _Prepared, out: Log) -> dict[str, float]:
    policy = Policy(criterion=config.space.criteria[0], ratios={}, seed=config.search.seed)
    measured = evaluate(policy, prepared.task, prepared.checkpoint, FinetuneConfig(epochs=0), config.measure)
    check_objectives(prepared.task.objectives, measured.scores, field="Task.objectives")  # each declared name is returned
    dense = {k: v for k, v in measured.to_dict().items() if v is not None}
    scores = "  ".join(f"{'acc' if k == 'accuracy' else k} {v:.4f}" for k, v in measured.scores.items())
    out(f"dense: {scores}  {dense['latency_ms']:.3f} ms  {dense['size_mb']:.3f} MB  {dense['macs']:,} MACs")
    return dense


def _objectives(config: Config, task: Task, scores: list[str], metrics: list[str]) -> Objectives:
    """The search's objectives (``search.objectives``, else the task's scores + latency_ms and size_mb),
    checked against the ``scores`` the task's evaluation returns, and the constraints' metric names
    against the ``metrics`` a trial records."""
    try:
        objectives = Objectives.resolve(config.search.objectives, getattr(task, "objectives", None))
    except ValueError as exc:
        raise ConfigError(f"search.{exc}") from None
    try:
        objectives.check_scores(scores)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        parse_all(config.search.constraints, metrics=metrics)
    except ValueError as exc:
        raise ConfigError(f"search.constraints: {exc}") from None
    return objectives


def _check_names(config: Config, task: Task) -> None:
    """``Task.objectives``, ``search.objectives`` and the constraints' metric names, checked before any work where the
    scores of the task's evaluation are known without running it: the default evaluation returns
    exactly ``accuracy``. A task's own ``evaluate`` may return more than it declares, so its names
    are checked once the dense model is measured (:func:`_measured_objectives`)."""
    if task.evaluate is top1_accuracy:
        check_objectives(task.objectives, {"accuracy": 0.0}, field="Task.objectives")
        _objectives(config, task, ["accuracy"], recorded_metrics(["accuracy"]))


def _measured_objectives(config: Config, prepared: _Prepared, dense: dict[str, float]) -> Objectives:
    """:func:`_objectives` against what the dense model's evaluation returned and recorded."""
    objectives = _objectives(config, prepared.task, list(Reference.from_record(dense).scores), sorted(trial_metrics(dense)))
    try:
        objectives.check_measured(dense)  # e.g. tokens_per_s of a model that takes no token ids
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return objectives


def _first_points(session: _Session) -> None:
    """The sensitivity step (when configured: it may narrow the space and gives seeds), then the
    baselines on the final space; recorded on the parent run as ``baselines.json``."""
    config, prepared, tracker, out = session.config, session.prepared, session.tracker, session.out
    seeds: list[Baseline] = []
    if config.search.sensitivity is not None:
        settings = config.search.sensitivity
        with open(prepared.checkpoint, "rb") as f:
            checkpoint = f.read()
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
        targets = sensitivity.mac_targets(settings.seed_macs, parse_all(config.search.constraints, metrics=None))
        if targets:
            seeds += [s for s in sensitivity.mac_seed_points(prepared.space, rows, targets, prepared.task, checkpoint, out)
                      if all(s.point != t.point for t in seeds)]
        seeds = sensitivity.within_counted_constraints(seeds, prepared.space, prepared.task, checkpoint,
                                                       parse_all(config.search.constraints, metrics=None), session.dense, out)
        seeds = seeds[: config.search.num_trials]
    model = load_dense(prepared.task, prepared.checkpoint)
    baselines = reference_points(prepared.space, model, prepared.task.example(), config.baseline_kinds(), config.search.baseline_ratios)
    prepared.first = baselines + [s for s in seeds if all(s.point != b.point for b in baselines)]
    tracker.log_json([b.to_dict() for b in prepared.first], "baselines.json")


def run_search(config: Config, *, config_name: str = "search", tracking_uri: str | None = None, out: Log | None = None,
               address: str | None = None, started: float | None = None) -> SearchResult:
    """Run the whole search a validated config describes and return where it was recorded.

    Input problems (tracking store, resources, task, checkpoint, space rules, criteria) raise
    before anything is written to MLflow. ``started``: ``time.perf_counter()`` when the command
    started (default: now), where ``search.time_budget_s`` counts from.
    """
    out = out or _stderr
    started = time.perf_counter() if started is None else started
    _quiet()
    uri = check_tracking_uri(tracking_uri)
    _check_local_resources(config, address)
    prepared = _prepare(config, out)
    _check_criteria(config, prepared, out)
    dense = _measure_dense(config, prepared, out)
    objectives = _measured_objectives(config, prepared, dense)
    started_ray = _start_ray(config, address, out)
    with _shutting_down_ray_on_error(started_ray):
        tracker = SearchTracker(uri)
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
            tags={"secateurs.config_name": config_name, records.OBJECTIVES_TAG: json.dumps(objectives.mapping)},
        )
        out(f"recording in MLflow run {tracker.parent_run_id}; if it stops, continue with "
            f"`secateurs search --resume {tracker.parent_run_id}`")
        tracker.log_dense(trial_metrics(dense), prepared.checkpoint)
        session = _Session(config, config_name, tracker, prepared, dense, out, address, started,
                           ray_name=f"{config_name}-{tracker.parent_run_id[:8]}", objectives=objectives, started_ray=started_ray)
        session.log_elapsed()
    return _run(session)


def resume_search(run_id: str, *, tracking_uri: str | None = None, out: Log | None = None, address: str | None = None,
                  started: float | None = None) -> SearchResult:
    """Continue a search whose driver died (or was interrupted) from its MLflow parent run.

    MLflow is the record: completed and failed trials are kept, counted once and told to the
    sampler; trials that were running (or being logged: their runs are removed) are not counted,
    so their places in the budget go to new trials; the same parent run receives the new trials
    and the final frontier. Ray's own experiment snapshot is not needed.
    """
    out = out or _stderr
    started = time.perf_counter() if started is None else started
    _quiet()
    tracker = SearchTracker(check_tracking_uri(tracking_uri, existing=True))
    try:
        parent = tracker.attach(run_id)
    except LookupError as exc:
        raise ConfigError(f"--resume: {exc}") from None
    if parent.info.status == "FINISHED":
        raise ConfigError(f"--resume: search {run_id} already finished; nothing to resume")
    try:
        config = validate(yaml.safe_load(records.read_artifact(tracker.client, run_id, "config.yaml")))
    except LookupError as exc:
        raise ConfigError(f"--resume: {exc}; cannot resume: start the search again") from None
    _check_local_resources(config, address)
    dense_runs = tracker.child_runs("dense")
    finished_dense = dense_runs[dense_runs["status"] == "FINISHED"] if len(dense_runs) else dense_runs
    checkpoint = records.row_values(finished_dense.iloc[0], "tags.").get("secateurs.checkpoint") if len(finished_dense) else None
    prepared = _prepare(config, out, checkpoint=checkpoint)
    _check_criteria(config, prepared, out)
    started_ray = _start_ray(config, address, out)
    with _shutting_down_ray_on_error(started_ray):
        tracker.group_names = [g.name for g in prepared.space.groups]
        cut_off = tracker.remove_cut_off_runs()
        if cut_off:
            out(f"resume: removed {cut_off} run(s) the driver was writing when it stopped; their trials are run again")
        if len(finished_dense):
            dense = {k: float(v) for k, v in records.row_values(finished_dense.iloc[0], "metrics.").items()}
        else:  # the driver stopped before the dense reference was recorded
            dense = _measure_dense(config, prepared, out)
            tracker.log_dense(trial_metrics(dense), prepared.checkpoint)
        _read_first_points(tracker, prepared)
        resumes = int(parent.data.tags.get("secateurs.resumes", "0")) + 1
        tracker.set_tags({"secateurs.resumes": str(resumes)})
        config_name = parent.data.tags.get("secateurs.config_name", "search")
        session = _Session(config, config_name, tracker, prepared, dense, out, address, started,
                           spent_before_s=float(parent.data.metrics.get("elapsed_s", 0.0)),
                           ray_name=f"{config_name}-{run_id[:8]}-resume{resumes}",
                           objectives=records.search_objectives(parent.data.tags, config), started_ray=started_ray)
        tracker.set_running()
        session.log_elapsed()
    return _run(session)


@contextlib.contextmanager
def _shutting_down_ray_on_error(started_ray: bool) -> Iterator[None]:
    """Until a search's session exists, an error (or a kill) shuts down the Ray this command started."""
    try:
        yield
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise


def _read_first_points(tracker: SearchTracker, prepared: _Prepared) -> None:
    """The baselines and seeds an earlier session chose (``baselines.json``), on the space it chose
    them on (narrowed by ``narrowed.json`` if the sensitivity step narrowed it); left None if that
    session stopped before choosing them, so that they are chosen again."""
    try:
        first = [Baseline.from_dict(b) for b in json.loads(records.read_artifact(tracker.client, tracker.parent_run_id, "baselines.json"))]
    except LookupError:
        return
    try:
        highs = json.loads(records.read_artifact(tracker.client, tracker.parent_run_id, "narrowed.json"))
    except LookupError:
        highs = {}
    prepared.space = sensitivity.narrowed_to(prepared.space, highs)
    prepared.first = first


def _history(tracker: SearchTracker) -> tuple[list[dict], int, list[RecordedTrial], set[str]]:
    """What MLflow holds of the trials: the completed rows, the number failed, each trial as the
    searcher is told of it, and the names of the baselines and seeds already evaluated."""
    rows, failed, _ = tracker.trial_table()
    recorded = tracker.recorded_trials()
    history = [RecordedTrial(r["sampled"], r["metrics"], r["kind"] == "trial" and r["metrics"] is not None
                             and r["metrics"].get("fidelity", 1) != 0) for r in recorded]
    return rows, failed, history, {r["origin"] for r in recorded if r["origin"]}


def _run(session: _Session) -> SearchResult:
    config, tracker, prepared, out = session.config, session.tracker, session.prepared, session.out
    tracker.set_tags({"secateurs.hypervolume_reference": session.objectives.reference_description(),
                      "secateurs.ray_experiment": f"{ray_runtime.storage_path(config.search.storage_path).rstrip('/')}/{session.ray_name}"})
    status = "FAILED"
    try:
        if prepared.first is None:
            _first_points(session)
            session.log_elapsed()
        rows, failed, history, evaluated = _history(tracker)
        recorded = len(rows) + failed

        remaining_first = [b for b in prepared.first if b.name not in evaluated]
        constraints = parse_all(config.search.constraints, metrics=None)  # names checked against the dense record before any record
        recorder = TrialRecorder(tracker, prepared.space, session.budget, out, dense=session.dense, constraints=constraints,
                                 baselines=prepared.first, clock=session.elapsed_s, objectives=session.objectives)
        stoppers = [HypervolumePlateau(recorder, config.search.patience)] if config.search.patience else []
        if config.search.time_budget_s is not None:
            stoppers.append(TimeBudget(recorder, session.seconds_left, session.end_s))
        fine_tunes = config.search.fine_tune_budget
        searcher = SecateursSearch(
            space=prepared.space,
            metric=session.objectives.names,
            mode=session.objectives.senses,
            sampler=make_sampler(config.search.sampler, config.search.seed + recorded, config.search.population_size),
            points_to_evaluate=[b.point for b in remaining_first] or None,
            origins=[b.name for b in remaining_first],
            constraints=constraints,
            dense=session.dense,
            fine_tunes=fine_tunes,
            exempt=sum(b.kind == "baseline" for b in remaining_first),
            history=history,
            fits=None if config.search.time_budget_s is None else lambda: session.trial_fits(recorder.rows, recorder.longest_trial_s()),
        )
        if recorded:
            out(f"resuming search {tracker.parent_run_id}: {len(rows)} trials completed, {failed} failed, budget {session.budget}; "
                f"the sampler is told of {searcher.told} of them")
        scheduler = None
        if config.search.screening:
            scheduler = ScreeningScheduler(config.search.screening.warmup, [b.name for b in prepared.baselines],
                                           recorded_screening(rows, session.objectives, constraints, session.dense), session.objectives,
                                           constraints=constraints, dense=session.dense)
            if recorded:
                out(f"screening: {len(scheduler.screened)} recorded screening results restored")
        kinds = ", ".join(dict.fromkeys(b.name.split()[0] for b in prepared.baselines)) or "none"
        seeds = len(prepared.first) - len(prepared.baselines)
        goal = (f"until {fine_tunes} sampled policies are fine-tuned (at most {config.search.num_trials} sampled)"
                if fine_tunes is not None else f"{config.search.num_trials} policies")
        out(f"searching {goal} with {config.search.sampler}"
            f"{f' ({seeds} seeded by sensitivity)' if seeds else ''} after {len(prepared.baselines)} baselines ({kinds}), "
            f"{config.search.max_concurrent} at a time; MLflow run {tracker.parent_run_id}")
        fit_wall, fit_started_unix = 0.0, time.time()
        if session.budget > recorded and not (fine_tunes is not None and fine_tuned_trials(rows) >= fine_tunes):
            tuner = ray_runtime.make_tuner(
                run_trial, _trial_context(session), resources={"cpu": config.search.cpus_per_trial, "gpu": config.search.gpus_per_trial},
                searcher=searcher, num_samples=session.budget - recorded, max_concurrent=config.search.max_concurrent,
                scheduler=scheduler,
                name=session.ray_name, storage=ray_runtime.storage_path(config.search.storage_path), callbacks=[recorder],
                stopper=_combined(stoppers), max_failures=config.search.max_failures,
            )
            fit_started, fit_started_unix = time.perf_counter(), time.time()
            tuner.fit()
            fit_wall = time.perf_counter() - fit_started
        tracker.log_search_metrics({"fit_wall_s": fit_wall, "fit_started_unix_s": fit_started_unix})
        session.log_elapsed()
        status = _status(session, stoppers, recorder, out_of_time=searcher.out_of_time)
        if status == "FINISHED" and config.search.refine is not None:
            _refine(session)
    except KeyboardInterrupt:
        status = "KILLED"
        out(f"interrupted: resume with `secateurs search --resume {tracker.parent_run_id}`")
    finally:
        if session.started_ray:
            ray.shutdown()
        if status == "FINISHED" and config.search.remeasure:
            _remeasure(session)
            session.log_elapsed()
        result = outcome.finish(tracker, session.dense, session.config_name, status, session.started, out, session.objectives)
    return result


def _combined(stoppers: list):
    from ray.tune.stopper import CombinedStopper

    if not stoppers:
        return None
    return stoppers[0] if len(stoppers) == 1 else CombinedStopper(*stoppers)


def _status(session: _Session, stoppers: list, recorder: TrialRecorder, out_of_time: bool = False) -> str:
    """FINISHED or KILLED, from what MLflow holds once fit() returned; says why it stopped
    (``out_of_time``: the searcher started no trial that would not end before the time budget's stop)."""
    config, out = session.config, session.out
    rows, failed, _ = session.tracker.trial_table()
    done = len(rows) + failed
    fine_tunes = config.search.fine_tune_budget
    if fine_tunes is not None and fine_tuned_trials(rows) >= fine_tunes:
        out(f"stopped: {fine_tunes} sampled policies were fine-tuned (search.screening.fine_tunes), {done} trials recorded")
    elif any(isinstance(s, HypervolumePlateau) and s.stop_all() for s in stoppers):
        out(f"stopped early: the hypervolume did not grow for {config.search.patience} trials")
    elif out_of_time and done < session.budget:
        out(f"stopped: the time budget of {config.search.time_budget_s:g} s was spent ({done} trials recorded; "
            f"no trial was started that would not end before the rest of the search needs the time)")
    elif any(isinstance(s, TimeBudget) and s.stop_all() for s in stoppers) and done < session.budget:
        out(f"stopped: the time budget of {config.search.time_budget_s:g} s was spent ({done} trials recorded)")
    elif done < session.budget:
        out(f"interrupted: resume with `secateurs search --resume {session.tracker.parent_run_id}`")
        return "KILLED"  # Tune ends fit() quietly on Ctrl-C
    return "FINISHED"


def _refine(session: _Session) -> None:
    """``search.refine``: the frontier's candidates fine-tuned longer (:mod:`search.refine`), on Ray."""
    config = session.config
    rows = session.tracker.trial_table()[0]
    table = pd.DataFrame(rows)
    front = table[frontier.feasible_frontier(table, session.objectives.mapping)] if len(table) else table
    tags = session.tracker.client.get_run(session.tracker.parent_run_id).data.tags
    epochs, count = _refine_plan(session, rows, front, tags)
    if count == 0:
        session.out(f"not refining: the time budget leaves {max(session.seconds_left() or 0.0, 0.0):.0f} s, too little to fine-tune "
                    f"one frontier policy for search.refine.epochs ({config.search.refine.epochs:g}) and re-time the frontier")
        return
    with open(session.prepared.checkpoint, "rb") as f:
        checkpoint = f.read()
    costs, seconds = _first_rung_time(session, rows, table, front, epochs, count)
    until = _until_retiming(session, rows)
    refine_frontier(session.tracker, table, config.search.refine, task=config.task, checkpoint=checkpoint, finetune=config.finetune,
                    measure=config.measure, dense=session.dense,
                    resources={"cpu": config.search.cpus_per_trial, "gpu": config.search.gpus_per_trial}, out=session.out,
                    scores=session.objectives.quality, epochs=epochs, count=count, senses=session.objectives.mapping,
                    chosen=chosen_before(tags), concurrency=config.search.max_concurrent, seconds=seconds, costs=costs,
                    deadline=None if until is None else time.perf_counter() + until)


def _until_retiming(session: _Session, rows: list[dict]) -> float | None:
    """Seconds until the re-timing (and the report) must start for the search to end within its time
    budget; None without a time budget."""
    left = session.seconds_left()
    return None if left is None else left - end_estimate(rows, session.config.measure, objectives=session.objectives, trials_running=False)


def _refine_seconds(session: _Session, rows: list[dict]) -> float | None:
    """The seconds the refinement is planned to take: 0.9 of :func:`_until_retiming` (Ray's scheduling
    and a neighbour's noise are not in the plan; a fine-tune still running at the end of it all is
    stopped); None without a time budget."""
    left = _until_retiming(session, rows)
    return None if left is None else 0.9 * left


def _first_rung_time(session: _Session, rows: list[dict], table: pd.DataFrame, front: pd.DataFrame, epochs: float,
                     count: int) -> tuple[dict[str, tuple[float, float]], float | None]:
    """Each fine-tuned trial's refinement cost (:func:`_refine_costs`) and the seconds the refinement's
    first rung may take: all of :func:`_until_retiming` (the plan's margin, :func:`_refine_seconds`, is
    for choosing the epochs and the count; each start is judged on the pace the fine-tunes so far kept,
    :func:`search.refine.refine_frontier`), less the later rungs as planned for the first rung's spread
    candidates (None: no time budget)."""
    tuned = table[frontier.feasible_mask(table) & (table["time_finetune_s"].fillna(0) > 0)] if "time_finetune_s" in table else table[:0]
    each = _refine_costs(session, tuned) or []
    costs = dict(zip(tuned["run_id"], each)) if each else {}
    left = _until_retiming(session, rows)
    if left is None:
        return costs, None
    settings, concurrency = session.config.search.refine, session.config.search.max_concurrent
    planned = [costs[r] for r in candidates(front, count * settings.widening) if r in costs] if len(front) else []
    return costs, left - rungs_makespan(planned, settings.plan(epochs, count)[1:], concurrency)


def _refine_costs(session: _Session, chosen: pd.DataFrame) -> list[tuple[float, float]] | None:
    """Each candidate's (fixed seconds, seconds an epoch) from its own trial: its prune and timing, and
    its fine-tune's speed (a less pruned model fine-tunes slower); None without those timings."""
    config = session.config
    if chosen.empty or "time_finetune_s" not in chosen or not (chosen["time_finetune_s"].fillna(0) > 0).all():
        return None
    steps = session.prepared.task.train_source.batches_per_epoch(config.finetune.batch_size)  # None for a stream: not read here
    capped = config.finetune.max_steps is not None and steps and "finetune_steps" in chosen and (chosen["finetune_steps"].fillna(0) > 0).all()
    return [(float(row["time_prune_s"]) + float(row["time_measure_s"]),
             float(row["time_finetune_s"]) / (float(row["finetune_steps"]) / steps if capped else config.finetune.epochs))
            for _, row in chosen.iterrows()]


def _refine_plan(session: _Session, rows: list[dict], front: pd.DataFrame, tags: dict[str, str]) -> tuple[float, int]:
    """The epochs of each refinement and how many candidates get them. ``search.refine.epochs`` and
    ``candidates``; with ``share``, as many epochs as fit in the time left after the re-timing (at
    least ``epochs``), planned from each candidate's own trial (:func:`_refine_costs`). With a time
    budget the budget wins: when even ``epochs`` does not fit for every candidate, fewer candidates
    (planned as spread over the frontier), and none when not for one. A resume keeps the epochs and
    the count chosen first."""
    config = session.config
    settings = config.search.refine
    first = settings.widening
    if chosen_before(tags) and EPOCHS_TAG in tags:  # a resume: as many as planned first (older records: as were chosen)
        return float(tags[EPOCHS_TAG]), int(tags.get(COUNT_TAG) or -(-len(chosen_before(tags)) // first))
    left = _refine_seconds(session, rows)
    if left is None:
        return settings.epochs, settings.candidates
    concurrency = config.search.max_concurrent
    for count in range(settings.candidates, 0, -1):
        chosen = front[front["run_id"].isin(candidates(front, count * first))] if len(front) else front
        costs = _refine_costs(session, chosen)
        if costs is None:  # nothing to plan from: what the config says
            return settings.epochs, settings.candidates
        epochs = settings.epochs if settings.share is None else epochs_that_fit(left, costs, concurrency=concurrency, least=settings.epochs,
                                                                                 settings=settings)
        if rungs_makespan(costs, settings.plan(epochs, count), concurrency) <= left:
            return epochs, count
    return settings.epochs, 0


def _remeasure(session: _Session) -> None:
    """Re-time the frontier with the dense model (:func:`search.outcome.remeasure_frontier`), unless
    ``search.time_budget_s`` leaves too little time for one pass of it (the builds and one timing). The
    trials stopped in time for two (:func:`search.recorder.end_estimate`); when the end of the last
    trials ate into that, one pass, beside the dense model and unconfirmed, is still truer than the in-search latencies, and
    ``remeasure_frontier``'s deadline starts a second only if it fits."""
    left = session.seconds_left()  # Ray is shut down by now
    needed = retiming_s(session.tracker.trial_table()[0], session.config.measure, objectives=session.objectives, passes=1) + REPORT_S
    if left is not None and left < needed:
        session.out(f"not re-timing the frontier: the time budget leaves {max(left, 0):.0f} s, one pass needs about {needed:.0f} s; "
                    "latencies are the in-search ones")
        return
    outcome.remeasure_frontier(session.tracker, session.prepared.task, session.prepared.checkpoint, session.config.measure,
                               session.dense, session.out, objectives=session.objectives,
                               deadline=None if left is None else time.perf_counter() + left - REPORT_S)


def _trial_context(session: _Session) -> TrialContext:
    config, prepared = session.config, session.prepared
    with open(prepared.checkpoint, "rb") as f:
        checkpoint = f.read()  # travels through the object store to every node
    return TrialContext(
        space=prepared.space,
        task=config.task,
        checkpoint=checkpoint,
        finetune=config.finetune,
        measure=config.measure,
        dense=Reference.from_record(session.dense),
        screening_bn_batches=config.search.screening.bn_batches if config.search.screening else None,
    )


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _quiet() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
