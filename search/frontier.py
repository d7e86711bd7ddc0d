"""Pareto frontiers over trial results: dominance, hypervolume, knee point, table and plot.

Every function takes per-objective *senses* ("min" or "max"). Internally all
objectives are turned into minimisation by negating the "max" ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from search import fidelity
from search.objectives import COSTS, DEFAULT, Objectives

OBJECTIVES: dict[str, str] = DEFAULT.mapping
"""Default objectives (DataFrame columns) and their senses (a search's own: :mod:`search.objectives`)."""

SENSES: tuple[str, ...] = ("min", "max")

_PANELS: dict[str, str] = {"latency_ms": "latency (ms)", "size_mb": "size (MB)"}  # the x axes of the frontier plot


def _check_senses(senses: Sequence[str]) -> list[str]:
    if isinstance(senses, str):
        raise ValueError(f"senses must be a sequence of {list(SENSES)}, one per objective, but got the string {senses!r}")
    out = list(senses)
    for s in out:
        if s not in SENSES:
            raise ValueError(f"sense {s!r} is not valid; valid senses are {list(SENSES)}")
    return out


def _as_minimisation(values: np.ndarray | list, senses: Sequence[str]) -> np.ndarray:
    """Validate ``values``/``senses`` and return a float (n, k) array where smaller is better."""
    sense_list = _check_senses(senses)
    k = len(sense_list)
    if k == 0:
        raise ValueError("need at least one objective, but got senses=[]")
    try:
        arr = np.array(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"values must be numeric, but got {values!r}") from exc
    if arr.ndim == 1 and arr.size == 0:  # [] means no rows
        arr = arr.reshape(0, k)
    if arr.ndim != 2:
        raise ValueError(f"values must have shape (n, k), but got an array of shape {arr.shape}")
    if arr.shape[1] != k:
        raise ValueError(f"got {len(sense_list)} senses {sense_list!r} for values with {arr.shape[1]} objectives (shape {arr.shape})")
    flip = np.array([-1.0 if s == "max" else 1.0 for s in sense_list])
    return arr * flip


def _non_dominated_min(m: np.ndarray) -> np.ndarray:
    """Non-dominated mask for a minimisation array; NaN rows are excluded and never dominate."""
    n = m.shape[0]
    mask = np.zeros(n, dtype=bool)
    valid = ~np.isnan(m).any(axis=1)
    idx = np.flatnonzero(valid)
    v = m[valid]
    for pos, i in enumerate(idx):
        row = v[pos]
        dominates_row = (v <= row).all(axis=1) & (v < row).any(axis=1)
        mask[i] = not dominates_row.any()
    return mask


def non_dominated(values: np.ndarray | list, senses: Sequence[str]) -> np.ndarray:
    """Boolean mask, True for rows not dominated by any other row.

    A row dominates another if it is no worse in every objective and strictly
    better in at least one. Identical rows do not dominate each other. Rows
    containing NaN are never on the frontier and never dominate.

    >>> non_dominated([[1, 5], [2, 2], [3, 3], [5, 1]], ["min", "min"]).tolist()
    [True, True, False, True]
    >>> non_dominated([[0.9, 10], [0.8, 5], [0.7, 6]], ["max", "min"]).tolist()
    [True, True, False]
    """
    return _non_dominated_min(_as_minimisation(values, senses))


def _hv_min(points: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume of minimisation ``points`` (all strictly better than ``ref``) up to ``ref``."""
    m, k = points.shape
    if m == 0:
        return 0.0
    if k == 1:
        return float(ref[0] - points[:, 0].min())
    if k == 2:
        order = np.lexsort((points[:, 1], points[:, 0]))  # by x, then y
        x = points[order, 0]
        y = points[order, 1]
        best = np.minimum.accumulate(y)
        prev = np.concatenate(([ref[1]], best[:-1]))
        return float(np.sum((ref[0] - x) * np.maximum(prev - y, 0.0)))
    # Slice along the last objective: between consecutive levels the cross-section
    # is the (k-1)-dimensional hypervolume of every point at or below the level.
    order = np.argsort(points[:, -1], kind="stable")
    pts = points[order]
    z = pts[:, -1]
    upper = np.concatenate((z[1:], [ref[-1]]))
    total = 0.0
    for i in range(m):
        thickness = upper[i] - z[i]
        if thickness > 0:
            total += thickness * _hv_min(pts[: i + 1, :-1], ref[:-1])
    return float(total)


def hypervolume(values: np.ndarray | list, senses: Sequence[str], reference: Sequence[float]) -> float:
    """Volume dominated by the rows and bounded by ``reference`` (exact).

    "max" objectives are negated, for the rows and the reference alike. Rows that
    do not strictly beat the reference in every objective (and NaN rows)
    contribute nothing; with no contributing row the result is 0.0. Uses a sweep
    for two objectives and recursive slicing above that (fine up to k=4 and a
    few hundred rows).

    >>> hypervolume([[1, 2], [2, 1]], ["min", "min"], [3, 3])
    3.0
    >>> hypervolume([[0.5, 1.0]], ["max", "min"], [0.0, 2.0])
    0.5
    >>> hypervolume([[4, 4]], ["min", "min"], [3, 3])
    0.0
    """
    m = _as_minimisation(values, senses)
    k = m.shape[1]
    if isinstance(reference, str):
        raise ValueError(f"reference must be a sequence of {k} numbers, but got {reference!r}")
    try:
        ref = np.array(reference, dtype=float).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"reference must be numeric, but got {reference!r}") from exc
    if ref.shape[0] != k:
        raise ValueError(f"reference {list(reference)!r} has {ref.shape[0]} values but there are {k} objectives")
    if not np.isfinite(ref).all():
        raise ValueError(f"reference must be finite, but got {list(reference)!r}")
    ref = ref * np.array([-1.0 if s == "max" else 1.0 for s in senses])
    contributes = (m < ref).all(axis=1)  # NaN compares False, so NaN rows drop out
    pts = m[contributes]
    if pts.shape[0] == 0:
        return 0.0
    pts = np.unique(pts, axis=0)
    if pts.shape[1] > 2:  # pruning dominated points pays off only for the slicing recursion
        pts = pts[_non_dominated_min(pts)]
    return _hv_min(pts, ref)


def knee_point(values: np.ndarray | list, senses: Sequence[str]) -> int:
    """Index of the frontier row closest (Euclidean) to the ideal point.

    Only rows whose values are all finite are considered. Each objective is
    min-max normalised over the non-dominated rows (an objective with zero range
    counts as 0), so the ideal point is the origin. Ties go to the lowest index.

    >>> knee_point([[0, 1], [0.4, 0.4], [1, 0], [0.9, 0.9]], ["min", "min"])
    1
    >>> knee_point([[1.0, 10], [0.9, 2], [0.5, 1]], ["max", "min"])
    1
    """
    m = _as_minimisation(values, senses)
    finite = np.isfinite(m).all(axis=1)
    if not finite.any():
        raise ValueError(f"knee_point needs at least one row with all-finite values, but got {m.shape[0]} row(s) and none is finite")
    idx = np.flatnonzero(finite)
    sub = m[finite]
    front_local = np.flatnonzero(_non_dominated_min(sub))
    front = sub[front_local]
    lo = front.min(axis=0)
    span = front.max(axis=0) - lo
    safe = np.where(span > 0, span, 1.0)
    norm = np.where(span > 0, (front - lo) / safe, 0.0)
    dist = np.sqrt((norm**2).sum(axis=1))
    return int(idx[front_local[int(np.argmin(dist))]])


def _check_objectives(objectives: dict[str, str]) -> None:
    if not isinstance(objectives, dict) or not objectives:
        raise ValueError(f"objectives must be a non-empty dict of column -> sense, but got {objectives!r}")
    _check_senses(list(objectives.values()))


def frontier_table(df: pd.DataFrame, objectives: dict[str, str] = OBJECTIVES) -> pd.DataFrame:
    """Copy of ``df`` with a boolean ``pareto`` column (non-dominated among its rows).

    >>> df = pd.DataFrame({"accuracy": [0.9, 0.8, 0.7], "latency_ms": [10.0, 5.0, 6.0], "size_mb": [4.0, 4.0, 4.0]})
    >>> frontier_table(df)["pareto"].tolist()
    [True, True, False]
    """
    _check_objectives(objectives)
    missing = [c for c in objectives if c not in df.columns]
    if missing:
        raise ValueError(f"objective column(s) {missing!r} missing; columns present: {list(df.columns)!r}")
    cols = list(objectives)
    try:
        values = df[cols].to_numpy(dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"objective columns {cols!r} must be numeric, but got dtypes {df[cols].dtypes.astype(str).to_dict()!r}") from exc
    out = df.copy()
    out["pareto"] = non_dominated(values.reshape(len(df), len(cols)), list(objectives.values()))
    return out


# Hypervolume is computed on (accuracy, latency / dense latency, size / dense size) against the
# dense model's (0, 1, 1): the share of the "better than dense" box that the frontier covers.
HV_REFERENCE = (0.0, 1.0, 1.0)


def dominated(point: Sequence[float], others: Sequence[Sequence[float]], senses: Sequence[str]) -> bool:
    """True if some row of ``others`` is at least as good as ``point`` on every objective and better on one.

    >>> dominated((0.8, 2.0, 1.0), [(0.9, 1.5, 1.0)], ["max", "min", "min"]), dominated((0.8, 2.0), [(0.9, 2.5)], ["max", "min"])
    (True, False)
    """
    if not len(others):
        return False
    p, o = _as_minimisation([point], senses)[0], _as_minimisation(others, senses)
    return bool(np.any(np.all(o <= p, axis=1) & np.any(o < p, axis=1)))


def feasible_mask(table: pd.DataFrame) -> pd.Series:
    """True for rows that may be on the frontier: they meet every constraint (rows without a
    ``feasible`` metric do) and were fine-tuned (not screened out: ``fidelity`` 0)."""
    mask = pd.Series(True, index=table.index)
    if "feasible" in table:
        mask &= table["feasible"].fillna(1.0) > 0
    if "fidelity" in table:
        mask &= table["fidelity"].fillna(1.0) > 0
    return mask


def feasible_frontier(table: pd.DataFrame, objectives: dict[str, str] = OBJECTIVES, caution: float = 1.0) -> pd.Series:
    """True for the rows on the frontier of the feasible rows (:func:`feasible_mask`) of one search,
    its scores compared at one fidelity when ``search.refine`` fine-tuned some rows longer, an
    estimate held back by ``caution`` times its error (:func:`search.fidelity.ranked`)."""
    on_front = pd.Series(False, index=table.index)
    feasible = feasible_mask(table)
    if feasible.any():
        scores = [name for name in objectives if name not in COSTS]
        ranked = fidelity.ranked(table[feasible], {name: objectives[name] for name in scores}, caution)
        on_front[feasible] = frontier_table(ranked, objectives)["pareto"].to_numpy()
    return on_front


def normalised_hypervolume(rows: pd.DataFrame, dense: Mapping[str, float], objectives: Objectives | None = None) -> float:
    """Hypervolume of ``rows`` over ``objectives`` (default accuracy, latency_ms, size_mb), each
    normalised as :meth:`search.objectives.Objectives.normalised` says: for the default, (accuracy,
    latency / dense, size / dense) against :data:`HV_REFERENCE`."""
    if rows.empty:
        return 0.0
    objectives = objectives or DEFAULT
    values, reference = objectives.normalised(rows, dense)
    return hypervolume(values, objectives.senses, reference)


def common_box_hypervolumes(tables: list[pd.DataFrame], objectives: dict[str, str] = OBJECTIVES) -> list[float]:
    """Hypervolume of each table's rows, all normalised to the same box: each objective scaled
    to [0, 1] over the rows of every table (0 = best), reference point 1.1 in each."""
    cols, senses = list(objectives), list(objectives.values())
    nonempty = [t for t in tables if len(t)]
    if not nonempty:
        return [0.0 for _ in tables]
    union = _as_minimisation(pd.concat([t[cols] for t in nonempty]).to_numpy(dtype=float), senses)
    lo, hi = union.min(axis=0), union.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return [hypervolume((_as_minimisation(t[cols].to_numpy(dtype=float), senses) - lo) / span, ["min"] * len(cols), [1.1] * len(cols))
            if len(t) else 0.0 for t in tables]


def plot_frontier(df: pd.DataFrame, path: str | Path, *, dense: dict | None = None, title: str = "",
                  objectives: Objectives | None = None) -> Path:
    """Write a PNG: the first score of ``objectives`` (default accuracy) against latency_ms and
    against size_mb, frontier highlighted.

    All rows are drawn in light grey; rows with ``pareto == True`` are coloured
    and joined by a step line sorted by x. If ``df`` has no ``pareto`` column it
    is computed with :func:`frontier_table` over the objectives. ``dense``
    (with the same columns) is marked with a star labelled "dense".
    Parent folders are created. Returns the path.

    >>> import tempfile
    >>> df = pd.DataFrame({"accuracy": [0.9, 0.8], "latency_ms": [10.0, 5.0], "size_mb": [4.0, 3.0]})
    >>> with tempfile.TemporaryDirectory() as d:
    ...     out = plot_frontier(df, Path(d) / "f.png", dense={"accuracy": 0.95, "latency_ms": 20.0, "size_mb": 8.0})
    ...     out.read_bytes()[:4] == b"\\x89PNG"
    True
    """
    objectives = objectives or DEFAULT
    score = objectives.primary
    columns = [score, *_PANELS]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"plot_frontier needs column(s) {missing!r}; columns present: {list(df.columns)!r}")
    if dense is not None:
        if not isinstance(dense, dict):
            raise ValueError(f"dense must be a dict with keys {columns!r}, but got {dense!r}")
        dmissing = [c for c in columns if c not in dense]
        if dmissing:
            raise ValueError(f"dense is missing key(s) {dmissing!r}; it has {sorted(dense)!r}")
    if "pareto" not in df.columns:
        df = frontier_table(df, objectives.mapping)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    y = pd.to_numeric(df[score], errors="coerce").to_numpy(dtype=float)
    on_front = df["pareto"].eq(True).to_numpy(dtype=bool)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    try:
        for ax, (col, label) in zip(axes, _PANELS.items()):
            x = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
            ax.scatter(x, y, s=18, color="lightgrey", label=f"trials ({len(df)})", zorder=1)
            if on_front.any():
                fx, fy = x[on_front], y[on_front]
                order = np.argsort(fx, kind="stable")
                ax.step(fx[order], fy[order], where="post", color="tab:blue", linewidth=1.2, zorder=2)
                ax.scatter(fx, fy, s=28, color="tab:blue", label=f"pareto ({int(on_front.sum())})", zorder=3)
            if dense is not None:
                dx, dy = float(dense[col]), float(dense[score])
                ax.scatter([dx], [dy], marker="*", s=220, color="tab:red", edgecolors="black", label="dense", zorder=4)
                ax.annotate("dense", (dx, dy), textcoords="offset points", xytext=(6, 6))
            ax.set_xlabel(label)
            ax.set_ylabel(f"{score} ({'higher' if objectives.sense(score) == 'max' else 'lower'} is better)")
            ax.grid(True, alpha=0.3)
            ax.legend(loc="lower right" if objectives.sense(score) == "max" else "upper right", fontsize="small")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out, format="png", dpi=100)
    finally:
        plt.close(fig)
    return out
