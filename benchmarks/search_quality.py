"""Benchmark: does the search beat hand-made policies at equal compute, on a converged model?

ResNet-20 on the CIFAR-10 subset, trained until it stops improving (``benchmarks/dense_cifar10.py``;
``configs/cifar10_resnet20_converged.yaml``: all 10,000 training images with augmentation, scored on
all 2,000 test images). Every method gets the same budget: the whole 2-core machine for
``--budget-s`` seconds of wall time (``search.time_budget_s``, which bounds the whole command: the
dense reference, sensitivity, screening, timing, fine-tunes, refinement and the final re-timing),
with two trials at a time on one torch thread each. Methods:

- ``uniform_fine``: the uniform sweep spending its budget on more levels (every 0.025 of the range,
  coarse to fine, until the budget is spent);
- ``uniform_long``: the uniform sweep spending it on longer fine-tunes (14 levels, ``--long-epochs``
  per policy); the better of the two is "the best baseline" of each seed;
- ``secateurs``: the search (TPE after sensitivity seeds, screening, the channel rounding searched,
  the frontier's 4 candidates refined in 0.4 of the budget: ``search.refine.share``) under the same
  budget;
- ``secateurs_2x``: the same search with twice the budget (does more budget buy a better pick?);
- ``secateurs_2x_halving`` (only with ``--methods``): ``secateurs_2x`` whose refinement is a
  successive halving (``search.refine.rungs: 2``: twice the candidates at half the epochs, the better
  half of them, on the objectives, at the full epochs), in the same share of the budget.

Per method and seed: the hypervolume of the final (re-timed) frontier over (accuracy, latency /
dense, size / dense), the curve of the in-search hypervolume against the seconds spent, and the best
accuracy at >= 2x lower measured latency. Then what a user ends up with: the search's best policy at
>= 2x lower latency and the best baseline policy at the same latency (within 5%; if there is none,
the best one at least about as fast: ``matched_baseline``) are each fine-tuned
for ``--final-epochs`` with the same recipe (``secateurs pick --finetune-epochs``), and both scored.
Seeds run one after another, the methods of a seed back to back (so machine noise spreads over all).

    SECATEURS_DATA=../shared/data python benchmarks/search_quality.py [--budget-s 200] [--seeds 0 1 2 3 4]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from search.choose import Constraints, NoFeasiblePolicyError, choose
from search.config import load_config
from search.driver import run_search
from search.frontier import feasible_mask, normalised_hypervolume
from search.pick import pick

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cifar10_resnet20_converged.yaml"
# The search's settings. Changed on 2026-11-30 after one seed at a 300 s budget, whose timeline (on a
# quiet machine) showed the default sensitivity step (3 ratios, 1,000 images: 60 s) and refining 4
# candidates for 2 epochs (127 s) leaving the sampler one policy: one ratio on 500 images, 1 epoch.
# Changed again on 2026-11-30 after the 5-seed run at 200 s (the search's refined candidates had 1
# epoch from the dense model where uniform_long's policies had 1.5, and a 2x budget bought no longer
# refinement): the refinement gets 0.4 of the budget, its epochs as many as fit (search.refine.share).
SEARCH = ["search.sampler=tpe", "search.num_trials=1000", "search.sensitivity={ratios: [0.5], samples: 500}",
          "search.screening={warmup: 4}", "space.round_to=[1, 8]", "search.refine={epochs: 1, candidates: 4, share: 0.4}"]
# Successive halving in the same share (added 2026-11-30, after the 5-seed run whose 2x search refined
# none of the policies it ranked first at 2x lower latency): 4 candidates at half the epochs, the 2
# that hold up at the full epochs.
HALVING = "search.refine={epochs: 1, candidates: 2, share: 0.4, rungs: 2}"


def coarse_to_fine(levels: list[float]) -> list[float]:
    """``levels`` reordered so that any prefix covers the range as evenly as it can: the middle
    first, then the middles of the halves, and so on.

    >>> coarse_to_fine([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    [0.4, 0.2, 0.6, 0.1, 0.3, 0.5, 0.7]
    """
    order, spans = [], [(0, len(levels))]
    while spans:
        nxt = []
        for lo, hi in spans:
            if lo >= hi:
                continue
            mid = (lo + hi) // 2
            order.append(levels[mid])
            nxt += [(lo, mid), (mid + 1, hi)]
        spans = nxt
    return order


def methods(high: float, budget: float, long_epochs: float) -> dict[str, list[str]]:
    fine = coarse_to_fine([round(float(x), 4) for x in np.arange(0.025, high + 1e-9, 0.025)])
    coarse = coarse_to_fine([round(float(x), 4) for x in np.arange(0.05, high + 1e-9, 0.05)])
    sweep = ["search.num_trials=0", "search.baselines=[uniform]"]
    return {
        "uniform_fine": [*sweep, "space.ratio.step=0.025", f"search.baseline_ratios={fine}", f"search.time_budget_s={budget}"],
        "uniform_long": [*sweep, f"search.baseline_ratios={coarse}", f"finetune.epochs={long_epochs}", f"search.time_budget_s={budget}"],
        "secateurs": [*SEARCH, f"search.time_budget_s={budget}"],
        "secateurs_2x": [*SEARCH, f"search.time_budget_s={2 * budget}"],
        "secateurs_2x_halving": [*SEARCH, HALVING, f"search.time_budget_s={2 * budget}"],
    }


DEFAULT_METHODS = ["uniform_fine", "uniform_long", "secateurs", "secateurs_2x"]


def curve(client: MlflowClient, run_id: str, started: float) -> list[tuple[float, float]]:
    """(seconds since the command started, hypervolume) after each trial, from the parent run's
    hypervolume history (each value logged when its trial was recorded)."""
    return sorted((m.timestamp / 1000.0 - started, m.value) for m in client.get_metric_history(run_id, "hypervolume"))


def at_half_latency(front: pd.DataFrame, dense: dict) -> pd.Series | None:
    """The policy of ``front`` with the best measured accuracy at >= 2x lower measured latency than dense."""
    fast = front[front["latency_ms"] <= dense["latency_ms"] / 2]
    return fast.sort_values("accuracy", ascending=False).iloc[0] if len(fast) else None


def pick_at_half_latency(front: pd.DataFrame, dense: dict) -> pd.Series | None:
    """What ``secateurs pick --max-latency-ms <dense / 2> --prefer accuracy`` chooses: the accuracies
    compared at one fidelity when the search refined some policies (:mod:`search.fidelity`)."""
    try:
        return choose(front, Constraints(max_latency_ms=dense["latency_ms"] / 2), "accuracy") if len(front) else None
    except NoFeasiblePolicyError:
        return None


def one(method: str, overrides: list[str], seed: int, tmp: Path, config_path: Path = CONFIG, log_dir: Path | None = None) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    config = load_config(str(config_path), [*overrides, f"search.seed={seed}", f"search.storage_path={tmp / 'ray'}",
                                       f"tracking.experiment=quality-{method}"])
    started, epoch = time.perf_counter(), time.time()
    log = str(log_dir / f"{method}-s{seed}.log") if log_dir is not None else None

    def out(line: str) -> None:  # the search's output, each line stamped with the seconds since the command started
        if log is not None:  # opened per line: the function travels to Ray with the recorder, a file object cannot
            with open(log, "a") as f:
                f.write(f"{time.perf_counter() - started:8.1f} {line}\n")

    result = run_search(config, config_name=f"{method}-s{seed}", tracking_uri=uri, out=out)
    wall = time.perf_counter() - started
    client = MlflowClient(uri)
    trials, dense = result.trials, result.dense
    full = trials[feasible_mask(trials)]
    front = result.frontier
    best_row, pick_row = at_half_latency(front, dense), pick_at_half_latency(front, dense)
    work = float(sum(trials[c].sum() for c in ("time_prune_s", "time_finetune_s", "time_measure_s") if c in trials))
    return {
        "method": method, "seed": seed, "uri": uri, "run_id": result.parent_run_id,
        "trials": len(trials), "fine_tuned": len(full), "wall_s": wall, "in_trial_work_s": work,
        "budget_s": config.search.time_budget_s,
        "refine_epochs": client.get_run(result.parent_run_id).data.tags.get("secateurs.refine_epochs"),
        "dense_accuracy": dense["accuracy"], "dense_latency_ms": dense["latency_ms"],
        "hypervolume": normalised_hypervolume(front, dense) if len(front) else 0.0,
        "best_acc_2x_latency": None if best_row is None else float(best_row["accuracy"]),
        "pick_trial": None if pick_row is None else int(pick_row["trial"]),
        "pick_accuracy": None if pick_row is None else float(pick_row["accuracy"]),
        "pick_refined": None if pick_row is None else bool(pd.notna(pick_row.get("refine_epochs"))),
        "pick_refine_epochs": None if pick_row is None or pd.isna(pick_row.get("refine_epochs")) else float(pick_row["refine_epochs"]),
        "pick_accuracy_expected": None if pick_row is None else float(pick_row.get("accuracy_expected", pick_row["accuracy"])),
        "pick_latency_ms": None if pick_row is None else float(pick_row["latency_ms"]),
        "refined": [{"trial": int(r["trial"]), "refine_epochs": float(r["refine_epochs"]),
                     "latency_vs_dense": float(r["latency_ms"]) / dense["latency_ms"]}
                    for _, r in trials.iterrows() if "refine_epochs" in trials and pd.notna(r["refine_epochs"])],
        "curve": curve(client, result.parent_run_id, epoch),
        "frontier": front[[c for c in ("trial", "accuracy", "latency_ms", "size_mb", "macs") if c in front]].to_dict("records"),
    }


def matched_baseline(row: dict, baselines: list[dict]) -> tuple[dict, dict, str] | None:
    """The best baseline policy (any baseline run of the seed) within 5% of ``row``'s pick latency,
    latencies taken relative to each run's own dense latency (runs minutes apart see different
    machine load; the ratio to the dense model timed in the same run is what carries over); if there
    is none, the best one at least about as fast (at most 5% slower). The third item says which.

    >>> pick = {"pick_latency_ms": 10.0, "dense_latency_ms": 40.0}
    >>> base = {"dense_latency_ms": 80.0, "frontier": [{"latency_ms": 20.5, "accuracy": 0.6}, {"latency_ms": 10.0, "accuracy": 0.7}]}
    >>> matched_baseline(pick, [base])[1]["latency_ms"], matched_baseline(pick, [base])[2]
    (20.5, 'within 5%')
    >>> base["frontier"] = [{"latency_ms": 16.0, "accuracy": 0.6}, {"latency_ms": 14.0, "accuracy": 0.55}, {"latency_ms": 30.0, "accuracy": 0.7}]
    >>> matched_baseline(pick, [base])[1]["latency_ms"], matched_baseline(pick, [base])[2]
    (16.0, 'as fast or faster')
    """
    target = row["pick_latency_ms"] / row["dense_latency_ms"]
    for how, near in (("within 5%", lambda x: abs(x - target) <= 0.05 * target), ("as fast or faster", lambda x: x <= 1.05 * target)):
        best = None
        for b in baselines:
            for f in b["frontier"]:
                if near(f["latency_ms"] / b["dense_latency_ms"]) and (best is None or f["accuracy"] > best[1]["accuracy"]):
                    best = (b, f, how)
        if best is not None:
            return best
    return None


def final_finetune(uri: str, run_id: str, trial: int, epochs: float) -> float:
    """The accuracy a user ends up with: the trial's policy rebuilt and fine-tuned ``epochs`` (secateurs pick)."""
    result = pick(run_id, trial=str(trial), finetune_epochs=epochs, tracking_uri=uri, log=lambda line: None)
    return float(result.final["accuracy"])


def final_entries(seed: int, seed_rows: list[dict], baselines: list[dict], epochs: float) -> list[dict]:
    """Each search's pick at >= 2x lower latency and its matched baseline policy, fine-tuned ``epochs``
    each with the same recipe: two at a time (one torch thread each, as the trials ran), each once."""
    entries, jobs = [], {}
    for row in seed_rows:
        if not row["method"].startswith("secateurs") or row["pick_trial"] is None:
            continue
        entry = {"seed": seed, "method": row["method"], "search_trial": row["pick_trial"], "search_latency_ms": row["pick_latency_ms"],
                 "search_latency_vs_dense": row["pick_latency_ms"] / row["dense_latency_ms"],
                 "search_in_search_accuracy": row["pick_accuracy"], "search_refined": row["pick_refined"],
                 "search_accuracy_expected": row["pick_accuracy_expected"]}
        jobs[(row["uri"], row["run_id"], row["pick_trial"])] = None
        matched = matched_baseline(row, baselines)
        if matched is not None:
            run, front_row, how = matched
            entry.update({"baseline_method": run["method"], "baseline_trial": int(front_row["trial"]), "baseline_match": how,
                          "baseline_latency_ms": front_row["latency_ms"],
                          "baseline_latency_vs_dense": front_row["latency_ms"] / run["dense_latency_ms"],
                          "baseline_in_search_accuracy": front_row["accuracy"]})
            jobs[(run["uri"], run["run_id"], int(front_row["trial"]))] = None
        entries.append((entry, row, matched))
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {key: pool.submit(final_finetune, *key, epochs) for key in jobs}
        done = {key: future.result() for key, future in futures.items()}
    out = []
    for entry, row, matched in entries:
        entry["search_final_accuracy"] = done[(row["uri"], row["run_id"], row["pick_trial"])]
        if matched is not None:
            run, front_row, _ = matched
            entry["baseline_final_accuracy"] = done[(run["uri"], run["run_id"], int(front_row["trial"]))]
        out.append(entry)
    return out


def stats(values: list[float]) -> dict | None:
    values = [float(v) for v in values if v is not None and v == v]  # a method with no policy at 2x: None, or NaN from pandas
    if not values:
        return None
    return {"mean": statistics.mean(values), "median": statistics.median(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = {"uniform_fine": "tab:gray", "uniform_long": "tab:brown", "secateurs": "tab:blue", "secateurs_2x": "tab:cyan",
              "secateurs_2x_halving": "tab:purple"}
    for method in colors:
        runs = [r for r in rows if r["method"] == method and r["curve"]]
        if not runs:
            continue
        grid = np.linspace(0, max(r["curve"][-1][0] for r in runs), 60)
        # the best hypervolume reached by each time, per seed (a step function), then the median over seeds
        per_seed = [np.interp(grid, *zip(*[(0.0, 0.0), *[(t, max(h for _, h in r["curve"][: i + 1])) for i, (t, _) in enumerate(r["curve"])]]))
                    for r in runs]
        ax.plot(grid, np.median(per_seed, axis=0), color=colors[method], label=f"{method} (median of {len(runs)} seeds)")
        ax.fill_between(grid, np.min(per_seed, axis=0), np.max(per_seed, axis=0), color=colors[method], alpha=0.15)
    ax.set_xlabel("wall seconds spent (2 cores, 2 trials at a time)")
    ax.set_ylabel("hypervolume (in-search timings)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title("hypervolume against compute spent (band: min-max over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-s", type=float, default=200.0, help="wall seconds per method and seed (the 2x search gets twice)")
    parser.add_argument("--long-epochs", type=float, default=1.5, help="fine-tune epochs of uniform_long's policies")
    parser.add_argument("--final-epochs", type=float, default=2.0, help="the real fine-tune of the picked policies")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--config", type=Path, default=CONFIG, help="another config, e.g. configs/quickstart.yaml for a smoke run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "search_quality_equal_compute.json"))
    parser.add_argument("--summarize", action="store_true", help="only recompute the summary and plot of --out")
    parser.add_argument("--log-dir", type=Path, default=None, help="write each search's output here, stamped with seconds")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "search_quality_hv_vs_compute.png"))
    args = parser.parse_args()
    if args.summarize:
        summarize(Path(args.out), Path(args.plot))
        return
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    config_path = args.config.resolve()
    high = load_config(str(config_path)).space.ratio.high
    chosen = {k: v for k, v in methods(high, args.budget_s, args.long_epochs).items() if k in (args.methods or DEFAULT_METHODS)}
    rows: list[dict] = []
    finals: list[dict] = []
    started = time.time()

    def save() -> None:
        Path(args.out).write_text(json.dumps({
            "config": str(config_path.relative_to(ROOT)), "budget_s": args.budget_s, "long_epochs": args.long_epochs,
            "final_epochs": args.final_epochs, "seeds": args.seeds, "date": time.strftime("%Y-%m-%d"),
            "total_wall_s": time.time() - started, "rows": rows, "finals": finals, "summary": summary(rows, finals),
        }, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            seed_rows = []
            for method, overrides in chosen.items():
                row = one(method, overrides, seed, Path(tmp) / f"{method}-{seed}", config_path, args.log_dir)
                rows.append(row)
                seed_rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("curve", "frontier")}), flush=True)
                save()
            baselines = [r for r in seed_rows if r["method"].startswith("uniform")]
            for entry in final_entries(seed, seed_rows, baselines, args.final_epochs):
                finals.append(entry)
                print(json.dumps(entry), flush=True)
            save()
    save()
    plot_curves(rows, Path(args.plot))
    print(json.dumps(summary(rows, finals), indent=2))


def summary(rows: list[dict], finals: list[dict]) -> dict:
    """Per method: statistics over seeds. Per seed: each search's hypervolume against the best
    baseline's (ratio - 1) and its best accuracy at >= 2x lower latency against the best baseline's
    (points); after the final fine-tune, the search's pick against its matched baseline policy, and
    the 2x search's pick against the 1x search's (does more budget buy a better final model?)."""
    table = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["method", "seed"])
    out: dict = {"methods": {}}
    for method, part in table.groupby("method", sort=False):
        out["methods"][method] = {key: stats(list(part[key])) for key in ("hypervolume", "best_acc_2x_latency", "wall_s", "fine_tuned", "trials")}
    by_seed: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["method"]] = r
    final = {(f["seed"], f["method"]): f for f in finals}
    gains = []
    for seed, runs in by_seed.items():
        baselines = [runs[m] for m in ("uniform_fine", "uniform_long") if m in runs]
        if not baselines:
            continue
        best_hv = max(b["hypervolume"] for b in baselines)
        accs = [b["best_acc_2x_latency"] for b in baselines if b["best_acc_2x_latency"] is not None]
        gain: dict = {"seed": seed}
        for method in runs:
            if not method.startswith("secateurs"):
                continue
            run = runs[method]
            gain[f"{method}_hv_vs_best_baseline"] = run["hypervolume"] / best_hv - 1 if best_hv else None
            gain[f"{method}_acc_2x_vs_best_baseline_points"] = (100 * (run["best_acc_2x_latency"] - max(accs))
                                                                 if accs and run["best_acc_2x_latency"] is not None else None)
            f = final.get((seed, method))
            if f is not None and f.get("baseline_final_accuracy") is not None:
                gain[f"{method}_final_vs_matched_baseline_points"] = 100 * (f["search_final_accuracy"] - f["baseline_final_accuracy"])
        if (seed, "secateurs") in final and (seed, "secateurs_2x") in final:
            gain["final_2x_vs_1x_points"] = 100 * (final[(seed, "secateurs_2x")]["search_final_accuracy"]
                                                   - final[(seed, "secateurs")]["search_final_accuracy"])
        if (seed, "secateurs_2x") in final and (seed, "secateurs_2x_halving") in final:
            gain["final_halving_vs_2x_points"] = 100 * (final[(seed, "secateurs_2x_halving")]["search_final_accuracy"]
                                                        - final[(seed, "secateurs_2x")]["search_final_accuracy"])
        gains.append(gain)
    out["per_seed"] = gains
    keys = sorted({k for g in gains for k in g if k != "seed"})
    out["per_seed_stats"] = {k: stats([g.get(k) for g in gains]) for k in keys}
    out["finals"] = {method: {key: stats([f.get(key) for f in finals if f["method"] == method])
                              for key in ("search_final_accuracy", "baseline_final_accuracy")} for method in {f["method"] for f in finals}}
    return out


def summarize(path: Path, plot: Path) -> None:
    """Recompute the summary and the plot of a results file (``--summarize``)."""
    data = json.loads(path.read_text())
    data["summary"] = summary(data["rows"], data["finals"])
    path.write_text(json.dumps(data, indent=2) + "\n")
    plot_curves(data["rows"], plot)
    print(json.dumps(data["summary"], indent=2))


if __name__ == "__main__":
    main()
