"""MLflow records of a search: one parent run, a child run per trial and one for the dense model.

Only the driver writes (through :class:`SearchTracker`), so concurrent trials never contend for
the sqlite store.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from search import records
from search.config import ConfigError
from search.records import KIND, PARENT, PARETO, POLICY, SAMPLED, resolve_tracking_uri
from spaces import Policy


SCHEMES = "sqlite:///PATH, http(s)://HOST:PORT, postgresql://, mysql://, mssql:// or databricks"
SQLITE_HEADER = b"SQLite format 3\x00"


def check_tracking_uri(uri: str | None, *, existing: bool = False, timeout_s: float = 5.0) -> str:
    """The tracking URI a search will write to (``uri``, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlflow.db`` here), probed before any work without writing anything: a sqlite file
    must be a database (or not exist yet, unless ``existing``) in a writable directory; a server
    must answer within ``timeout_s``; any other scheme must be one MLflow can open.
    Raises :class:`ConfigError` naming the setting, the URI and what is wrong.

    >>> check_tracking_uri("sqlit:///mlflow.db")
    Traceback (most recent call last):
    search.config.ConfigError: --tracking-uri 'sqlit:///mlflow.db': unknown scheme 'sqlit'; valid: sqlite:///PATH, http(s)://HOST:PORT, postgresql://, mysql://, mssql:// or databricks
    """
    source = "--tracking-uri" if uri else "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default tracking URI"
    resolved = resolve_tracking_uri(uri)
    where = f"{source} {resolved!r}"
    scheme = urlparse(resolved).scheme
    if scheme == "sqlite":
        _check_sqlite(resolved, where, existing)
    elif scheme in ("http", "https"):
        _check_server(resolved, where, timeout_s)
    elif scheme in ("", "file"):
        raise ConfigError(f"{where}: MLflow 3 no longer writes to a file store (a plain path or file://); "
                          f"use a database, e.g. sqlite:///{Path(resolved.removeprefix('file://')).name or 'mlflow'}.db")
    elif scheme in ("postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc") or "+" in scheme:
        try:
            MlflowClient(resolved).search_experiments(max_results=1)
        except Exception as exc:  # a driver missing, a server down, credentials refused
            raise ConfigError(f"{where}: cannot open the store ({type(exc).__name__}: {_first_line(exc)})") from None
    else:
        raise ConfigError(f"{where}: unknown scheme {scheme!r}; valid: {SCHEMES}")
    return resolved


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _check_sqlite(uri: str, where: str, existing: bool) -> None:
    if not uri.startswith("sqlite:///"):
        raise ConfigError(f"{where}: a sqlite URI needs a file path, sqlite:///relative.db or sqlite:////absolute/path.db")
    path = Path(uri.removeprefix("sqlite:///"))
    folder = path.parent
    if path.exists():
        if not path.is_file():
            raise ConfigError(f"{where}: {str(path)!r} is not a file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(f"{where}: {str(path)!r} cannot be read and written by this user")
        with path.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
        if header and header != SQLITE_HEADER:
            raise ConfigError(f"{where}: {str(path)!r} is not a sqlite database; name a new file or an MLflow database")
    elif existing:
        raise ConfigError(f"{where}: no MLflow store at {str(path)!r}; pass the --tracking-uri the search was recorded in")
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{where}: {str(parent)!r} is not a directory")
            break
    if not folder.is_dir():
        raise ConfigError(f"{where}: the directory {str(folder)!r} does not exist")
    try:  # an unnamed file (O_TMPFILE): nothing is left in the directory, even if we are killed
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"{where}: cannot write in the directory {str(folder)!r} ({exc.strerror})") from None


def _check_server(uri: str, where: str, timeout_s: float) -> None:
    import requests

    try:
        status = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).status_code
    except requests.RequestException as exc:
        errno = re.search(r"\[Errno -?\d+\] ([^\"')]+)", str(exc))  # urllib3 nests the socket's error deep in its message
        reason = errno.group(1).strip() if errno else type(exc).__name__
        raise ConfigError(f"{where}: cannot reach the MLflow server within {timeout_s:g} s ({reason}); "
                          "start it (mlflow server ...) or pass another --tracking-uri") from None
    if status not in (200, 401, 403):  # an MLflow server answers its /health (which may sit behind a login)
        raise ConfigError(f"{where}: the server answers HTTP {status} at /health; it is not an MLflow tracking server")


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def _default_artifact_location(uri: str, experiment: str) -> str | None:
    """Keep a sqlite store's artifacts beside its database file, not in whatever directory we run from."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts" / experiment.replace("/", "_")).resolve().as_uri()
    return None


def _params(policy: Policy, groups: list[str]) -> list[Param]:
    """The policy as MLflow params: one ``ratio.<group>`` for every group (0.0 = kept whole), so
    that the runs table and parallel-coordinates view show every dimension."""
    items = {"policy.criterion": policy.criterion, "policy.granularity": policy.granularity, "policy.round_to": policy.round_to,
             "policy.quantization": policy.quantization, "policy.drop_blocks": ",".join(policy.drop_blocks) or "none"}
    items.update({f"ratio.{group}": repr(float(policy.ratios.get(group, 0.0))) for group in groups})
    items.update({f"finetune.{knob}": repr(value) if isinstance(value, float) else value for knob, value in policy.finetune.items()})
    return [Param(k, str(v)) for k, v in items.items()]


class SearchTracker:
    """Writes one search into MLflow.

    >>> tracker = SearchTracker("sqlite:////tmp/example.db")  # doctest: +SKIP
    >>> parent = tracker.start_search("demo", "quickstart", config_yaml="...", params={})  # doctest: +SKIP
    """

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        mlflow.set_tracking_uri(self.tracking_uri)
        self.client = MlflowClient(self.tracking_uri)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.group_names: list[str] = []  # every prunable group, for ratio.<group> params

    def start_search(self, experiment: str, run_name: str, *, config_yaml: str, params: Mapping[str, Any], space: list[dict] | None = None,
                     tags: Mapping[str, str] | None = None) -> str:
        """Create the search's parent run. It becomes a search (tag ``secateurs.kind``) only once its
        params, ``config.yaml`` and ``space.json`` are written: a driver killed halfway leaves a run
        that ``--resume`` and the readers do not take for a search, never one that cannot be resumed."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=_default_artifact_location(self.tracking_uri, experiment)
            )
        else:
            self.experiment_id = found.experiment_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
        self.parent_run_id = run.info.run_id
        self.client.log_batch(self.parent_run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.client.log_text(self.parent_run_id, config_yaml, "config.yaml")
        if space is not None:
            self.client.log_text(self.parent_run_id, json.dumps(space, indent=2), "space.json")
        self.client.set_tag(self.parent_run_id, KIND, "search")
        return self.parent_run_id

    def attach(self, parent_run_id: str) -> Any:
        """Continue recording into an existing search's parent run (for ``--resume``)."""
        try:
            run = self.client.get_run(parent_run_id)
        except mlflow.exceptions.MlflowException:
            raise LookupError(f"run id {parent_run_id!r} is not in the tracking store {self.tracking_uri}") from None
        kind = run.data.tags.get(KIND)
        if kind != "search":
            raise LookupError(f"run {parent_run_id} is a secateurs {kind or 'non-secateurs'} run, not a search; pass the parent run id of a search")
        self.experiment_id = run.info.experiment_id
        self.parent_run_id = parent_run_id
        return run

    def set_running(self) -> None:
        self.client.update_run(self.parent_run_id, status="RUNNING")

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.parent_run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def child_runs(self, *kinds: str) -> pd.DataFrame:
        """The search's child runs of the given kinds (``trial``, ``baseline``, ``dense``) in trial
        order, as :func:`search.records.child_runs` reads them."""
        return records.child_runs(self.tracking_uri, self.experiment_id, self.parent_run_id, *kinds)

    def trial_table(self) -> tuple[list[dict[str, Any]], int, set[str]]:
        """What MLflow holds of the search's trials: rows of the completed ones, the number that
        failed, and the Ray trial ids already recorded."""
        runs = self.child_runs("trial", "baseline")
        table, failed = records.trial_table(runs)
        seen = set(runs.get("tags.secateurs.ray_trial_id", pd.Series(dtype=object)).fillna(""))
        return table.drop(columns=["pareto_tag"], errors="ignore").to_dict("records"), failed, seen

    def policies(self, run_ids: list[str]) -> dict[str, Policy]:
        """The policies trial runs ran (their ``policy.json``)."""
        return records.read_policies(self.client, run_ids)

    def recorded_trials(self) -> list[dict[str, Any]]:
        """The trials MLflow holds, in trial order, as a resumed search needs them: each one's
        ``kind`` (``trial``/``baseline``), ``origin`` (the baseline or seed it evaluated, else None),
        ``sampled`` (the sampler's parameters, None if not recorded) and ``metrics`` (None: it failed)."""
        recorded = []
        for _, run in self.child_runs("trial", "baseline").iterrows():
            tags = records.row_values(run, "tags.")
            recorded.append({
                "kind": tags.get(KIND, "trial"),
                "origin": tags.get("secateurs.baseline") or tags.get("secateurs.seed"),
                "sampled": records.read_sampled(self.client, run["run_id"]),
                "metrics": {k: float(v) for k, v in records.row_values(run, "metrics.").items()} if run["status"] == "FINISHED" else None,
            })
        return recorded

    def remove_cut_off_runs(self) -> int:
        """Delete the child runs a killed driver left half written (status RUNNING): a trial's or the
        dense model's record is complete only once its run is terminated. Returns how many."""
        runs = self.child_runs("trial", "baseline", "dense")
        cut_off = list(runs.loc[runs["status"] == "RUNNING", "run_id"]) if len(runs) else []
        for run_id in cut_off:
            self.client.delete_run(run_id)
        return len(cut_off)

    def _child(self, run_name: str, kind: str, tags: Mapping[str, str] | None = None) -> str:
        if self.parent_run_id is None:
            raise RuntimeError("start_search() must be called before logging child runs")
        all_tags = {KIND: kind, PARENT: self.parent_run_id, **(tags or {})}
        return self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id

    def _log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def update_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 1) -> None:
        """Log newer values of a run's metrics (at ``step``, above the trial's 0); MLflow shows the latest."""
        self._log_metrics(run_id, metrics, step=step)

    def set_tags_on(self, run_ids: list[str], tags: Mapping[str, str]) -> None:
        for run_id in run_ids:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dense(self, metrics: Mapping[str, float], checkpoint: str) -> str:
        run_id = self._child("dense", "dense", {"secateurs.checkpoint": checkpoint})
        self._log_metrics(run_id, metrics)
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def log_trial(self, index: int, policy: Policy, metrics: Mapping[str, float], tags: Mapping[str, str] | None = None, kind: str = "trial",
                  sampled: Mapping[str, Any] | None = None) -> str:
        """One completed trial's run; ``sampled``: the parameters the sampler chose, kept (``sampled.json``)
        so that a resumed search can tell the sampler about this trial again."""
        run_id = self._child(f"{kind}-{index:04d}", kind, {"secateurs.trial": str(index), **(tags or {})})
        self.client.log_batch(run_id, params=_params(policy, self.group_names or sorted(policy.ratios)))
        self._log_metrics(run_id, metrics)
        self.client.log_text(run_id, policy.to_json(), POLICY)
        if sampled is not None:
            self.client.log_text(run_id, json.dumps(dict(sampled)), SAMPLED)
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def log_failed_trial(self, index: int, policy: Policy | None, error: str, tags: Mapping[str, str] | None = None, kind: str = "trial",
                         sampled: Mapping[str, Any] | None = None) -> str:
        summary = error.strip().splitlines()[-1][:500] if error.strip() else "unknown error"
        run_id = self._child(f"{kind}-{index:04d}", kind, {"secateurs.trial": str(index), "secateurs.error": summary, **(tags or {})})
        if policy is not None:
            self.client.log_batch(run_id, params=_params(policy, self.group_names or sorted(policy.ratios)))
            self.client.log_text(run_id, policy.to_json(), POLICY)
        if sampled is not None:
            self.client.log_text(run_id, json.dumps(dict(sampled)), SAMPLED)
        self.client.log_text(run_id, error or summary, "error.txt")
        self.client.set_terminated(run_id, "FAILED")
        return run_id

    def tag_pareto(self, flags: Mapping[str, bool]) -> None:
        for run_id, on_frontier in flags.items():
            self.client.set_tag(run_id, PARETO, "true" if on_frontier else "false")

    def log_search_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self._log_metrics(self.parent_run_id, metrics, step=step)

    def log_elapsed(self, seconds: float) -> None:
        """Record the wall seconds the search has taken so far, earlier sessions included (metric
        ``elapsed_s`` of the parent run; a resume starts counting from its latest value). Always at
        step 0, so that the latest value is the last one written (MLflow's latest is by step first)."""
        self._log_metrics(self.parent_run_id, {"elapsed_s": seconds}, step=0)

    def log_json(self, data: Any, name: str) -> None:
        self.client.log_text(self.parent_run_id, json.dumps(data, indent=2), name)

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.parent_run_id, str(path))

    def end_search(self, status: str = "FINISHED") -> None:
        if self.parent_run_id is not None:
            self.client.set_terminated(self.parent_run_id, status)

    def experiment_url(self) -> str:
        return f"#/experiments/{self.experiment_id}/runs/{self.parent_run_id}"
