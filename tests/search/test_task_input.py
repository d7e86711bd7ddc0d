"""A user task's bad input stops a search before any trial and before anything is written to MLflow."""
from __future__ import annotations

import pytest

from evaluators.checks import EvaluationError, TaskError
from search.config import validate
from search.driver import run_search

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(name: str, tmp_path) -> dict:
    return {"task": {"name": name, "dense_epochs": 1}, "space": {"criteria": ["l1"]},
            "measure": {"warmup": 1, "repeats": 2}, "search": {"storage_path": str(tmp_path / "ray")}}


@pytest.mark.parametrize("name, error, message", [
    ("tests.task_modules:digits_declaring_map", TaskError,
     r"^Task.objectives.map: the task's evaluation does not return 'map'; it returns accuracy; also valid: latency_ms"),
    ("tests.task_modules:digits_nan_always", EvaluationError,
     r"^the task's evaluation returned accuracy = nan; every value must be a finite number$"),
    ("tests.task_modules:returns_a_dict", TaskError, r"^task.name: 'tests.task_modules:returns_a_dict' returned dict; expected"),
])
def test_bad_user_tasks_stop_before_any_record(tmp_path, monkeypatch, name, error, message):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        run_search(validate(_config(name, tmp_path)), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", out=lambda line: None)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()
