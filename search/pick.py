"""Read a finished search back from MLflow and choose one frontier policy under constraints.

A search is found by its parent run id (``secateurs.kind=search``); its trials, dense reference
and resolved config come from the runs and artifacts that :mod:`search.tracking` wrote.

>>> record = load_search("3241bd1d4aa04c958a6255df61a85320", "sqlite:///mlflow.db")  # doctest: +SKIP
>>> row = choose(record.frontier, Constraints(max_latency_ms=1.0), prefer="knee")  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from search import frontier
from search.config import Config, ConfigError, validate
from search import records
from search.records import KIND, PARENT, TRIAL_METRICS
from search.tracking import resolve_tracking_uri

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars around one small file

PREFERENCES = ("knee", "accuracy", "latency_ms", "size_mb")
"""How :func:`choose` breaks the tie among feasible frontier policies."""

TABLE_COLUMNS = ["trial", "kind", "criterion", "accuracy", "accuracy_drop", "latency_ms", "size_mb", "macs", "params", "run_id"]


class ProductionError(ValueError):
    """Bad input to frontier/compare/pick/export; the message is one line saying what and why."""


class NoFeasiblePolicyError(ProductionError):
    """No frontier policy satisfies the constraints; the message names the binding one."""


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


def _trial_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """The completed trials with every objective (failed ones have no metrics), in trial order."""
    table, _ = records.trial_table(runs)
    if not len(table):
        return table
    for metric in (*TRIAL_METRICS, "param_sparsity"):
        if metric not in table:
            table[metric] = math.nan
    table = table[table[list(frontier.OBJECTIVES)].notna().all(axis=1)].copy()
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
    dense_runs = records.child_runs(uri, experiment_id, run_id, "dense")
    if not len(dense_runs):
        raise ProductionError(f"search {run_id} has no dense run (tag {KIND}=dense): it was not recorded by secateurs search")
    dense_run = dense_runs.iloc[0]
    # Baselines (uniform policies the search evaluates first) compete for the frontier like trials.
    trials = _trial_rows(records.child_runs(uri, experiment_id, run_id, "trial", "baseline"))
    tagged = bool(len(trials)) and trials["pareto_tag"].notna().all()
    if len(trials):
        if tagged:
            trials["pareto"] = trials["pareto_tag"] == "true"
        else:  # only feasible trials (search.constraints) can be on the frontier
            trials["pareto"] = False
            feasible = trials["feasible"]
            trials.loc[feasible, "pareto"] = frontier.frontier_table(trials[feasible])["pareto"]
        trials = trials.drop(columns=["pareto_tag"])
    return SearchRecord(
        tracking_uri=uri,
        run_id=run_id,
        run_name=run.info.run_name or run_id[:8],
        experiment_id=experiment_id,
        status=run.info.status,
        config=config,
        dense={k: float(v) for k, v in records.row_values(dense_run, "metrics.").items()},
        checkpoint=records.row_values(dense_run, "tags.").get("secateurs.checkpoint", ""),
        trials=trials,
        pareto_from_tags=tagged,
    )


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


# --- constraints and preference -------------------------------------------------------------

# field -> (column, comparison, command-line flag)
_CONSTRAINTS: dict[str, tuple[str, str, str]] = {
    "min_accuracy": ("accuracy", ">=", "--min-accuracy"),
    "max_accuracy_drop": ("accuracy_drop", "<=", "--max-accuracy-drop"),
    "max_latency_ms": ("latency_ms", "<=", "--max-latency-ms"),
    "max_size_mb": ("size_mb", "<=", "--max-size-mb"),
}


@dataclasses.dataclass(frozen=True)
class Constraints:
    """Bounds a chosen policy must meet (None = no bound), checked on the metrics the search recorded.

    >>> Constraints(min_accuracy=0.98, max_latency_ms=1.0).describe()
    '--min-accuracy 0.98 and --max-latency-ms 1'
    """

    min_accuracy: float | None = None
    max_accuracy_drop: float | None = None
    max_latency_ms: float | None = None
    max_size_mb: float | None = None

    def __post_init__(self) -> None:
        for name, (_, _, flag) in _CONSTRAINTS.items():
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ProductionError(f"{flag} must be a finite number, but got {value}")
        if self.min_accuracy is not None and not 0.0 <= self.min_accuracy <= 1.0:
            raise ProductionError(f"--min-accuracy must be in [0, 1], but got {self.min_accuracy}")
        for name in ("max_latency_ms", "max_size_mb"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ProductionError(f"{_CONSTRAINTS[name][2]} must be > 0, but got {value}")

    def active(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in _CONSTRAINTS if getattr(self, name) is not None}

    def describe(self) -> str:
        return " and ".join(f"{_CONSTRAINTS[n][2]} {v:g}" for n, v in self.active().items()) or "no constraints"

    def satisfied_by(self, table: pd.DataFrame) -> pd.Series:
        """Boolean mask of rows meeting every bound."""
        mask = pd.Series(True, index=table.index)
        for name in self.active():
            mask &= self._mask(name, table)
        return mask

    def _mask(self, name: str, table: pd.DataFrame) -> pd.Series:
        column, op, _ = _CONSTRAINTS[name]
        bound = getattr(self, name)
        return table[column] >= bound if op == ">=" else table[column] <= bound

    def violations(self, metrics: dict[str, float]) -> list[str]:
        """The bounds ``metrics`` misses, as ``--flag bound (got value)``."""
        out = []
        for name, bound in self.active().items():
            column, op, flag = _CONSTRAINTS[name]
            value = metrics[column]
            if (value < bound) if op == ">=" else (value > bound):
                out.append(f"{flag} {bound:g} (got {value:.4g})")
        return out


def _infeasible_message(table: pd.DataFrame, constraints: Constraints, what: str) -> str:
    total = len(table)
    active = constraints.active()
    parts, binding = [], []
    for name in active:
        column, op, flag = _CONSTRAINTS[name]
        ruled_out = int((~constraints._mask(name, table)).sum())
        best = table[column].max() if op == ">=" else table[column].min()
        best_word = "best" if column == "accuracy" else "lowest"
        parts.append(f"{flag} {active[name]:g} alone rules out {ruled_out} of {total} (the {best_word} {column} is {best:.4g})")
        if ruled_out == total:
            binding.append(flag)
    if binding:
        verdict = f"binding: {', '.join(binding)} (rules out every policy alone)"
    else:
        relax = []
        for name in active:
            others = Constraints(**{n: v for n, v in active.items() if n != name})
            left = int(others.satisfied_by(table).sum())
            if left:
                relax.append(f"{_CONSTRAINTS[name][2]} ({left} left without it)")
        verdict = (f"binding together; relaxing one of {', '.join(relax)} would do" if relax
                   else "binding together: no single constraint can be relaxed alone to leave a policy")
    return f"no {what} satisfies {constraints.describe()}: {'; '.join(parts)}; {verdict}"


def choose(table: pd.DataFrame, constraints: Constraints = Constraints(), prefer: str = "knee", *, what: str = "frontier policy") -> pd.Series:
    """The row of ``table`` (frontier trials) that meets ``constraints`` and is best by ``prefer``.

    ``knee`` takes :func:`search.frontier.knee_point` of the feasible rows; ``accuracy`` the most
    accurate (ties: faster, then smaller); ``latency_ms``/``size_mb`` the lowest (ties: more
    accurate). Restricting to the frontier loses nothing: the bounds are monotone in the
    objectives, so whatever dominates a feasible trial is feasible too.
    Raises :class:`NoFeasiblePolicyError` naming the binding constraint.
    """
    if prefer not in PREFERENCES:
        raise ProductionError(f"--prefer: unknown preference {prefer!r}; valid: {', '.join(PREFERENCES)}")
    if not len(table):
        raise NoFeasiblePolicyError("the frontier is empty: the search completed no trial")
    feasible = table[constraints.satisfied_by(table)]
    if not len(feasible):
        raise NoFeasiblePolicyError(_infeasible_message(table, constraints, what))
    if prefer == "knee":
        values = feasible[list(frontier.OBJECTIVES)].to_numpy(dtype=float)
        return feasible.iloc[frontier.knee_point(values, list(frontier.OBJECTIVES.values()))]
    order = {
        "accuracy": (["accuracy", "latency_ms", "size_mb"], [False, True, True]),
        "latency_ms": (["latency_ms", "accuracy", "size_mb"], [True, False, True]),
        "size_mb": (["size_mb", "accuracy", "latency_ms"], [True, False, True]),
    }[prefer]
    return feasible.sort_values(order[0], ascending=order[1], kind="stable").iloc[0]


def find_trial(record: SearchRecord, trial: str) -> pd.Series:
    """A completed trial of ``record`` by number (``6``) or run id (or a unique prefix of it)."""
    table = record.trials
    if not len(table):
        raise ProductionError(f"search {record.run_id} has no completed trial")
    found = table[table["trial"] == int(trial)] if trial.isdigit() else table[table["run_id"].str.startswith(trial)]
    if len(found) != 1:
        numbers = ", ".join(str(t) for t in table["trial"])
        raise ProductionError(f"--trial {trial!r} matches {len(found)} completed trials of search {record.run_id}; "
                              f"completed trials: {numbers}")
    return found.iloc[0]


def common_box_hypervolumes(tables: list[pd.DataFrame]) -> list[float]:
    """Hypervolume of each table's rows, all normalised to the same box: each objective scaled
    to [0, 1] over the rows of every table (0 = best), reference point 1.1 in each."""
    cols, senses = list(frontier.OBJECTIVES), list(frontier.OBJECTIVES.values())
    nonempty = [t for t in tables if len(t)]
    if not nonempty:
        return [0.0 for _ in tables]
    union = pd.concat([t[cols] for t in nonempty]).to_numpy(dtype=float)
    flip = np.array([-1.0 if s == "max" else 1.0 for s in senses])
    lo, hi = (union * flip).min(axis=0), (union * flip).max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    out = []
    for table in tables:
        if not len(table):
            out.append(0.0)
            continue
        scaled = (table[cols].to_numpy(dtype=float) * flip - lo) / span
        out.append(frontier.hypervolume(scaled, ["min"] * len(cols), [1.1] * len(cols)))
    return out
