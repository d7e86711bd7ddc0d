"""The parent run of a search, on a real sqlite MLflow store: a driver killed while creating it
leaves nothing that --resume or the readers take for a search."""
from __future__ import annotations

import pytest

from search.tracking import SearchTracker


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_a_parent_run_cut_off_while_being_created_is_not_a_search(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SearchTracker(uri)

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(tracker.client, "log_text", killed)  # the driver dies writing config.yaml
    with pytest.raises(Killed):
        tracker.start_search("cut", "search", config_yaml="{}", params={"seed": 0})
    cut_off = tracker.parent_run_id
    monkeypatch.undo()

    resumed = SearchTracker(uri)
    with pytest.raises(LookupError, match="not a search"):
        resumed.attach(cut_off)
    whole = resumed.start_search("cut", "search", config_yaml="{}", params={"seed": 0})
    assert resumed.attach(whole).data.tags["secateurs.kind"] == "search"
