"""The search's sensitivity step (``search.sensitivity``): every searched group pruned alone at a few
ratios and scored by :mod:`evaluators.sensitivity`'s cheap proxy, one Ray task per group (with a
trial's resources), before the first trial. The table and plot go to the parent run
(``sensitivity.csv``, ``sensitivity.png``); the search then

- starts from seed policies (MLflow tag ``secateurs.seed``, counted in ``num_trials``): for each of
  ``seed_drops``, every group at the ratio where its proxy drop reaches that value; for each of
  ``seed_latency``, a policy measured at about that fraction of the dense latency, from a greedy
  path that prunes where the proxy loses least per millisecond saved (each single-group model is
  then also timed, with the dense model, for the table's ``latency_ms``); for each of
  ``seed_macs`` (by default the bound of each ``macs <= X * dense`` constraint), the least pruned
  policy of a path that prunes where the proxy loses least per MAC saved whose MACs, counted on
  the pruned model, are at most that fraction of the dense model's;
- with ``narrow``, caps each group's range at the ratio where its proxy drop reaches ``narrow``.
"""
from __future__ import annotations

import dataclasses
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import ray

from evaluators import sensitivity
from evaluators.checkpoint import load_dense
from evaluators.pruning import effective_macs_and_params
from evaluators.tasks import Task, TaskConfig, make_task
from evaluators.trial import prune_model
from search.baselines import Baseline, snap, space_point
from search.config import Config
from search.constraints import Constraint
from search.tracking import SearchTracker
from spaces import Policy, Rule, SearchSpace


def _analyse_group(task: TaskConfig, checkpoint: bytes, template: Policy, ratios: dict[str, list[float]],
                   options: dict[str, Any], device: str) -> list[dict[str, Any]]:
    from evaluators.trial import MeasureConfig

    return sensitivity.analyse(make_task(task), checkpoint, template, ratios, device=MeasureConfig(device=device).resolve_device(), **options)


def _time_policies(task: TaskConfig, checkpoint: bytes, policies: dict[Any, Policy], measure: Any) -> dict[Any, dict[str, float]]:
    from evaluators.trial import measure_latencies

    return measure_latencies(policies, make_task(task), checkpoint, measure)


def _timed(config: Config, checkpoint_ref: Any, policies: dict[Any, Policy]) -> dict[Any, dict[str, float]]:
    """``policies`` timed together (round-robin) in one Ray task with a trial's resources, on the
    measure device, as trials are."""
    remote = ray.remote(num_cpus=config.search.cpus_per_trial, num_gpus=config.search.gpus_per_trial)(_time_policies)
    return ray.get(remote.remote(config.task, checkpoint_ref, policies, config.measure))


def _template(space: SearchSpace) -> Policy:
    return Policy(criterion=space.config.criteria[0], ratios={}, granularity=space.config.granularity[0],
                  round_to=space.config.round_to_choices[0], min_channels=space.config.min_channels,
                  group_min_channels=space.group_min_channels, seed=space.seed, nm_block=space.config.nm_block)


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
    template = _template(space)
    ratios = _ratios(space, settings.ratios)
    options = {"bn_batches": settings.bn_batches, "batch_size": config.finetune.batch_size, "samples": settings.samples}
    out(f"sensitivity: pruning each of {len(ratios)} groups alone at {sum(map(len, ratios.values()))} ratios in all")
    remote = ray.remote(num_cpus=config.search.cpus_per_trial, num_gpus=config.search.gpus_per_trial)(_analyse_group)
    checkpoint_ref = ray.put(checkpoint)
    futures = [remote.remote(config.task, checkpoint_ref, template, {g: r}, options, config.measure.device) for g, r in ratios.items()]
    rows = [row for part in ray.get(futures) for row in part]
    if settings.seed_latency and rows:
        timing_started = time.perf_counter()
        singles = {(r["group"], r["ratio"]): dataclasses.replace(template, ratios={r["group"]: r["ratio"]}) for r in rows}
        timed = _timed(config, checkpoint_ref, {"dense": template, **singles})
        for row in rows:
            row["latency_ms"] = timed[(row["group"], row["ratio"])]["latency_ms"]
            row["dense_latency_ms"] = timed["dense"]["latency_ms"]
        out(f"sensitivity: timed the dense model and the {len(singles)} single-group models together "
            f"({time.perf_counter() - timing_started:.1f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "sensitivity.csv"
        to_frame(rows).to_csv(csv_path, index=False)
        tracker.log_artifact(csv_path)
        if rows:
            tracker.log_artifact(plot(rows, Path(tmp) / "sensitivity.png", title="accuracy drop of each group pruned alone (no fine-tuning)"))
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
    highs = {}
    for d in space.dimensions(space.config.granularity[0]):
        if d.range is None or d.joint or d.members != (d.group,) or d.group not in safe:
            continue
        low, step = d.range.low, d.range.step
        high = max(low, low + math.floor((safe[d.group] - low) / step + 1e-9) * step if step else safe[d.group])
        high = round(min(high, d.range.high), 10)
        if high < d.range.high:
            highs[d.group] = high
    return narrowed_to(space, highs), highs


def narrowed_to(space: SearchSpace, highs: dict[str, float]) -> SearchSpace:
    """``space`` with the upper ratio of each group in ``highs`` lowered to its value (what
    :func:`narrowed` chose, as ``narrowed.json`` records it: a resumed search narrows again with it)."""
    if not highs:
        return space
    granularity = space.config.granularity[0]
    rules = [*space.config.rules, *(Rule(regex=re.escape(group), high=high, granularity=granularity) for group, high in highs.items())]
    return SearchSpace(dataclasses.replace(space.config, rules=rules), space.groups, seed=space.seed, blocks=space.blocks,
                       block_order=space.block_order)


def latency_seed_points(config: Config, space: SearchSpace, rows: list[dict[str, Any]], checkpoint: bytes,
                        tracker: SearchTracker, out: Callable[[str], None], points: int = 12) -> list[Baseline]:
    """Seeds at ``search.sensitivity.seed_latency`` fractions of the dense latency.

    :func:`evaluators.sensitivity.allocation_path` orders the moves by proxy drop per millisecond
    saved (from the table's single-group timings). Latency does not add up across groups (kernels
    favour some widths), so up to ``points`` policies spread along the path are timed together
    with the dense model, and each target takes the one measured closest to it. The path and its
    timings go to the parent run as ``sensitivity_path.csv``."""
    targets = config.search.sensitivity.seed_latency
    timed_rows = [r for r in rows if "latency_ms" in r]
    if not targets or not timed_rows:
        return []
    path = allocation_points(space, timed_rows, timed_rows[0]["dense_latency_ms"], "latency_ms")
    if not path:
        return []
    picks = sorted({round(i * (len(path) - 1) / max(points - 1, 1)) for i in range(points)})
    candidates: dict[int, dict[str, Any]] = {}
    for i in picks:
        if all(path[i] != c for c in candidates.values()):
            candidates[i] = path[i]
    timed = _timed(config, ray.put(checkpoint), {"dense": _template(space), **{i: space.policy(p) for i, p in candidates.items()}})
    dense = timed["dense"]["latency_ms"]
    fractions = {i: timed[i]["latency_ms"] / dense for i in candidates}
    seeds: list[Baseline] = []
    chosen: dict[int, list[float]] = {}
    for target in targets:
        i = min(fractions, key=lambda k: (abs(fractions[k] - target), k))
        chosen.setdefault(i, []).append(target)
        if all(candidates[i] != s.point for s in seeds):
            seeds.append(Baseline(f"sensitivity latency~{target:g}x dense", candidates[i], kind="seed"))
    table = pd.DataFrame([{"path_step": i + 1, "latency_ms": timed[i]["latency_ms"], "dense_latency_ms": dense,
                           "latency_fraction": fractions[i], "seed_for": " ".join(f"{t:g}" for t in chosen.get(i, [])),
                           **candidates[i]} for i in candidates])
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / "sensitivity_path.csv", index=False)
        tracker.log_artifact(Path(tmp) / "sensitivity_path.csv")
    out("sensitivity: latency seeds at " + ", ".join(f"{fractions[i]:.2f}x" for i in chosen) + " of the dense latency "
        f"(targets {', '.join(f'{t:g}' for t in targets)}; {len(candidates)} policies along the path timed)")
    return seeds


def allocation_points(space: SearchSpace, rows: list[dict[str, Any]], dense_cost: float, cost: str) -> list[dict[str, Any]]:
    """:func:`evaluators.sensitivity.allocation_path` over the space's groups of its first granularity
    (each from its range's low, on its range's step), every step as a point of the space."""
    granularity = space.config.granularity[0]
    sizes = {g.name: g.size for g in space.groups}
    bounds = {m: (d.range.low, d.range.high) for d in space.dimensions(granularity) if d.range is not None for m in d.members}
    low = {m: b[0] for m, b in bounds.items()}
    step = min((d.range.step for d in space.dimensions(granularity) if d.range is not None and d.range.step), default=0.05)
    return [space_point(space, granularity, {**low, **ratios}, space.config.criteria[0], sizes)
            for ratios in sensitivity.allocation_path(rows, dense_cost, bounds, step, cost=cost)]


def mac_targets(seed_macs: Sequence[float] | None, constraints: Sequence[Constraint]) -> list[float]:
    """The fractions of the dense MACs to seed at: ``search.sensitivity.seed_macs`` when given, else
    the bound of each ``macs <= X * dense`` constraint with X < 1 (a search held to a MAC budget
    starts from the sensitivity path's policy at it, as FastNAS would give).

    >>> mac_targets(None, [Constraint.parse("macs <= 0.5 * dense"), Constraint.parse("macs >= 0.4 * dense")])
    [0.5]
    >>> mac_targets([], [Constraint.parse("macs <= 0.5 * dense")])
    []
    """
    if seed_macs is not None:
        return list(seed_macs)
    return [c.value for c in constraints if c.metric == "macs" and c.op == "<=" and c.relative and 0 < c.value < 1]


def counted_cost(space: SearchSpace, point: Mapping[str, Any], task: Task, checkpoint: bytes, example: Any) -> tuple[int, int]:
    """The MACs and parameters of ``point``'s pruned model, counted as a trial counts them."""
    model, _ = prune_model(space.policy(point), task, checkpoint)
    return effective_macs_and_params(model.eval(), example)


def mac_seed_points(space: SearchSpace, rows: list[dict[str, Any]], targets: Sequence[float], task: Task, checkpoint: bytes,
                    out: Callable[[str], None]) -> list[Baseline]:
    """Seeds at ``targets`` fractions of the dense model's MACs (``search.sensitivity.seed_macs``), as
    ModelOpt's FastNAS takes a FLOPs target: along the greedy path that prunes where the proxy loses
    least per MAC saved (the table's single-group ``macs``), each target takes the least pruned
    policy whose MACs, counted on the pruned model, are at most that fraction (a binary search: MACs
    only fall along the path). A target no policy of the path reaches gives no seed, and says so."""
    if not targets or not rows:
        return []
    example = task.example()
    dense_macs = effective_macs_and_params(load_dense(task, checkpoint).eval(), example)[0]
    path = allocation_points(space, rows, dense_macs, "macs")
    counted: dict[int, float] = {}

    def fraction(i: int) -> float:
        if i not in counted:
            counted[i] = counted_cost(space, path[i], task, checkpoint, example)[0] / dense_macs
        return counted[i]

    seeds: list[Baseline] = []
    reached: list[str] = []
    for target in targets:
        if not path or fraction(len(path) - 1) > target:
            out(f"sensitivity: no MAC seed at {target:g}x the dense MACs: the most pruned policy of the path keeps "
                f"{fraction(len(path) - 1) if path else 1.0:.3f}x (prune further: more `ratios`, wider ranges)")
            continue
        first, last = 0, len(path) - 1
        while first < last:
            middle = (first + last) // 2
            first, last = (first, middle) if fraction(middle) <= target else (middle + 1, last)
        reached.append(f"{fraction(first):.3f}x (target {target:g})")
        if all(path[first] != s.point for s in seeds):
            seeds.append(Baseline(f"sensitivity macs<={target:g}x dense", path[first], kind="seed"))
    if reached:
        out(f"sensitivity: MAC seeds at {', '.join(reached)} of the dense MACs ({len(counted)} policies of the path counted)")
    return seeds


COUNTED = ("macs", "params")  # the metrics a policy's pruned model gives before any fine-tune or timing


def within_counted_constraints(seeds: Sequence[Baseline], space: SearchSpace, task: Task, checkpoint: bytes,
                               constraints: Sequence[Constraint], dense: Mapping[str, float],
                               out: Callable[[str], None]) -> list[Baseline]:
    """The ``seeds`` whose MACs and parameters, counted on their pruned models before any trial, meet
    the search's constraints on them (``macs <= 0.5 * dense``, judged against ``dense``, the
    reference the trials are judged against): a seed that breaks one would be fine-tuned and timed
    only to be found infeasible, so it is left out, with a line that says so. The other metrics
    (accuracy, latency, size) are known only once a trial ran."""
    counted = [c for c in constraints if c.metric in COUNTED]
    if not counted or not seeds:
        return list(seeds)
    example = task.example()
    kept: list[Baseline] = []
    for seed in seeds:
        cost = dict(zip(COUNTED, counted_cost(space, seed.point, task, checkpoint, example)))
        broken = [f"{c} ({c.metric} {cost[c.metric] / dense[c.metric]:.3f}x dense)"
                  for c in counted if c.violation(cost, dense) > 0]
        if broken:
            out(f"sensitivity: seed {seed.name!r} left out: its pruned model breaks {', '.join(broken)}")
        else:
            kept.append(seed)
    return kept


def to_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The rows as a table with the columns of :data:`evaluators.sensitivity.COLUMNS` first (then any others), for a CSV.

    >>> list(to_frame([]).columns) == list(sensitivity.COLUMNS)
    True
    """
    extra = list(dict.fromkeys(k for row in rows for k in row if k not in sensitivity.COLUMNS))
    return pd.DataFrame([dict(row) for row in rows], columns=[*sensitivity.COLUMNS, *extra])


def plot(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Write a PNG of accuracy drop against ratio, one line per group, the dense level at 0.

    Parent folders are created. Returns the path.
    """
    frame = to_frame(rows)
    if frame.empty:
        raise ValueError("rows: nothing to plot (no rows)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    groups = list(dict.fromkeys(frame["group"]))
    many = len(groups) > 8
    fig, ax = plt.subplots(figsize=(9 if many else 7, 4.5))
    try:
        ax.axhline(0.0, color="black", linewidth=1, linestyle="--", label="dense")
        for group in groups:
            part = frame[frame["group"] == group].sort_values("ratio", kind="stable")
            ax.plot(part["ratio"].astype(float), part["accuracy_drop"].astype(float), marker="o", markersize=4,
                    linewidth=1.2, label=str(group))
        ax.set_xlabel("ratio (fraction of the group removed)")
        ax.set_ylabel("accuracy drop (dense - pruned)")
        ax.grid(True, alpha=0.3)
        if many:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="x-small", ncol=1 + len(groups) // 25)
        else:
            ax.legend(loc="upper left", fontsize="small")
        if title:
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(out, format="png", dpi=100)
    finally:
        plt.close(fig)
    return out
