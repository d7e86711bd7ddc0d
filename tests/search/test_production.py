"""From frontier to production: frontier/compare/pick/export/register/ui on one real tiny search."""
from __future__ import annotations

import json
import re
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from evaluators.tasks import make_task
from evaluators.train import accuracy
from search import frontier
from search.cli import main
from search.config import validate
from search.driver import run_search
from search.export import load_pruned
from search.choose import Constraints, NoFeasiblePolicyError, choose
from search.records import ProductionError, load_search
from search.compare import compare_tables, plot_compare
from search.pick import pick
from search.ui import check_ui, ui_argv
from spaces import Policy

ROOT = Path(__file__).resolve().parents[2]
# the tests share one real search (a module fixture): pytest-xdist runs them on one worker (Makefile: --dist loadgroup)
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("production")]
OBJECTIVES = list(frontier.OBJECTIVES)


@pytest.fixture(scope="module")
def search(tmp_path_factory, new_store, shared_ray):
    """One real search (Ray + MLflow on sqlite in tmp): a uniform baseline + 4 trials, dense trained for 3 epochs."""
    tmp = tmp_path_factory.mktemp("production")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SECATEURS_CACHE", str(tmp / "cache"))
        patch.setenv("PYTHONPATH", str(ROOT))
        patch.chdir(tmp)
        uri = new_store(tmp)
        config = validate({
            "task": {"dense_epochs": 3},
            "space": {"criteria": ["l1", "l2"], "ratio": {"low": 0.0, "high": 0.7, "step": 0.05}},
            "finetune": {"epochs": 0.2},
            "measure": {"warmup": 2, "repeats": 5},
            "search": {"num_trials": 4, "baseline_ratios": [0.5], "baselines": ["uniform"], "population_size": 4, "max_concurrent": 2, "seed": 1,
                       "storage_path": str(tmp / "ray")},
            "tracking": {"experiment": "production"},
        })
        result = run_search(config, config_name="tiny", tracking_uri=uri, out=lambda line: None)
        yield {"tmp": tmp, "uri": uri, "result": result, "config": config}


def _runs(search, kind: str) -> list:
    result = search["result"]
    return MlflowClient(search["uri"]).search_runs(
        [result.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}' and tags.`secateurs.kind` = '{kind}'")


def _pareto_runs(search) -> list:
    candidates = _runs(search, "trial") + _runs(search, "baseline")
    assert len(candidates) == 5
    return [r for r in candidates if r.data.tags.get("secateurs.pareto") == "true"]


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def exported(search):
    """pick -> longer fine-tune -> export (into a non-empty folder, with force) -> register, once."""
    out = search["tmp"] / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    # a model registry that something else in this process chose earlier (a notebook, another search's
    # pick) must not be where this pick registers: the search's own store is
    mlflow.set_registry_uri(f"sqlite:///{search['tmp'] / 'another-registry.db'}")
    result = pick(search["result"].parent_run_id, finetune_epochs=0.5, out=out, force=True, register="digits-pruned",
                  tracking_uri=search["uri"], command="secateurs pick ...", log=lambda line: None)
    return result


# --- frontier and compare -------------------------------------------------------------------

def test_frontier_table_csv_and_json_hold_the_pareto_tagged_runs(search, capsys, tmp_path):
    pareto = {r.info.run_id for r in _pareto_runs(search)}
    assert pareto
    csv_path, json_path = tmp_path / "f.csv", tmp_path / "f.json"
    code, out, _ = _cli(capsys, "frontier", search["result"].parent_run_id, "--tracking-uri", search["uri"],
                        "--csv", str(csv_path), "--json", str(json_path))
    assert code == 0
    table = pd.read_csv(csv_path)
    assert set(table["run_id"]) == pareto and len(table) == len(pareto)
    assert list(table["latency_ms"]) == sorted(table["latency_ms"])
    by_id = {r.info.run_id: r for r in _pareto_runs(search)}
    for _, row in table.iterrows():
        assert row["accuracy"] == pytest.approx(by_id[row["run_id"]].data.metrics["accuracy"])
    assert {row["run_id"] for row in json.loads(json_path.read_text())["rows"]} == pareto
    printed = [line for line in out.splitlines() if any(rid[:12] in line for rid in pareto)]
    assert len(printed) == len(pareto)
    assert f"{len(pareto)} on the frontier" in out

    code, out, _ = _cli(capsys, "frontier", search["result"].parent_run_id, "--all", "--tracking-uri", search["uri"])
    assert code == 0 and out.count("True") == len(pareto) and out.count("False") == 5 - len(pareto)


def test_compare_overlays_frontiers(search, capsys, tmp_path):
    record = load_search(search["result"].parent_run_id, search["uri"])
    worse = load_search(search["result"].parent_run_id, search["uri"])
    worse.run_id, worse.run_name = "0" * 32, "worse"
    worse.trials = worse.trials.assign(accuracy=worse.trials["accuracy"] - 0.5)
    summary, combined = compare_tables([record, worse])
    assert list(summary["frontier"]) == [len(record.frontier), len(record.frontier)]
    assert summary["hypervolume"].iloc[0] > summary["hypervolume"].iloc[1]
    assert set(combined.loc[combined["overall"], "search"]) == {record.label}
    assert plot_compare([record, worse], tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"

    code, out, err = _cli(capsys, "compare", record.run_id, record.run_id, "--out", str(tmp_path / "cli.png"),
                          "--tracking-uri", search["uri"])
    assert code == 0 and (tmp_path / "cli.png").is_file() and "hypervolume" in out
    assert "unlike training" not in out  # one search: nothing to set apart


# --- choosing -------------------------------------------------------------------------------

def test_pick_defaults_to_the_knee_of_the_frontier(search, capsys):
    runs = _pareto_runs(search)
    values = np.array([[r.data.metrics[m] for m in OBJECTIVES] for r in runs])
    knee = runs[frontier.knee_point(values, list(frontier.OBJECTIVES.values()))].info.run_id
    code, out, _ = _cli(capsys, "pick", search["result"].parent_run_id, "--tracking-uri", search["uri"])
    assert code == 0
    assert f"(run {knee})" in out and "knee of all" in out
    assert "rebuild and ship it" in out  # no --out/--register/--finetune-epochs: nothing rebuilt


def test_pick_with_constraints_satisfies_them(search):
    record = load_search(search["result"].parent_run_id, search["uri"])
    front = record.frontier
    bound = float(front["latency_ms"].median())
    for prefer in ("knee", "accuracy", "latency_ms", "size_mb"):
        result = pick(record.run_id, constraints=Constraints(max_latency_ms=bound), prefer=prefer, tracking_uri=search["uri"])
        assert result.trial["latency_ms"] <= bound
        feasible = front[front["latency_ms"] <= bound]
        if prefer == "accuracy":
            assert result.trial["accuracy"] == feasible["accuracy"].max()
        elif prefer != "knee":
            assert result.trial[prefer] == feasible[prefer].min()
    accurate = float(front["accuracy"].max())
    result = pick(record.run_id, constraints=Constraints(min_accuracy=accurate), tracking_uri=search["uri"])
    assert result.trial["accuracy"] == accurate


def test_impossible_constraints_name_the_binding_one(search, capsys):
    record = load_search(search["result"].parent_run_id, search["uri"])
    best = float(record.frontier["accuracy"].max())
    code, out, err = _cli(capsys, "pick", record.run_id, "--min-accuracy", f"{min(1.0, best + 0.001):.4f}",
                          "--max-size-mb", "100", "--tracking-uri", search["uri"])
    assert code == 2 and out == ""
    assert err.startswith("secateurs: error: no frontier policy satisfies") and err.count("\n") == 1
    assert "binding: --min-accuracy" in err and f"best accuracy is {best:.4g}" in err
    assert f"--max-size-mb 100 alone rules out 0 of {len(record.frontier)}" in err


def test_choose_when_only_the_combination_binds():
    table = pd.DataFrame({"accuracy": [0.90, 0.95, 0.99], "accuracy_drop": [0.09, 0.04, 0.0],
                          "latency_ms": [1.0, 2.0, 3.0], "size_mb": [1.0, 2.0, 3.0]})
    with pytest.raises(NoFeasiblePolicyError) as caught:
        choose(table, Constraints(min_accuracy=0.97, max_latency_ms=1.5))
    message = str(caught.value)
    assert "--min-accuracy 0.97 alone rules out 2 of 3" in message and "--max-latency-ms 1.5 alone rules out 2 of 3" in message
    assert "binding together" in message and "--min-accuracy (1 left without it)" in message
    assert choose(table, Constraints(max_accuracy_drop=0.05), prefer="accuracy").name == 2
    assert choose(table, prefer="size_mb").name == 0
    bent = pd.DataFrame({"accuracy": [0.5, 0.9, 0.95], "latency_ms": [1.0, 1.2, 3.0], "size_mb": [1.0, 1.2, 3.0]})
    assert choose(bent).name == 1  # the knee: nearly the best accuracy at nearly the lowest cost
    with pytest.raises(ProductionError, match="--min-accuracy must be in"):
        Constraints(min_accuracy=97)


def test_pick_bounds_speak_the_search_constraint_language_also_relative_to_dense():
    table = pd.DataFrame({"accuracy": [0.90, 0.95, 0.99], "latency_ms": [1.0, 2.0, 3.0], "size_mb": [1.0, 2.0, 3.0],
                          "macs": [100.0, 300.0, 900.0]})
    dense = {"macs": 1000.0}
    half = Constraints(where=("macs <= 0.5 * dense",))
    assert list(half.satisfied_by(table, dense)) == [True, True, False]
    assert choose(table, half, prefer="accuracy", dense=dense).name == 1
    both = Constraints(min_accuracy=0.92, where=("macs <= 0.2 * dense",))
    assert both.describe() == "--min-accuracy 0.92 and macs <= 0.2 * dense"
    with pytest.raises(NoFeasiblePolicyError) as caught:
        choose(table, both, dense=dense)
    assert "macs <= 0.2 * dense alone rules out 2 of 3 (the lowest macs is 100)" in str(caught.value)
    assert half.violations({"macs": 600.0}, dense) == ["macs <= 0.5 * dense (got 600)"]
    with pytest.raises(ProductionError, match="--where: constraint 'flops < 3' is not of the form"):
        Constraints(where=("flops < 3",))
    with pytest.raises(ProductionError, match="flops <= 3: the search recorded no metric 'flops'; it has accuracy, latency_ms"):
        choose(table, Constraints(where=("flops <= 3",)), dense=dense)


# --- rebuild, export, register --------------------------------------------------------------

def test_replaying_a_trial_reproduces_its_metrics(search):
    record = load_search(search["result"].parent_run_id, search["uri"])
    row = record.frontier.iloc[0]
    result = pick(record.run_id, trial=str(int(row["trial"])), finetune_epochs=0.2, tracking_uri=search["uri"], log=lambda line: None)
    assert result.final["params"] == row["params"] and result.final["macs"] == row["macs"]
    assert result.final["size_mb"] == pytest.approx(row["size_mb"])
    n_test = len(make_task(search["config"].task).eval_data[1])
    assert abs(result.final["accuracy"] - row["accuracy"]) <= 2 / n_test  # same fine-tune, same seed, same threads
    assert result.export_run_id is None and not result.files


def test_export_writes_every_file_and_they_agree(search, exported):
    out = exported.out_dir
    assert {p.name for p in out.iterdir()} == {"notes.txt", "policy.json", "model.pt", "model.pt2", "model.onnx",
                                                "metrics.json", "MODEL_CARD.md"}
    assert (out / "notes.txt").read_text() == "mine"  # --force replaces export files only
    task = make_task(search["config"].task)
    x_test, y_test = task.eval_data

    saved = torch.load(out / "model.pt", weights_only=True)
    assert Policy.from_dict(saved["policy"]) == exported.policy == Policy.from_json((out / "policy.json").read_text())
    assert set(saved["state_dict"]) == set(exported.model.state_dict())
    rebuilt = load_pruned(task, out / "model.pt")
    from evaluators.models import DigitsCNN

    rebuilt_from_factory = load_pruned(DigitsCNN, out / "model.pt")
    with torch.no_grad():
        reference = exported.model(x_test)
        assert torch.equal(rebuilt(x_test), reference)
        assert torch.equal(rebuilt_from_factory(x_test), reference)
        assert torch.allclose(torch.export.load(str(out / "model.pt2")).module()(x_test), reference, atol=1e-5)
    assert accuracy(rebuilt, (x_test, y_test)) == exported.final["accuracy"]

    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"input": x_test.numpy()})[0]
    assert np.abs(onnx_out - reference.numpy()).max() < 1e-4
    assert exported.check_diffs["onnx_max_abs_diff"] < 1e-4 and exported.check_diffs["onnx_max_rel_diff"] < 1e-4

    card = (out / "MODEL_CARD.md").read_text()
    assert search["result"].parent_run_id in card and exported.trial["run_id"] in card
    assert f"{exported.final['accuracy']:.4f}" in card and "digits-pruned" in card and "secateurs pick" in card
    assert "- measured on: cpu, torch eager, batch" in card  # the runtime the latencies came from
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["accuracy"] == exported.final["accuracy"]
    trial_steps = _runs(search, "trial")[0].data.metrics["finetune_steps"]
    assert exported.final["finetune_steps"] > trial_steps  # 0.5 epochs instead of the search's 0.2


def test_registered_alias_reproduces_the_reported_accuracy(search, exported):
    client = MlflowClient(search["uri"], registry_uri=search["uri"])
    export_run = client.get_run(exported.export_run_id)
    assert export_run.data.tags["secateurs.kind"] == "export"
    assert export_run.data.tags["mlflow.parentRunId"] == search["result"].parent_run_id
    assert export_run.info.status == "FINISHED"
    assert export_run.data.metrics["accuracy"] == pytest.approx(exported.final["accuracy"])
    name, version, alias = exported.registered
    assert (name, alias) == ("digits-pruned", "candidate")
    registered = client.get_registered_model(name)
    assert registered.tags == {"secateurs.task": "digits", "secateurs.model_class": "evaluators.models.DigitsCNN"}
    assert str(client.get_model_version_by_alias(name, alias).version) == version

    mlflow.set_tracking_uri(search["uri"])
    mlflow.set_registry_uri(search["uri"])
    loaded = mlflow.pytorch.load_model(f"models:/{name}@{alias}")
    x_test, y_test = make_task(search["config"].task).eval_data
    with torch.no_grad():
        predicted = loaded(x_test).argmax(dim=1)
    assert (predicted == y_test).sum().item() / len(y_test) == exported.final["accuracy"]


# --- bad input ------------------------------------------------------------------------------

def test_bad_inputs_are_one_line_errors_and_write_nothing(search, exported, capsys, tmp_path):
    client = MlflowClient(search["uri"], registry_uri=search["uri"])
    search_id = search["result"].parent_run_id
    uri = ["--tracking-uri", search["uri"]]
    exports_before = len(_runs(search, "export"))

    def fails(*argv: str, match: str) -> str:
        code, out, err = _cli(capsys, *argv)
        assert code == 2 and out == "", (code, out, err)
        assert err.startswith("secateurs: error: ") and err.count("\n") == 1 and match in err, err
        return err

    fails("pick", "f" * 32, *uri, match=f"run '{'f' * 32}' not found")
    fails("frontier", "nope", *uri, match="not found")
    trial_id = _runs(search, "trial")[0].info.run_id
    fails("pick", trial_id, *uri, match=f"is not a search (tag secateurs.kind=trial); its search run is {search_id}")
    fails("frontier", search_id, "--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}", match="no MLflow store")
    assert not (tmp_path / "missing.db").exists()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "model.pt").write_text("keep me")
    fails("pick", search_id, "--out", str(busy), *uri, match="exists and is not empty")
    assert [p.name for p in busy.iterdir()] == ["model.pt"] and (busy / "model.pt").read_text() == "keep me"

    client.create_registered_model("taken", tags={"secateurs.task": "digits", "secateurs.model_class": "evaluators.models.MLP"})
    fails("pick", search_id, "--register", "taken", "--out", str(tmp_path / "fresh"), *uri,
          match="'taken': that registered model holds a different model (task digits, model class evaluators.models.MLP)")
    assert not (tmp_path / "fresh").exists()
    assert client.search_model_versions("name = 'taken'") == []
    fails("pick", search_id, "--register", "digits-pruned", "--alias", "latest", *uri, match="reserved")
    fails("pick", search_id, "--alias", "production", *uri, match="--alias needs --register")
    assert len(_runs(search, "export")) == exports_before


def test_an_onnx_file_that_disagrees_with_torch_is_left_out_and_the_rest_shipped(search, monkeypatch, tmp_path):
    import search.export as export_module

    real = export_module.onnx_outputs
    # 5% of each output's largest magnitude: far above the relative tolerance
    monkeypatch.setattr(export_module, "onnx_outputs",
                        lambda path, inputs: [o + 0.05 * np.abs(o).max() for o in real(path, inputs)])
    lines: list[str] = []
    result = pick(search["result"].parent_run_id, out=tmp_path / "out", tracking_uri=search["uri"], log=lines.append)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"policy.json", "model.pt", "model.pt2", "metrics.json", "MODEL_CARD.md"}
    warning = next(line for line in lines if "model.onnx not written" in line)
    assert re.search(r"differ from the torch model by 0.05 \(relative to the largest output; .* max abs\) over \d+ test inputs, "
                     r"above the tolerance 0.0001", warning)
    assert warning.removeprefix("warning: ") in result.warnings and "model.onnx not written" in (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert result.check_diffs["pt2_max_rel_diff"] < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # staging folder removed


def test_ui_serves_the_store_and_stops_on_ctrl_c(search):
    with pytest.raises(ProductionError, match="already a server"):
        check_ui("http://127.0.0.1:5000", "127.0.0.1", 5000)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(ProductionError, match="choose another --port"):
            check_ui(search["uri"], "127.0.0.1", port)
    assert ui_argv(search["uri"], port=5001)[2:9] == ["mlflow", "ui", "--backend-store-uri", search["uri"], "--host", "127.0.0.1", "--port"]

    process = subprocess.Popen([sys.executable, "-m", "search.cli", "ui", "--port", str(port), "--tracking-uri", search["uri"]],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert f"http://127.0.0.1:{port}" in process.stdout.readline() + process.stdout.readline()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/runs/get?run_id={search['result'].parent_run_id}")
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    body = json.loads(response.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        assert body["run"]["info"]["run_id"] == search["result"].parent_run_id
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def test_model_card_names_the_runtime_the_latency_was_timed_with():
    from evaluators.trial import MeasureConfig
    from search.pick import runtime_label

    assert runtime_label(MeasureConfig()) == "torch eager"
    assert runtime_label(MeasureConfig(backend="onnxruntime")) == "ONNX Runtime (model.onnx)"
    assert "model.to(memory_format=torch.channels_last)" in runtime_label(MeasureConfig(channels_last=True))
