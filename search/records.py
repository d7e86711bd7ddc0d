"""The one reader of what a search left in MLflow.

A search is a parent run (tag ``secateurs.kind=search``) with child runs of kinds ``dense``,
``baseline``, ``trial`` and ``export``. This module reads them back as pandas tables through
MLflow's own :func:`mlflow.search_runs` (it pages and flattens into ``metrics.*``, ``params.*`` and
``tags.*`` columns), and reads a trial's policy from the one record of it: its ``policy.json``
artifact, written by the driver from the policy the trial ran. The ``ratio.*`` params of a trial
run are a view of that policy for the MLflow UI; nothing reads them back.

A whole search, for ``secateurs frontier | compare | pick``, is read by :func:`load_search`.

>>> record = load_search("3241bd1d4aa04c958a6255df61a85320", "sqlite:///mlflow.db")  # doctest: +SKIP
>>> record.frontier  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import mlflow
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from search import fidelity, frontier
from search.config import Config, ConfigError, validate
from search.objectives import DEFAULT, Objectives
from spaces import Policy

KIND = "secateurs.kind"
PARETO = "secateurs.pareto"
PARENT = "mlflow.parentRunId"
TRIAL = "secateurs.trial"
POLICY = "policy.json"    # a trial run's artifact: the policy it ran (the one record of it)
SAMPLED = "sampled.json"  # a trial run's artifact: the parameters the sampler chose (replayed by --resume)
TABLE_COLUMNS = ["trial", "kind", "criterion", "accuracy", "accuracy_drop", "latency_ms", "size_mb", "macs", "params", "run_id"]
TRIAL_METRICS = ("accuracy", "accuracy_drop", "latency_ms", "latency_p10_ms", "latency_p90_ms", "size_mb", "macs", "params")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (MLflow's default, made absolute)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def child_runs(tracking_uri: str, experiment_id: str, parent_run_id: str, *kinds: str) -> pd.DataFrame:
    """The child runs of search ``parent_run_id`` of the given kinds, in trial order (then start
    time), one row each, as :func:`mlflow.search_runs` flattens them (``run_id``, ``status``,
    ``start_time``, ``metrics.<name>``, ``params.<name>``, ``tags.<name>``)."""
    mlflow.set_tracking_uri(tracking_uri)
    frames = []
    for kind in kinds:  # MLflow's filter has no IN for tags
        frame = mlflow.search_runs(
            [experiment_id], filter_string=f"tags.`{PARENT}` = '{parent_run_id}' and tags.`{KIND}` = '{kind}'", output_format="pandas",
        )
        if len(frame):
            frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["run_id", "status", "start_time"])
    runs = pd.concat(frames, ignore_index=True)
    order = pd.to_numeric(runs.get(f"tags.{TRIAL}"), errors="coerce").fillna(0) if f"tags.{TRIAL}" in runs else 0
    return runs.assign(_order=order).sort_values(["_order", "start_time"], kind="stable").drop(columns="_order").reset_index(drop=True)


def columns(runs: pd.DataFrame, prefix: str) -> dict[str, str]:
    """``{name: column}`` of the ``metrics.``, ``params.`` or ``tags.`` columns of ``runs``."""
    return {c.removeprefix(prefix): c for c in runs.columns if c.startswith(prefix)}


def row_values(row: pd.Series, prefix: str) -> dict[str, Any]:
    """The non-missing ``metrics.``/``params.``/``tags.`` values of one row of :func:`child_runs`."""
    return {k.removeprefix(prefix): v for k, v in row.items() if k.startswith(prefix) and not _missing(v)}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def trial_table(runs: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The completed trials of ``runs`` (trial and baseline runs) and how many failed.

    One row per completed run: ``run_id``, ``trial``, ``kind``, ``criterion``, ``quantization``, every metric it
    logged (latest value), its ``ratio.<group>`` params as floats and ``pareto_tag`` (the
    ``secateurs.pareto`` tag, None before the search tagged its frontier)."""
    if not len(runs):
        return pd.DataFrame(columns=["run_id", "trial", "kind", "criterion"]), 0
    finished = runs["status"] == "FINISHED"
    rows = []
    for _, run in runs[finished].iterrows():
        tags, params = row_values(run, "tags."), row_values(run, "params.")
        rows.append({
            "run_id": run["run_id"],
            "trial": int(tags.get(TRIAL, 0)),
            "kind": tags.get(KIND, "trial"),
            "criterion": params.get("policy.criterion", ""),
            "quantization": params.get("policy.quantization", "none"),
            **{k: float(v) for k, v in row_values(run, "metrics.").items()},
            **{k: float(v) for k, v in sorted(params.items()) if k.startswith("ratio.")},
            "pareto_tag": tags.get(PARETO),
        })
    table = pd.DataFrame(rows, columns=None if rows else ["run_id", "trial", "kind", "criterion"])
    return table, int((~finished).sum())


def read_artifact(client: MlflowClient, run_id: str, name: str) -> str:
    """The text of artifact ``name`` of run ``run_id``; raises ``LookupError`` naming it if it cannot be read."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return Path(client.download_artifacts(run_id, name, tmp)).read_text()
        except (MlflowException, OSError) as exc:
            raise LookupError(f"run {run_id} has no readable {name}: {exc}") from None


def read_policy(client: MlflowClient, run_id: str) -> Policy:
    """The policy trial run ``run_id`` ran, from its ``policy.json``."""
    text = read_artifact(client, run_id, POLICY)
    try:
        return Policy.from_json(text)
    except ValueError as exc:
        raise LookupError(f"run {run_id} has a policy.json that does not parse: {exc}") from None


def read_policies(client: MlflowClient, run_ids: Iterable[str]) -> dict[str, Policy]:
    """``{run_id: policy}`` for several trial runs (see :func:`read_policy`)."""
    return {run_id: read_policy(client, run_id) for run_id in run_ids}


def read_sampled(client: MlflowClient, run_id: str) -> dict[str, Any] | None:
    """The sampler's parameters of trial run ``run_id`` (``sampled.json``), None if it has none
    (recorded before the file existed, or cut off while logging)."""
    try:
        return json.loads(read_artifact(client, run_id, SAMPLED))
    except (LookupError, ValueError):
        return None


class ProductionError(ValueError):
    """Bad input to frontier/compare/pick/export; the message is one line saying what and why."""


@dataclasses.dataclass
class SearchRecord:
    """One search as MLflow holds it: its config, dense reference and completed trials."""

    tracking_uri: str
    run_id: str
    run_name: str
    experiment_id: str
    status: str
    config: Config
    dense: dict[str, float]
    checkpoint: str
    trials: pd.DataFrame        # one row per completed trial or baseline, with a boolean ``pareto`` column
    pareto_from_tags: bool      # False when the search never tagged its frontier (still running, crashed)
    objectives: Objectives = DEFAULT  # what the search optimised (tag secateurs.objectives)

    @property
    def frontier(self) -> pd.DataFrame:
        """The frontier trials, fastest first."""
        front = self.trials[self.trials["pareto"]] if len(self.trials) else self.trials
        return front.sort_values("latency_ms", kind="stable").reset_index(drop=True) if len(front) else front

    @property
    def label(self) -> str:
        return f"{self.run_name} ({self.run_id[:8]})"


def check_store(tracking_uri: str) -> None:
    """A sqlite store that does not exist is an error here: MLflow would silently create an empty one."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ProductionError(f"no MLflow store at {str(path)!r} (tracking URI {tracking_uri}); "
                                  "run a search first or pass --tracking-uri")


def get_search_run(client: MlflowClient, run_id: str):
    """The parent run ``run_id``; a missing run or one that is not a search raises :class:`ProductionError`."""
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ProductionError(f"run {run_id!r} not found in the tracking store {client.tracking_uri}") from None
        raise ProductionError(f"cannot read run {run_id!r} from {client.tracking_uri}: {exc.message}") from None
    kind = run.data.tags.get(KIND)
    if kind != "search":
        parent = run.data.tags.get(PARENT)
        hint = f"; its search run is {parent}" if parent else ""
        raise ProductionError(f"run {run_id!r} is not a search (tag {KIND}={kind or '<none>'}){hint}")
    return run


def _trial_rows(runs: pd.DataFrame, objectives: Objectives) -> pd.DataFrame:
    """The completed trials with every objective (failed ones have no metrics), in trial order."""
    table, _ = trial_table(runs)
    if not len(table):
        return table
    for metric in (*TRIAL_METRICS, *objectives.names, "param_sparsity"):
        if metric not in table:
            table[metric] = math.nan
    table = table[table[objectives.names].notna().all(axis=1)].copy()
    table["feasible"] = table["feasible"].fillna(1.0) != 0 if "feasible" in table else True
    for metric in ("macs", "params"):
        if table[metric].notna().all():
            table[metric] = table[metric].astype(int)
    return table.sort_values("trial", kind="stable").reset_index(drop=True)


def load_search(run_id: str, tracking_uri: str | None = None) -> SearchRecord:
    """Read the search ``run_id`` (its parent run id) from the tracking store.

    Raises :class:`ProductionError` for an unknown run, a run that is not a search, or a search
    whose records are incomplete (no config.yaml, no dense run).
    """
    uri = resolve_tracking_uri(tracking_uri)
    check_store(uri)
    client = MlflowClient(uri)
    run = get_search_run(client, run_id)
    experiment_id = run.info.experiment_id
    with tempfile.TemporaryDirectory() as tmp:
        try:
            config_path = client.download_artifacts(run_id, "config.yaml", tmp)
            config_yaml = Path(config_path).read_text()
        except (MlflowException, OSError) as exc:
            raise ProductionError(f"search {run_id} has no readable config.yaml artifact: {exc}") from None
    try:
        config = validate(yaml.safe_load(config_yaml))
    except ConfigError as exc:
        raise ProductionError(f"the config.yaml of search {run_id} no longer validates: {exc}") from None
    dense_runs = child_runs(uri, experiment_id, run_id, "dense")
    if not len(dense_runs):
        raise ProductionError(f"search {run_id} has no dense run (tag {KIND}=dense): it was not recorded by secateurs search")
    dense_run = dense_runs.iloc[0]
    objectives = search_objectives(run.data.tags, config)
    # Baselines (uniform policies the search evaluates first) compete for the frontier like trials.
    trials = _trial_rows(child_runs(uri, experiment_id, run_id, "trial", "baseline"), objectives)
    tagged = bool(len(trials)) and trials["pareto_tag"].notna().all()
    if len(trials):
        if tagged:
            trials["pareto"] = trials["pareto_tag"] == "true"
        else:  # only feasible trials (search.constraints) can be on the frontier
            trials["pareto"] = False
            feasible = trials["feasible"]
            trials.loc[feasible, "pareto"] = frontier.feasible_frontier(trials[feasible], objectives.mapping)
        trials = fidelity.expected(trials.drop(columns=["pareto_tag"]), objectives.quality)
    return SearchRecord(
        tracking_uri=uri,
        run_id=run_id,
        run_name=run.info.run_name or run_id[:8],
        experiment_id=experiment_id,
        status=run.info.status,
        config=config,
        dense={k: float(v) for k, v in row_values(dense_run, "metrics.").items()},
        checkpoint=row_values(dense_run, "tags.").get("secateurs.checkpoint", ""),
        trials=trials,
        pareto_from_tags=tagged,
        objectives=objectives,
    )


OBJECTIVES_TAG = "secateurs.objectives"  # the parent run's: the search's objectives, as JSON {name: sense}


def search_objectives(tags: dict[str, str], config: Config) -> Objectives:
    """A search's objectives: its tag (written when it starts), else its config's, else the default."""
    if OBJECTIVES_TAG in tags:
        return Objectives.of(json.loads(tags[OBJECTIVES_TAG]))
    return Objectives.resolve(config.search.objectives) if config.search.objectives else DEFAULT


def format_table(table: pd.DataFrame, columns: list[str] | None = None) -> str:
    """A fixed-width table of trials: ints as ints, floats to 4 decimals, run ids cut to 12 characters."""
    columns = [c for c in (columns or TABLE_COLUMNS) if c in table.columns]
    shown = table[columns].copy()
    if "run_id" in shown:
        shown["run_id"] = shown["run_id"].str[:12]
    for column in ("trial", "macs", "params"):
        if column in shown:
            shown[column] = shown[column].astype(int)
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}")
