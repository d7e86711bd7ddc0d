"""A trial that runs out of memory (for real: its Ray worker hits an address-space limit while
fine-tuning) is a failed trial with that reason, and the search goes on to its budget."""
from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from search.config import validate
from search.driver import run_search

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_a_trial_out_of_memory_fails_alone_and_the_search_finishes(tmp_path, monkeypatch, new_store):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # Ray workers import tests.memory_hungry_task from here
    monkeypatch.chdir(tmp_path)
    config = validate({
        "task": {"name": "tests.memory_hungry_task:make_task", "dense_epochs": 1},
        "space": {"criteria": ["l1"], "ratio": {"low": 0.0, "high": 0.5, "step": 0.05},
                  "rules": [{"match": "classifier.*", "exclude": True}]},
        "finetune": {"epochs": 0.2},
        "measure": {"warmup": 1, "repeats": 3},
        # the uniform 0.5 baseline leaves features.0 16 filters: its fine-tune runs out of memory
        "search": {"num_trials": 5, "baselines": ["uniform"], "baseline_ratios": [0.1, 0.5], "max_concurrent": 2,
                   "seed": 0, "storage_path": str(tmp_path / "ray"), "remeasure": False},
        "tracking": {"experiment": "oom"},
    })
    lines: list[str] = []
    uri = new_store(tmp_path)
    result = run_search(config, config_name="oom", tracking_uri=uri, out=lines.append)
    output = "\n".join(lines)
    assert result.status == "FINISHED", output[-3000:]

    client = MlflowClient(uri)
    runs = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'", max_results=100)
    trials = [r for r in runs if r.data.tags["secateurs.kind"] in ("trial", "baseline")]
    assert len(trials) == 7  # 5 sampled + 2 baselines: every one recorded, the search went on after the failure
    failed = [r for r in trials if r.info.status == "FAILED"]
    (baseline,) = [r for r in trials if r.data.tags.get("secateurs.baseline") == "uniform 0.5"]
    assert baseline in failed
    for run in failed:
        assert run.data.tags["secateurs.failure"] == "out_of_memory"
        assert "allocate memory" in run.data.tags["secateurs.error"]
    assert "FAILED (out of memory)" in output
    assert any(r.info.status == "FINISHED" for r in trials)
    assert result.num_failed == len(failed) and len(result.trials) == 7 - len(failed)
