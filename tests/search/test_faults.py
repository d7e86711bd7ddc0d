"""A search whose trials spread over a two-node Ray cluster (Ctrl-C: test_listening.py; SIGKILL and
--resume, again and again: test_kill_loop.py; a trial out of memory: test_oom.py)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray  # noqa: F401  (puts Ray's own copy of psutil on sys.path)
import yaml
from mlflow.tracking import MlflowClient

psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def write_config(tmp_path: Path, num_trials: int, max_concurrent: int = 1) -> Path:
    config = {
        "task": {"dense_epochs": 3},
        "space": {"criteria": ["l1", "l2"], "ratio": {"low": 0.0, "high": 0.6, "step": 0.05}},
        "finetune": {"epochs": 0.5},
        "measure": {"warmup": 2, "repeats": 5},
        "search": {"num_trials": num_trials, "population_size": 4, "max_concurrent": max_concurrent,
                   "seed": 1, "storage_path": str(tmp_path / "ray"), "baseline_ratios": []},
        "tracking": {"experiment": "faults"},
    }
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def env(tmp_path, tmp_path_factory):
    return {
        **os.environ,
        "SECATEURS_CACHE": str(tmp_path_factory.getbasetemp() / "secateurs-cache"),
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
    }


def search_runs(uri: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("faults")
    parents = client.search_runs([experiment.experiment_id], "tags.`secateurs.kind` = 'search'")
    assert len(parents) == 1
    parent = parents[0]
    trials = client.search_runs([experiment.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`secateurs.kind` = 'trial'",
                                max_results=1000)
    return client, parent, trials


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(ready, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < end, f"{what} not after {timeout_s} s"
        time.sleep(0.2)


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def runs_raylet(node: subprocess.Popen) -> bool:
    try:
        return any(p.name() == "raylet" for p in psutil.Process(node.pid).children(recursive=True))
    except psutil.Error:
        return False


def test_search_on_a_two_node_cluster(tmp_path, env, new_store):
    port = free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    token = tmp_path / "ray_auth_token"
    token.write_text(os.urandom(16).hex())
    # Ray 2.60 clusters authenticate with a token; every node and the driver must share it.
    env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
    nodes = [subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false", *common],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        wait_until(lambda: accepts(port), 60, "the head's GCS listening")
        nodes.append(subprocess.Popen([ray_cli, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", *common],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        # its raylet up; it joins within seconds, and a trial waiting for a CPU runs there when it has
        wait_until(lambda: runs_raylet(nodes[1]), 60, "the second node's raylet")
        config = write_config(tmp_path, num_trials=6, max_concurrent=2)
        uri = new_store(tmp_path)
        done = subprocess.run([sys.executable, "-m", "search.cli", "search", str(config), "--tracking-uri", uri,
                               "--address", f"127.0.0.1:{port}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        _, parent, trials = search_runs(uri)
        assert parent.info.status == "FINISHED" and len(trials) == 6
        assert len({t.data.tags["secateurs.node_id"] for t in trials}) == 2  # both nodes ran trials
    finally:
        for node in reversed(nodes):
            try:
                os.killpg(node.pid, signal.SIGTERM)
                node.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(node.pid, signal.SIGKILL)
