"""A search that logs to a real MLflow tracking server on loopback (`--tracking-uri http://...`)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from search.config import validate
from search.driver import run_search

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, new_store):
    port = free_port()
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen(
        [mlflow, "server", "--backend-store-uri", new_store(tmp_path, "server.db"),
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no GenAI job runner: a faster start
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError("mlflow server did not start")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_search_logs_to_a_remote_tracking_server(tmp_path, tmp_path_factory, monkeypatch, mlflow_server):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path_factory.getbasetemp() / "secateurs-cache"))
    monkeypatch.chdir(tmp_path)
    config = validate({
        "task": {"dense_epochs": 3},
        "finetune": {"epochs": 0.2},
        "measure": {"warmup": 2, "repeats": 5},
        "search": {"num_trials": 4, "population_size": 4, "max_concurrent": 2, "baseline_ratios": [0.5], "baselines": ["uniform"],
                   "storage_path": str(tmp_path / "ray")},
        "tracking": {"experiment": "remote"},
    })
    result = run_search(config, config_name="remote", tracking_uri=mlflow_server, out=lambda line: None)
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the local default
    client = MlflowClient(mlflow_server)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["secateurs.kind"] == "search"
    runs = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'", max_results=100)
    kinds = sorted(r.data.tags["secateurs.kind"] for r in runs)
    assert kinds == ["baseline", "dense", "trial", "trial", "trial", "trial"]
    assert {"config.yaml", "frontier.csv", "frontier.png"} <= {a.path for a in client.list_artifacts(result.parent_run_id)}
    # artifacts went through the server to its artifact store
    assert any((tmp_path / "server-artifacts").rglob("frontier.csv"))
