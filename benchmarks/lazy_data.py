"""Benchmark: a search on data read lazily from files against the same data in memory, side by side.

The in-memory task is the built-in ``digits`` (tensors sliced into batches). The lazy one is the
same split written to ``.npy`` files and read by a ``torch.utils.data.Dataset`` one example at a
time (memory-mapped) through a ``DataLoader`` with default collation, as a user's task would be
(:func:`make_lazy_digits`, loaded by the Ray workers as ``benchmarks.lazy_data:make_lazy_digits``).
Same model, loss, evaluation, policies and seeds. Both dense models are trained first (not
timed); then the searches alternate (in memory, lazy, in memory, lazy, ...) so that both see the
same machine. Per search: fit wall time and the median in-trial work (prune + fine-tune +
measure); the ratio lazy / in memory of each. Digits is the worst case for loading: the model is
tiny, so reading dominates a trial. Writes benchmarks/results/lazy_data.json.

    PYTHONPATH=. python benchmarks/lazy_data.py [--trials 12] [--repeats 2] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


class DigitsFiles(torch.utils.data.Dataset):
    """One example at a time from memory-mapped ``.npy`` files."""

    def __init__(self, folder: Path, split: str) -> None:
        self.x = np.load(folder / f"{split}_x.npy", mmap_mode="r")
        self.y = np.load(folder / f"{split}_y.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return torch.from_numpy(np.array(self.x[index])), int(self.y[index])


def make_lazy_digits(config):
    """The built-in digits task with its data written to files (once) and read back lazily."""
    from evaluators.builtin_tasks import make_digits_task
    from evaluators.tasks import TaskConfig

    digits = make_digits_task(TaskConfig(name="digits", dense_epochs=config.dense_epochs))
    folder = Path(config.data_root or tempfile.gettempdir()).expanduser() / "secateurs-lazy-digits"
    if not (folder / "test_y.npy").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for split, (x, y) in (("train", digits.train_data), ("test", digits.eval_data)):
            for name, tensor in (("x", x), ("y", y)):
                tmp = folder / f".{split}_{name}.{os.getpid()}.npy"
                np.save(tmp, tensor.numpy())
                os.replace(tmp, folder / f"{split}_{name}.npy")
    return dataclasses.replace(digits, name="lazy_digits", train_data=DigitsFiles(folder, "train"),
                               eval_data=DigitsFiles(folder, "test"))


def one(name: str, config_path: str, overrides: list[str], trials: int, tmp: Path, index: int) -> dict:
    from mlflow.tracking import MlflowClient

    from search.config import load_config
    from search.driver import run_search

    uri = f"sqlite:///{tmp / f'mlflow-{name}-{index}.db'}"
    config = load_config(config_path, [*overrides, f"search.num_trials={trials}", f"search.storage_path={tmp / 'ray'}",
                                       "search.baseline_ratios=[]", "search.remeasure=false"])
    result = run_search(config, config_name=f"lazy-{name}", tracking_uri=uri, out=lambda line: None)
    client = MlflowClient(uri)
    fit_wall = client.get_run(result.parent_run_id).data.metrics["fit_wall_s"]
    runs = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}' and "
                              "tags.`secateurs.kind` = 'trial'", max_results=1000)
    runs = [r for r in runs if r.info.status == "FINISHED"]
    work = [r.data.metrics["time_prune_s"] + r.data.metrics["time_finetune_s"] + r.data.metrics["time_measure_s"] for r in runs]
    finetune = [r.data.metrics["time_finetune_s"] for r in runs]
    return {"data": name, "run": index, "trials": len(runs), "fit_wall_s": round(fit_wall, 2),
            "in_trial_work_s_median": round(statistics.median(work), 3), "finetune_s_median": round(statistics.median(finetune), 3),
            "accuracy_mean": round(statistics.mean(r.data.metrics["accuracy"] for r in runs), 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2, help="searches of each kind, alternated")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lazy_data.json"))
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # for the Ray workers
    tasks = {"in_memory": "task.name=digits", "lazy": "task.name=benchmarks.lazy_data:make_lazy_digits"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("SECATEURS_CACHE", str(Path(tmp) / "cache"))
        data_root = f"task.data_root={Path(tmp) / 'files'}"
        for index in range(args.repeats):
            for name, task in tasks.items():
                overrides = [*args.overrides, task] + ([data_root] if name == "lazy" else [])
                rows.append(one(name, args.config, overrides, args.trials, Path(tmp), index))
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for key in ("fit_wall_s", "in_trial_work_s_median", "finetune_s_median"):
        medians = {name: statistics.median(r[key] for r in rows if r["data"] == name) for name in tasks}
        summary[key] = {**{name: round(v, 3) for name, v in medians.items()}, "ratio_lazy_over_in_memory": round(medians["lazy"] / medians["in_memory"], 2)}
    out = {"config": args.config, "overrides": args.overrides, "trials": args.trials, "repeats": args.repeats, "runs": rows,
           "summary": summary, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("\n| | in memory | lazily read | lazy / in memory |\n|---|---|---|---|")
    for key, label in (("fit_wall_s", "search fit wall"), ("in_trial_work_s_median", "in-trial work (median)"),
                       ("finetune_s_median", "fine-tune (median)")):
        s = summary[key]
        print(f"| {label} | {s['in_memory']:.3f} s | {s['lazy']:.3f} s | {s['ratio_lazy_over_in_memory']:.2f}x |")


if __name__ == "__main__":
    main()
