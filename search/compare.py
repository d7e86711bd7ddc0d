"""Reading searches back: ``secateurs frontier`` (a search's frontier as a table, CSV or JSON) and
``secateurs compare`` (several searches' frontiers side by side, with hypervolumes on one box)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from search import fidelity, frontier
from search.export import write_json
from search.objectives import DEFAULT, Objectives
from search.records import TABLE_COLUMNS, ProductionError, SearchRecord


def describe_search(record: SearchRecord) -> str:
    d = record.dense
    front = record.frontier
    note = "" if record.pareto_from_tags else " (computed now: the search has not tagged its frontier)"
    scores = "  ".join(f"{'acc' if q == 'accuracy' else q} {d.get(q, float('nan')):.4f}" for q in record.objectives.quality)
    return (f"search {record.run_name} ({record.run_id}), {record.status}, task {record.config.task.name}, "
            f"sampler {record.config.search.sampler}, objectives {record.objectives.describe()}\n"
            f"dense: {scores}  {d.get('latency_ms', float('nan')):.3f} ms  "
            f"{d.get('size_mb', float('nan')):.3f} MB  {int(d.get('macs', 0)):,} MACs\n"
            f"{len(record.trials)} trials completed, {len(front)} on the frontier{note}")


def export_columns(table: pd.DataFrame, objectives: Objectives | None = None) -> list[str]:
    extra = ["latency_p10_ms", "latency_p90_ms", "param_sparsity", "feasible"]
    ratios = sorted(c for c in table.columns if c.startswith("ratio."))
    scores = [c for q in (objectives or DEFAULT).quality for c in (q, f"{q}_change", f"{q}_in_search", f"{q}_expected")
              if c not in TABLE_COLUMNS]
    return list(dict.fromkeys(c for c in TABLE_COLUMNS[:3] + scores + TABLE_COLUMNS[3:] + extra + ["pareto"] + ratios if c in table.columns))


def write_frontier(record: SearchRecord, table: pd.DataFrame, *, csv: str | None = None, json_path: str | None = None) -> list[Path]:
    """Write ``table`` (frontier or all trials) as CSV (full run ids) and/or JSON (with the dense reference)."""
    written = []
    columns = export_columns(table, record.objectives)
    if csv:
        path = Path(csv).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        table[columns].to_csv(path, index=False)
        written.append(path)
    if json_path:
        path = Path(json_path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {
            "search_run_id": record.run_id, "run_name": record.run_name, "tracking_uri": record.tracking_uri,
            "task": record.config.task.name, "objectives": record.objectives.mapping, "dense": record.dense,
            "rows": json.loads(table[columns].to_json(orient="records", double_precision=15)),
        })
        written.append(path)
    return written


# --- compare --------------------------------------------------------------------------------

def compare_tables(records: list[SearchRecord]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A summary row per search and the union of their frontiers (``overall`` = non-dominated in the
    union). The searches must share their objectives. Scores are compared on one footing
    (:func:`on_one_footing`, the ``scores_at`` column): the summary's best score and hypervolume and ``overall`` use it; the union's
    score columns stay what was measured."""
    objectives = common_objectives(records)
    score = objectives.primary
    footing, fronts = on_one_footing(records)
    volumes = frontier.common_box_hypervolumes(fronts, objectives.mapping)
    summary = pd.DataFrame([{
        "search": r.label, "task": r.config.task.name, "sampler": r.config.search.sampler,
        "trials": len(r.trials), "frontier": len(f), "refined": int(fidelity.refined(r.trials).sum()),
        f"best_{score}": (f[score].max() if objectives.sense(score) == "max" else f[score].min()) if len(f) else float("nan"),
        "min_latency_ms": f["latency_ms"].min() if len(f) else float("nan"),
        "min_size_mb": f["size_mb"].min() if len(f) else float("nan"),
        "hypervolume": hv, "run_id": r.run_id,
    } for r, f, hv in zip(records, fronts, volumes)])
    parts = [(r.frontier.assign(search=r.label, search_run_id=r.run_id), f) for r, f in zip(records, fronts) if len(f)]
    if not parts:
        return summary, pd.DataFrame(columns=["search", *TABLE_COLUMNS])
    combined = pd.concat([measured for measured, _ in parts], ignore_index=True).drop(columns=["pareto"], errors="ignore")
    ranked = pd.concat([f for _, f in parts], ignore_index=True)
    combined["overall"] = frontier.frontier_table(ranked, objectives.mapping)["pareto"].to_numpy()
    return summary.assign(scores_at=footing), combined.sort_values("latency_ms", kind="stable").reset_index(drop=True)


def on_one_footing(records: list[SearchRecord]) -> tuple[str, list[pd.DataFrame]]:
    """Each search's frontier with its scores where the searches are compared: at the refinement's
    fidelity (:func:`search.fidelity.ranked`: each search's own estimate, its error aside) when every search refined
    some policies, else at the searches' own fine-tunes (:func:`search.fidelity.in_search`). A
    refined accuracy beside an unrefined one compares training lengths, not policies; the fine-tunes
    themselves must match for the comparison to be fair. Returns which footing, and the frontiers."""
    objectives = common_objectives(records)
    quality = objectives.quality
    if records and all(fidelity.refined(r.trials).any() for r in records):
        return "refined", [fidelity.ranked(r.frontier, {q: objectives.mapping[q] for q in quality}, caution=0.0) for r in records]
    return "search fine-tune", [fidelity.in_search(r.frontier, quality) for r in records]


def unlike_training(records: list[SearchRecord], footing: str) -> list[str]:
    """What differs in the training behind the scores :func:`compare_tables` compares, one line per
    difference (none: the searches trained alike): the fine-tune recipe, and on the ``refined``
    footing the refinement's epochs. A longer fine-tune lifts a frontier without a better policy.

    >>> from types import SimpleNamespace as NS
    >>> import pandas as pd
    >>> from evaluators.train import FinetuneConfig
    >>> def record(label, epochs, refined):
    ...     trials = pd.DataFrame({"refine_epochs": [refined, None]})
    ...     return NS(label=label, trials=trials, config=NS(finetune=FinetuneConfig(epochs=epochs)))
    >>> unlike_training([record("a", 0.5, 2.0), record("b", 0.5, 2.0)], "refined")
    []
    >>> unlike_training([record("a", 0.5, 2.0), record("b", 1.0, 1.2)], "refined")
    ['finetune.epochs: a 0.5, b 1', 'refinement epochs: a 2, b 1.2']
    """
    def shown(value) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    recipes = [dataclasses.asdict(r.config.finetune) for r in records]
    lines = [f"finetune.{field}: " + ", ".join(f"{r.label} {shown(recipe[field])}" for r, recipe in zip(records, recipes))
             for field in recipes[0] if len({repr(recipe[field]) for recipe in recipes}) > 1] if records else []
    if footing == "refined":
        epochs = [float(pd.to_numeric(r.trials.loc[fidelity.refined(r.trials), "refine_epochs"]).max()) for r in records]
        if len(set(epochs)) > 1:
            lines.append("refinement epochs: " + ", ".join(f"{r.label} {e:g}" for r, e in zip(records, epochs)))
    return lines


def common_objectives(records: list[SearchRecord]) -> Objectives:
    """The objectives every search of ``records`` shares; searches of different objectives are not compared."""
    objectives = records[0].objectives if records else DEFAULT
    other = next((r for r in records if r.objectives != objectives), None)
    if other is not None:
        raise ProductionError(f"search {other.label} optimised {other.objectives.describe()}, search {records[0].label} "
                              f"{objectives.describe()}: compare searches of the same objectives")
    return objectives


def plot_compare(records: list[SearchRecord], path: str | Path) -> Path:
    """The first score (e.g. accuracy) vs latency_ms and vs size_mb: each search's trials (faint),
    frontier points with the best score reached at each x (step line), and its dense model (star).
    The frontiers' scores are on the footing of :func:`on_one_footing`; the trials' as measured."""
    objectives = common_objectives(records)
    footing, fronts = on_one_footing(records)
    score = objectives.primary
    best = np.maximum.accumulate if objectives.sense(score) == "max" else np.minimum.accumulate
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    try:
        for ax, (column, label) in zip(axes, (("latency_ms", "latency (ms)"), ("size_mb", "size (MB)"))):
            for i, (record, front) in enumerate(zip(records, fronts)):
                color = colors[i % len(colors)]
                if len(record.trials):
                    ax.scatter(record.trials[column], record.trials[score], s=12, color=color, alpha=0.2, zorder=1)
                front = front.sort_values(column, kind="stable")
                if len(front):
                    best_so_far = best(front[score].to_numpy(dtype=float))  # 2-D staircase
                    ax.step(front[column], best_so_far, where="post", color=color, linewidth=1.2, zorder=2)
                    ax.scatter(front[column], front[score], s=28, color=color, zorder=3,
                               label=f"{record.label}: {len(front)} on frontier")
                if column in record.dense and score in record.dense:
                    ax.scatter([record.dense[column]], [record.dense[score]], marker="*", s=180, color=color,
                               edgecolors="black", zorder=4)
            ax.set_xlabel(label)
            ax.set_ylabel(score if footing == "search fine-tune" else f"{score} (frontiers: after the refinement)")
            ax.grid(True, alpha=0.3)
            ax.legend(loc="lower right" if objectives.sense(score) == "max" else "upper right", fontsize="small")
        fig.suptitle("frontiers compared (stars: dense models)")
        fig.tight_layout()
        fig.savefig(out, format="png", dpi=100)
    finally:
        plt.close(fig)
    return out


