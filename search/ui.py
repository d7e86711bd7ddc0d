"""``secateurs ui``: the MLflow UI on the tracking store, in the foreground.

>>> serve_ui("sqlite:///mlflow.db", port=5000)  # doctest: +SKIP
MLflow UI for sqlite:///mlflow.db
  http://127.0.0.1:5000  (Ctrl-C stops it)
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Callable

from search.records import ProductionError, check_store

Log = Callable[[str], None]


def ui_argv(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> list[str]:
    """``mlflow ui --backend-store-uri URI --host HOST --port PORT --workers N``, run with this Python's MLflow."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--host", host,
            "--port", str(port), "--workers", str(workers)]


def check_ui(tracking_uri: str, host: str, port: int) -> None:
    """Fail early, in one line, where ``mlflow ui`` would fail late or create an empty store."""
    if tracking_uri.startswith(("http://", "https://")):
        raise ProductionError(f"the tracking URI {tracking_uri} is already a server: open it in a browser")
    check_store(tracking_uri)
    if not 0 < port < 65536:
        raise ProductionError(f"--port must be in 1..65535, but got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ProductionError(f"cannot serve on {host}:{port} ({exc.strerror}); choose another --port") from None


def _stdout(line: str) -> None:
    print(line, flush=True)


def serve_ui(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000, workers: int = 1, log: Log = _stdout) -> int:
    """Run the MLflow UI in the foreground until it exits, Ctrl-C or SIGTERM; returns its exit
    status (0 when stopped). The server runs in its own process group (mlflow starts a uvicorn
    child), which is stopped as a whole. MLflow's GenAI job runner is off unless
    ``$MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` says otherwise: it adds seven processes and ~25 s of start-up."""
    check_ui(tracking_uri, host, port)
    if workers < 1:
        raise ProductionError(f"--workers must be >= 1, but got {workers}")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    log(f"MLflow UI for {tracking_uri}\n  http://{host}:{port}  (Ctrl-C stops it)")
    process = subprocess.Popen(ui_argv(tracking_uri, host, port, workers), env=env, start_new_session=True)

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return process.wait()
    except KeyboardInterrupt:
        for sig, wait_s in ((signal.SIGINT, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
