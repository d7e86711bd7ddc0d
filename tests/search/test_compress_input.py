"""Bad input to a search of depth and int8: one line, before any trial and before anything is
written to MLflow (and before the dense model trains)."""
from __future__ import annotations

import pytest

from search.config import ConfigError, validate
from search.driver import run_search
from spaces import SpaceError


def _config(tmp_path, task: str, space: dict, measure: dict | None = None):
    return validate({"task": {"name": task, "dense_epochs": 1}, "space": space, "measure": measure or {},
                     "search": {"num_trials": 2, "storage_path": str(tmp_path / "ray")}})


def _fails(tmp_path, config, error, match: str) -> None:
    with pytest.raises(error, match=match):
        run_search(config, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", out=lambda line: None)
    assert not (tmp_path / "mlflow.db").exists()


def test_int8_with_a_backend_that_cannot_run_it_is_a_config_error_naming_what_is_valid():
    with pytest.raises(ConfigError, match=r"^`space.quantization`: 'int8' cannot run with measure.backend: torch \(int8: static int8 .*\); "
                                          r"valid with it: none, int8_dynamic$"):
        validate({"space": {"quantization": ["none", "int8"]}})
    with pytest.raises(ConfigError, match=r"`space.quantization`: 'int8_dynamic' runs on the CPU .* but measure.device is cuda"):
        validate({"space": {"quantization": ["int8_dynamic"]}, "measure": {"device": "cuda"}})
    assert validate({"space": {"quantization": ["none", "int8"]}, "measure": {"backend": "onnxruntime"}}).space.quantization == ["none", "int8"]


def test_depth_on_a_model_without_removable_blocks_says_why_its_candidates_are_not(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    _fails(tmp_path, _config(tmp_path, "digits", {"depth": {}}), SpaceError,
           r"^space.depth: the model has no removable block \(.*\); why its candidates are not: features: it maps \(1, 1, 8, 8\) "
           r"torch.float32 to \(1, 64, 2, 2\) torch.float32; the identity needs the same shape and dtype; classifier: .*; remove space.depth$")
    assert not (tmp_path / "cache").exists()  # refused before the dense model trained


def test_a_depth_rule_matching_no_removable_block_lists_them_and_says_why_what_it_matched_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    rule = {"depth": {"rules": [{"match": "stem", "exclude": True}]}}
    _fails(tmp_path, _config(tmp_path, "tests.task_modules:digits_residual_mlp", rule), SpaceError,
           r"^space.depth.rules\[0\]: 'stem' matches no removable block \(stem: it maps \(1, 1, 8, 8\) torch.float32 to \(1, 32\) "
           r"torch.float32; the identity needs the same shape and dtype\); removable blocks: blocks.0, blocks.1, blocks.2$")
    assert not (tmp_path / "cache").exists()

