"""What the search tests share: an MLflow store each test gets to itself, made quickly."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def new_store(tmp_path_factory) -> Callable[..., str]:
    """``new_store(directory, name="mlflow.db")``: an empty sqlite MLflow store as ``directory/name``, its URI.

    Each is a copy of one store made once per test process. MLflow makes a new store's tables by
    running its schema migrations, about 2.5 s of the store's first use, where opening a made one
    takes about 1 s; the suite makes a store for every search it runs."""
    from mlflow.tracking import MlflowClient

    empty = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{empty}").search_experiments()

    def make(directory: Path, name: str = "mlflow.db") -> str:
        shutil.copyfile(empty, directory / name)
        return f"sqlite:///{directory / name}"

    return make


@pytest.fixture
def store(tmp_path, tmp_path_factory, monkeypatch, new_store) -> str:
    """A search's working directory (``tmp_path``, the current one) with its own MLflow store; the
    dense models are cached once per test process, and Ray's workers import ``tests.*`` and
    ``examples.*`` from the repository."""
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path_factory.getbasetemp() / "secateurs-cache"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(tmp_path)
    return new_store(tmp_path)
