"""What the search tests share: one local Ray per test process for the searches run in it, and an
MLflow store each test gets to itself, made quickly."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.data import data_root

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shared_ray():
    """One local Ray for the searches a test process runs in process (``run_search`` uses a Ray that is
    up and leaves it up, as in a notebook): Ray's start (4.5 s of one tiny search, alone) and shut-down
    are paid once. Searches run as commands (the kill loops, faults, ``secateurs`` as printed)
    start their own. Its workers inherit the environment it starts with: the repository on their
    path (``tests.*``, ``examples.*``) and the data root the tests found."""
    import ray

    from search.ray_runtime import start_local_ray

    if not ray.is_initialized():
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PYTHONPATH", str(ROOT))
            found = data_root("sst2.csv") or data_root("cifar10*.npz")
            if found is not None:
                patch.setenv("SECATEURS_DATA", str(found))
            start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def new_store(tmp_path_factory) -> Callable[..., str]:
    """``new_store(directory, name="mlflow.db")``: an empty sqlite MLflow store as ``directory/name``, its URI.

    Each is a copy of one store made once per test process. MLflow makes a new store's tables by
    running its schema migrations: 3.4 s for a new store's first use, where opening a made one
    took 1.0 s; the suite makes a store for every search it runs."""
    from mlflow.tracking import MlflowClient

    empty = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{empty}").search_experiments()

    def make(directory: Path, name: str = "mlflow.db") -> str:
        shutil.copyfile(empty, directory / name)
        return f"sqlite:///{directory / name}"

    return make


@pytest.fixture
def store(tmp_path, tmp_path_factory, monkeypatch, new_store, shared_ray) -> str:
    """A search's working directory (``tmp_path``, the current one) with its own MLflow store, for a
    search run in process on :func:`shared_ray`; the dense models are cached once per test process."""
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path_factory.getbasetemp() / "secateurs-cache"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(tmp_path)
    return new_store(tmp_path)
