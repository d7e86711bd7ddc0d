"""search.refine with a time budget on a real local Ray: a fine-tune still running when the
re-timing must start is stopped, its worker killed, and the search goes on to its report."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
import pytest

import search.refine as refine_module
from search.config import validate
from search.refine import RefineSettings, refine_frontier

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


class _Tracker:
    """Keeps what the refinement records; each run's policy is a file its fine-tune writes its pid to."""

    def __init__(self, folder: Path):
        self.folder, self.metrics, self.refined = folder, {}, None

    def set_tags(self, tags):
        pass

    def policies(self, run_ids):
        return {r: str(self.folder / f"{r}.pid") for r in run_ids}

    def update_metrics(self, run_id, metrics, step):
        self.metrics[run_id] = metrics

    def set_tags_on(self, run_ids, tags):
        self.refined = list(run_ids)


def test_a_fine_tune_past_the_deadline_is_stopped_and_its_worker_killed(tmp_path, monkeypatch, shared_ray):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the workers import tests.stalled_fine_tune
    from tests.stalled_fine_tune import stall

    monkeypatch.setattr(refine_module, "_refine_one", stall)
    front = pd.DataFrame({"run_id": ["fast", "slow"], "accuracy": [0.5, 0.9], "latency_ms": [1.0, 2.0]})
    tracker, lines = _Tracker(tmp_path), []
    finetune = validate({"task": {"name": "digits"}}).finetune
    began = time.perf_counter()
    done = refine_frontier(tracker, front, RefineSettings(epochs=1.0, candidates=2), task=None, checkpoint=b"",
                           finetune=finetune, measure=None, dense={"accuracy": 0.9}, resources={"cpu": 1, "gpu": 0},
                           out=lines.append, senses={"accuracy": "max", "latency_ms": "min"}, concurrency=2,
                           deadline=began + 10.0)
    took = time.perf_counter() - began
    assert 10.0 <= took < 15.0, f"the refinement returned after {took:.1f} s on a deadline of 10 s"
    assert done == [] and tracker.refined == [] and tracker.metrics == {}
    assert sum("stopped at the time budget before its 1 epochs ended" in line for line in lines) == 2, lines
    # the workers that began (on a loaded machine a worker may not have started in 10 s) are gone
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert pids, "no fine-tune started in 10 s"
    deadline = time.time() + 10
    while any(_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids), "a stopped fine-tune's worker is still running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (killed, not yet reaped by the raylet) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
