"""What a local search and ``secateurs ui`` listen on: loopback only, in every process they start;
and Ctrl-C, which stops that search cleanly."""
from __future__ import annotations

import ipaddress
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


def listening(pid: int) -> dict[str, set[str]]:
    """``{"<name> <pid>": {"ip:port", ...}}``: the TCP sockets listening and the UDP sockets bound
    by process ``pid`` and every process under it."""
    root = psutil.Process(pid)
    found: dict[str, set[str]] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            sockets = process.net_connections(kind="inet")
            name = f"{process.name()} {process.pid}"
        except psutil.Error:
            continue  # ended meanwhile
        for sock in sockets:
            if sock.status == psutil.CONN_LISTEN or (sock.type == socket.SOCK_DGRAM and not sock.raddr):
                found.setdefault(name, set()).add(f"{sock.laddr.ip}:{sock.laddr.port}")
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rpartition(":")[0].strip("[]"))
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def exposed(sockets: dict[str, set[str]]) -> dict[str, set[str]]:
    return {name: {a for a in addresses if not is_loopback(a)} for name, addresses in sockets.items()
            if any(not is_loopback(a) for a in addresses)}


def test_the_checks_tell_loopback_from_everything_else():
    assert is_loopback("127.0.0.1:80") and is_loopback("::1:80") and is_loopback("::ffff:127.0.0.1:80")
    assert not is_loopback("0.0.0.0:80") and not is_loopback(":::80") and not is_loopback("192.0.2.2:80")
    with socket.socket() as wide:
        wide.bind(("0.0.0.0", 0))
        wide.listen()
        assert exposed(listening(os.getpid()))  # a socket open to every interface is seen


def test_a_local_search_listens_on_loopback_only_and_ctrl_c_stops_it_cleanly(tmp_path, new_store):
    # one search for both (a search started as a command is 30-50 s of the suite): its sockets while
    # trials run, then Ctrl-C, which ends the running trials and records the frontier of the completed ones
    config = {
        "task": {"dense_epochs": 3},
        "space": {"criteria": ["l1", "l2"], "ratio": {"low": 0.0, "high": 0.6, "step": 0.05}},
        "finetune": {"epochs": 0.5},
        "measure": {"warmup": 2, "repeats": 5},
        "search": {"num_trials": 40, "max_concurrent": 2, "baseline_ratios": [], "seed": 1, "storage_path": str(tmp_path / "ray")},
        "tracking": {"experiment": "listening"},
    }
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config))
    uri = new_store(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "SECATEURS_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "search", "search.yaml", "--tracking-uri", uri], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "[ 2/40]" in line:  # Ray, its workers and the trials' actors are all up
                break
        seen = listening(proc.pid)
        names = " ".join(seen)
        assert "gcs_server" in names and "raylet" in names, f"Ray's servers not found: {seen}\n{''.join(lines)[-2000:]}"
        assert not exposed(seen), f"listening beyond loopback: {exposed(seen)}"
        os.kill(proc.pid, signal.SIGINT)
        output = "".join(lines) + proc.communicate(timeout=120)[0]
        assert proc.returncode == 130, output[-3000:]
        assert "interrupted: resume with `secateurs search --resume" in output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("listening").experiment_id], "tags.`secateurs.kind` = 'search'")
    trials = client.search_runs([parent.info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`secateurs.kind` = 'trial'", max_results=1000)
    assert parent.info.status == "KILLED"
    assert 2 <= len(trials) < 40
    assert parent.data.metrics["trials_completed"] == len([t for t in trials if t.info.status == "FINISHED"])
    assert {"frontier.csv", "frontier.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert all("secateurs.pareto" in t.data.tags for t in trials if t.info.status == "FINISHED")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_secateurs_ui_listens_on_loopback_only(tmp_path, new_store):
    uri = new_store(tmp_path)
    MlflowClient(uri).create_experiment("listening")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "ui", "--tracking-uri", uri, "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(a.endswith(f":{port}") for addresses in listening(proc.pid).values() for a in addresses):
            assert proc.poll() is None and time.monotonic() < deadline, "the MLflow UI never listened"
            time.sleep(0.5)
        time.sleep(2)  # its workers are up too
        seen = listening(proc.pid)
        assert not exposed(seen), f"listening beyond loopback: {exposed(seen)}"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
