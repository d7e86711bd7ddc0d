"""End-to-end searches on users' own tasks (real local Ray, MLflow on a temporary sqlite file): the
README's "Bring your own model" module run exactly as printed, a user fine-tune loop given the
budget, dict batches with a two-input model, a metric to minimise, and evaluations that fail."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from search.config import load_config, validate
from search.driver import run_search

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def children(client: MlflowClient, result, kind: str):
    return client.search_runs([result.experiment_id], max_results=1000, filter_string=(
        f"tags.`mlflow.parentRunId` = '{result.parent_run_id}' and tags.`secateurs.kind` = '{kind}'"))


def _short(config_path: Path | str, tmp_path: Path, *overrides: str):
    return load_config(str(config_path), [f"search.storage_path={tmp_path / 'ray'}", *overrides])


def _readme_block(marker: str) -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {re.escape(marker)} -->\n```\w+\n(.*?)```", readme, re.S)
    assert found, f"README.md has no block after <!-- {marker} -->"
    return found.group(1)


def test_the_readme_module_runs_as_printed(tmp_path, tmp_path_factory):
    module, config = _readme_block("byom-module: my_task.py"), _readme_block("byom-config: my_task.yaml")
    assert len(module.splitlines()) <= 60
    (tmp_path / "my_task.py").write_text(module)
    (tmp_path / "my_task.yaml").write_text(config)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "HOME": str(tmp_path / "home"),
           "SECATEURS_CACHE": str(tmp_path / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    secateurs = Path(sys.executable).with_name("secateurs")
    command = [str(secateurs)] if secateurs.exists() else [sys.executable, "-m", "search.cli"]
    proc = subprocess.run([*command, "search", "my_task.yaml", "--set", f"search.storage_path={tmp_path / 'ray'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dense model trained: accuracy " in proc.stderr and ", macro_f1 " in proc.stderr
    assert (tmp_path / "home" / ".cache" / "secateurs" / "examples" / "bars" / "test_labels.npy").is_file()  # data written once
    done = re.search(r"(\d+) trials completed, (\d+) failed", proc.stderr)
    assert done and int(done.group(1)) >= 8 and done.group(2) == "0"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("my-task").experiment_id], "tags.`secateurs.kind` = 'trial'", max_results=100)
    assert {r.data.params["policy.criterion"] for r in runs} <= {"l1", "taylor"} and all(r.info.status == "FINISHED" for r in runs)


def test_a_user_fine_tune_loop_is_called_with_the_budget(tmp_path, store):
    journal = tmp_path / "journal.jsonl"
    config = _short(ROOT / "configs" / "own_finetune.yaml", tmp_path, "search.num_trials=4", "search.baseline_ratios=[0.5]",
                    "task.dense_epochs=2", "finetune.epochs=0.5", f"task.options.journal={journal}", "search.remeasure=false")
    result = run_search(config, config_name="own", tracking_uri=store, out=lambda line: None)
    client = MlflowClient(store)
    runs = children(client, result, "trial") + children(client, result, "baseline")
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    calls = [json.loads(line) for line in journal.read_text().splitlines()]
    budget = round(0.5 * math.ceil(1437 / 64))  # digits: 1,437 training images, batches of 64
    assert len(calls) == 6 and {c["budget"] for c in calls} == {budget} and {c["steps"] for c in calls} == {budget}
    assert {r.data.metrics["finetune_steps"] for r in runs} == {budget}
    sampled = sorted(float(r.data.params["finetune.lr"]) for r in runs)
    assert sorted(c["lr"] for c in calls) == pytest.approx(sampled) and all(0.0005 <= lr <= 0.005 for lr in sampled)


def test_dict_batches_and_a_two_input_model_search(tmp_path, store):
    config = _short(ROOT / "configs" / "reviews.yaml", tmp_path, "search.num_trials=4", "search.baseline_ratios=[0.5]",
                    "search.baselines=[uniform]", f"task.data_root={tmp_path / 'data'}", "search.remeasure=false")
    result = run_search(config, config_name="reviews", tracking_uri=store, out=lambda line: None)
    client = MlflowClient(store)
    runs = children(client, result, "trial") + children(client, result, "baseline")
    assert len(runs) == 5 and all(r.info.status == "FINISHED" for r in runs)
    assert result.dense["accuracy"] > 0.9 and all("accuracy" in r.data.metrics for r in runs)
    assert any(r.data.metrics["params"] < result.dense["params"] for r in runs)


def test_a_metric_to_minimise_through_a_user_module(tmp_path, store):
    config = _short(ROOT / "configs" / "custom_metric.yaml", tmp_path, "search.num_trials=4", "search.baseline_ratios=[0.5]",
                    "task.dense_epochs=20", f"task.data_root={tmp_path / 'data'}", "search.remeasure=false")
    result = run_search(config, config_name="custom", tracking_uri=store, out=lambda line: None)
    client = MlflowClient(store)
    runs = children(client, result, "trial") + children(client, result, "baseline")
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert 30 < result.dense["rmse"] < 120
    for run in runs:
        assert run.data.metrics["rmse_change"] == pytest.approx(run.data.metrics["rmse"] - result.dense["rmse"])
    # the frontier is over (rmse min, latency_ms min, size_mb min): lower RMSE is better, not higher
    parent = client.get_run(result.parent_run_id)
    assert json.loads(parent.data.tags["secateurs.objectives"]) == {"rmse": "min", "latency_ms": "min", "size_mb": "min"}
    front = result.frontier
    from search import frontier
    table = result.trials
    expected = frontier.non_dominated(table[["rmse", "latency_ms", "size_mb"]].to_numpy(), ["min", "min", "min"])
    assert set(front["run_id"]) == set(table.loc[expected, "run_id"])
    # pick speaks the search's objectives: the best RMSE on the frontier, and a bound on it
    from search.choose import Constraints
    from search.pick import format_pick, pick
    best = pick(result.parent_run_id, prefer="rmse", tracking_uri=store)
    assert best.trial["rmse"] == front["rmse"].min()
    bounded = pick(result.parent_run_id, constraints=Constraints(where=(f"rmse <= {front['rmse'].median()}",)), prefer="latency_ms",
                   tracking_uri=store)
    assert bounded.trial["rmse"] <= front["rmse"].median()
    assert "rmse" in format_pick(best) and "rmse_change" in format_pick(best)


def test_the_custom_metric_task_reads_its_files_and_records_rmse(tmp_path, monkeypatch):
    """The custom_metric example through the evaluators alone (no search side needed): lazily read
    files, dense training with the user's loss, a pruned trial with every score and its change."""
    from evaluators.checkpoint import ensure_dense_checkpoint
    from evaluators.data import DatasetSource
    from evaluators.tasks import make_task
    from evaluators.trial import MeasureConfig, Reference, evaluate
    from spaces import Policy

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    config = load_config(str(ROOT / "configs" / "custom_metric.yaml"), [f"task.data_root={tmp_path / 'data'}", "task.dense_epochs=20"])
    task = make_task(config.task)
    assert isinstance(task.train_source, DatasetSource) and task.objectives == {"rmse": "min"}
    checkpoint = ensure_dense_checkpoint(config.task, task, log=lambda line: None, threads=1)
    measure = MeasureConfig(warmup=1, repeats=3)
    dense = evaluate(Policy("l1", {}), task, checkpoint, config.finetune, measure)
    assert set(dense.scores) == {"rmse", "mae", "r2"} and 30 < dense.scores["rmse"] < 120
    pruned = evaluate(Policy("taylor", {"0": 0.5, "2": 0.5}), task, checkpoint, config.finetune, measure,
                      dense=Reference.from_record(dense.to_dict()))
    assert pruned.params < dense.params and pruned.finetune_steps == 5 * math.ceil(353 / 32)
    assert pruned.changes["rmse_change"] == pytest.approx(pruned.scores["rmse"] - dense.scores["rmse"])


def test_a_trial_whose_evaluation_returns_nan_fails_with_the_reason_and_the_search_goes_on(tmp_path, store):
    raw = {
        "task": {"name": "tests.task_modules:digits_nan_when_pruned", "dense_epochs": 2},
        "space": {"criteria": ["l1"], "ratio": {"low": 0.0, "high": 0.6, "step": 0.05},
                  "rules": [{"match": "classifier.*", "exclude": True}]},
        "finetune": {"epochs": 0.1},
        "measure": {"warmup": 1, "repeats": 3},
        "search": {"num_trials": 6, "population_size": 4, "max_concurrent": 2, "seed": 3, "baseline_ratios": [0.25, 0.5],
                   "baselines": ["uniform"], "storage_path": str(tmp_path / "ray"), "remeasure": False},
        "tracking": {"experiment": "nan"},
    }
    result = run_search(validate(raw), config_name="nan", tracking_uri=store, out=lambda line: None)
    client = MlflowClient(store)
    runs = children(client, result, "trial") + children(client, result, "baseline")
    failed = [r for r in runs if r.info.status == "FAILED"]
    done = [r for r in runs if r.info.status == "FINISHED"]
    assert failed and done and result.status == "FINISHED" and result.num_failed == len(failed)
    for run in failed:
        assert "the task's evaluation returned accuracy = nan; every value must be a finite number" in run.data.tags["secateurs.error"]
        assert float(run.data.params["ratio.features.0"]) > 0.3
