"""Config loading, --set overrides and the one-line errors a user sees for bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from search.cli import main
from search.config import Config, ConfigError, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_quickstart_config_loads_with_overrides():
    config = load_config(QUICKSTART, ["search.num_trials=5", "search.seed=7", "finetune.epochs=0.5", "space.criteria=[l1]"])
    assert config.search.num_trials == 5
    assert config.search.seed == 7
    assert config.finetune.epochs == 0.5
    assert config.space.criteria == ["l1"]
    # untouched fields keep the file's values
    assert config.tracking.experiment == "secateurs-quickstart"
    assert config.space.rules[0].match == "features.0"


def test_resolved_config_round_trips_through_yaml():
    config = load_config(QUICKSTART)
    again = Config.model_validate(yaml.safe_load(config.to_yaml()))
    assert again == config


def test_parse_overrides_builds_nested_values():
    assert parse_overrides(["a.b=1", "a.c=[x, y]", "d=null"]) == {"a": {"b": 1, "c": ["x", "y"]}, "d": None}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["search.num_trials"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("search:\n  num_trails: 3\n", r"unknown key `search.num_trails`; valid keys here: .*num_trials"),
        ("bogus: 1\n", r"unknown key `bogus`; valid keys here: finetune, measure, search, space, task, tracking"),
        ("space:\n  criteria: [l1, l3]\n", r"`space.criteria`: unknown criterion 'l3'; valid: bn_scale, fpgm, l1, l2, lamp, random, taylor, wanda"),
        ("space:\n  ratio: {low: 0.0, high: 1.0}\n", r"`space.ratio.high`: must satisfy 0 <= ratio < 1, but got 1.0"),
        ("space:\n  ratio: {low: -0.1, high: 0.5, step: 0.1}\n", r"`space.ratio.low`: must satisfy 0 <= ratio < 1, but got -0.1"),
        ("space:\n  rules:\n    - {match: conv, ratio: 1.5}\n", r"`space.rules\[0\].ratio`: must satisfy 0 <= ratio < 1, but got 1.5"),
        ("search:\n  num_trials: -1\n", r"`search.num_trials`: must be >= 0, but got -1"),
        ("search:\n  sampler: annealing\n", r"`search.sampler`: unknown sampler 'annealing'; valid: gp, nsga2, nsga3, qmc, random, tpe"),
        ("search:\n  sensitivity: {seed_latency: [0.5, 1.2]}\n",
         r"`search.sensitivity.seed_latency`: each must be a fraction of the dense model's latency, 0 < fraction < 1, but got 1.2"),
        ("search:\n  sensitivity: {seed_macs: [0.5, 0]}\n",
         r"`search.sensitivity.seed_macs`: each must be a fraction of the dense model's MACs, 0 < fraction < 1, but got 0"),
        ("search:\n  screening: {fine_tunes: 0}\n",
         r"`search.screening.fine_tunes`: must be >= 1 \(or null: no budget of fine-tunes\), but got 0"),
        ("search:\n  refine: {reduction_factor: true}\n", r"`search.refine.reduction_factor`: must be an integer, but got True"),
        ("search:\n  baseline_ratios: [0.3, false]\n", r"`search.baseline_ratios\[1\]`: must be a number, but got False"),
        ("finetune:\n  epochs: lots\n", r"`finetune.epochs`: .*number.*'lots'"),
        ("task:\n  name: imagenet\n", r"`task.name`: unknown task 'imagenet'; valid: cifar10, digits, fashion_mnist, hf_causal_lm, hf_text_classification, sst2"),
        ("- a\n- b\n", r"top level must be a mapping"),
        ("search: [1, 2\n", r"is not valid YAML at line"),
    ],
)
def test_bad_config_gives_one_clear_line(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_bad_override_value_is_reported_like_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"`search.num_trials`: .*integer.*'many'"):
        load_config(QUICKSTART, ["search.num_trials=many"])


@pytest.mark.parametrize(
    "args, expected",
    [
        (["search", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["search", str(QUICKSTART), "--set", "space.criteria=[taylor9]"], "unknown criterion 'taylor9'"),
        (["search", str(QUICKSTART), "--set", "space.ratio.high=1.2"], "must satisfy 0 <= ratio < 1"),
    ],
)
def test_cli_rejects_bad_input_before_any_work(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("secateurs: error: ") and expected in err[0]
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, nothing written


def test_cli_rule_matching_no_layer_stops_before_mlflow(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    code = main(["search", str(QUICKSTART), "--set", "task.dense_epochs=1", "--set", "space.rules=[{match: 'head.*', exclude: true}]"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "space.rules[0].match: 'head.*' matches no prunable group" in err
    assert "features.0, features.3, features.7, classifier.1" in err
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_error_has_no_traceback(tmp_path):
    bad = write(tmp_path, "search:\n  seed: [1]\n")
    proc = subprocess.run([sys.executable, "-m", "search.cli", "search", str(bad)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("secateurs: error: `search.seed`")
    assert not (tmp_path / "mlflow.db").exists()
