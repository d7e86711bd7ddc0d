"""The one reader of what a search left in MLflow.

A search is a parent run (tag ``secateurs.kind=search``) with child runs of kinds ``dense``,
``baseline``, ``trial`` and ``export``. This module reads them back as pandas tables through
MLflow's own :func:`mlflow.search_runs` (it pages and flattens into ``metrics.*``, ``params.*`` and
``tags.*`` columns), and reads a trial's policy from the one record of it: its ``policy.json``
artifact, written by the driver from the policy the trial ran. The ``ratio.*`` params of a trial
run are a view of that policy for the MLflow UI; nothing reads them back.

>>> runs = child_runs("sqlite:///mlflow.db", "1", "3241bd1d...", "trial", "baseline")  # doctest: +SKIP
>>> table, failed = trial_table(runs)  # doctest: +SKIP
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Iterable

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from spaces import Policy

KIND = "secateurs.kind"
PARETO = "secateurs.pareto"
PARENT = "mlflow.parentRunId"
TRIAL = "secateurs.trial"
POLICY = "policy.json"    # a trial run's artifact: the policy it ran (the one record of it)
SAMPLED = "sampled.json"  # a trial run's artifact: the parameters the sampler chose (replayed by --resume)
TRIAL_METRICS = ("accuracy", "accuracy_drop", "latency_ms", "latency_p10_ms", "latency_p90_ms", "size_mb", "macs", "params")


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

    One row per completed run: ``run_id``, ``trial``, ``kind``, ``criterion``, every metric it
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
