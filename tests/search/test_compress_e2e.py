"""configs/cifar10_resnet20_compress.yaml end to end, small: widths, depth and int8 searched together
on ResNet-20 with the ONNX Runtime backend (real Ray, real MLflow on a temporary sqlite file), then
``pick --out --register`` of an int8 policy with blocks removed.

What is asserted over all trials, not the frontier: that int8 policies and policies with blocks
removed were evaluated. The frontier's membership depends on latencies timed on a shared machine
and on accuracies of models fine-tuned for a few steps, so no seed makes it certain; the sampled
policies do not depend on them (the first NSGA-II generation is seeded random sampling, and the
search asks for no more than one generation), so which trials exist is fixed by the seed.
"""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from mlflow.tracking import MlflowClient

from evaluators.deploy import INT8_FILE
from evaluators.quantize import OnnxRuntimeModel, quantized_op_counts
from evaluators.tasks import make_task
from search.config import load_config
from search.driver import run_search
from search.export import load_pruned
from search.pick import pick
from spaces import Policy
from tests.data import DATA_DIRS, data_root

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "cifar10_resnet20_compress.yaml"
# the tests share one real search (a module fixture): pytest-xdist runs them on one worker (Makefile: --dist loadgroup)
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("compress_e2e")]


@pytest.fixture(scope="module")
def search(tmp_path_factory, new_store):
    root = data_root("cifar10*.npz")
    if root is None:
        pytest.skip(f"no cifar10*.npz in {', '.join(map(str, DATA_DIRS))}")
    tmp = tmp_path_factory.mktemp("compress")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SECATEURS_CACHE", str(tmp / "cache"))
        patch.setenv("PYTHONPATH", str(ROOT))
        uri = new_store(tmp)
        config = load_config(CONFIG, [
            f"task.data_root={root}", "task.dense_epochs=2", "task.options.train_size=500", "task.options.test_size=200",
            "finetune.epochs=0.25", "measure.warmup=1", "measure.repeats=3",
            "search.num_trials=6", "search.population_size=6", "search.seed=1", "search.baselines=[uniform]",
            "search.baseline_ratios=[0.5]", f"search.storage_path={tmp / 'ray'}",
        ])
        lines: list[str] = []
        result = run_search(config, config_name="compress", tracking_uri=uri, out=lines.append)
        yield {"result": result, "uri": uri, "config": config, "lines": lines, "tmp": tmp}


def _runs(search, kind: str):
    result = search["result"]
    return MlflowClient(search["uri"]).search_runs(
        [result.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}' and tags.`secateurs.kind` = '{kind}'")


def test_widths_depth_and_int8_are_searched_together_and_measured_as_they_ship(search):
    result, client = search["result"], MlflowClient(search["uri"])
    log = "\n".join(search["lines"])
    assert "7 removable blocks (layer1.0, layer1.1, layer1.2, layer2.1, layer2.2, layer3.1, layer3.2)" in log
    assert "quantization: none, int8" in log
    runs = _runs(search, "trial") + _runs(search, "baseline")
    assert len(runs) == 7 and all(run.info.status == "FINISHED" for run in runs)
    order = [line for line in search["lines"] if "least important" in line][0].split("first: ")[1].split(", ")
    int8, dropped = [], []
    for run in runs:
        policy = Policy.from_json(Path(client.download_artifacts(run.info.run_id, "policy.json", str(search["tmp"] / run.info.run_id))).read_text())
        metrics, tags, params = run.data.metrics, run.data.tags, run.data.params
        assert params["policy.quantization"] == policy.quantization == tags["secateurs.quantization"]
        assert tags["secateurs.runtime"].startswith("onnxruntime ") and tags["secateurs.execution_provider"] == "CPUExecutionProvider"
        assert metrics["blocks_dropped"] == len(policy.drop_blocks)
        assert list(policy.drop_blocks) == order[: len(policy.drop_blocks)]  # the least important first
        if policy.quantization == "int8":
            int8.append(run)
            assert metrics["quantized_ops"] > 0 and tags["secateurs.int8_activations"] in ("uint8", "int8")
        else:
            assert metrics["quantized_ops"] == 0
        if policy.drop_blocks:
            dropped.append(run)
            assert metrics["params"] < result.dense["params"] and metrics["macs"] < result.dense["macs"]
        assert metrics["onnx_max_abs_diff"] < 1e-3  # the float export was checked against torch before quantizing
    assert int8 and dropped  # over all trials (see the module docstring)
    assert all(run.data.tags["secateurs.kind"] == "baseline" and run.data.params["policy.quantization"] == "none"
               for run in runs if run.data.tags.get("secateurs.baseline"))  # baselines: float, every block kept
    front = result.frontier
    assert len(front) and {"quantization", "blocks_dropped"} <= set(front.columns)
    for row in front.itertuples():  # the frontier's policies are the ones its trials ran
        assert Policy.from_json(row.policy).quantization == row.quantization


def test_pick_ships_the_int8_onnx_file_its_metrics_were_measured_on(search, tmp_path):
    result = search["result"]
    trials = result.trials
    both = trials[(trials["quantization"] == "int8") & (trials["blocks_dropped"] > 0)]
    row = (both if len(both) else trials[trials["quantization"] == "int8"]).iloc[0]
    picked = pick(result.parent_run_id, trial=str(int(row["trial"])), out=tmp_path / "export", register="resnet20-compressed",
                  tracking_uri=search["uri"], log=lambda line: None)
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert {"model.pt", "model.pt2", "model.onnx", INT8_FILE, "MODEL_CARD.md"} <= files
    shipped = tmp_path / "export" / INT8_FILE
    assert sum(quantized_op_counts(shipped).values()) > 0

    task = make_task(search["config"].task)
    int8_accuracy = task.score(OnnxRuntimeModel(shipped))["accuracy"]
    assert int8_accuracy == picked.final["accuracy"]  # ORT runs the shipped file and it scores what pick recorded
    n_test = len(task.eval_data[1])
    assert abs(int8_accuracy - row["accuracy"]) <= 2 / n_test  # and what the trial recorded (same fine-tune, seed, threads)
    x = task.inputs(32)
    with torch.no_grad():
        float_logits = picked.model(x)
        assert not torch.allclose(OnnxRuntimeModel(shipped)(x), float_logits, atol=1e-4)  # the int8 artifact, not the float model
        float_accuracy = task.score(picked.model)["accuracy"]
    print(f"int8 accuracy {int8_accuracy:.4f}, the same model in float {float_accuracy:.4f}, trial {row['accuracy']:.4f}")

    policy = picked.policy
    if policy.drop_blocks:  # gone from the state dict, the ONNX graph and the exported program
        saved = torch.load(tmp_path / "export" / "model.pt", weights_only=True)["state_dict"]
        for block in policy.drop_blocks:
            assert not any(k.startswith(block + ".") for k in saved)
            assert not any(i.name.startswith(block + ".") for i in onnx.load(str(tmp_path / "export" / "model.onnx")).graph.initializer)
        rebuilt = load_pruned(task, tmp_path / "export" / "model.pt")
        with torch.no_grad():
            assert torch.equal(rebuilt(x), float_logits)
            assert torch.allclose(torch.export.load(str(tmp_path / "export" / "model.pt2")).module()(x), float_logits, atol=1e-4)

    card = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert "- timed with: onnxruntime " in card and "execution provider CPUExecutionProvider, on model.int8.onnx" in card
    assert "- int8: int8: QDQ, static" in card and "no quantization-aware training" in card

    client = MlflowClient(search["uri"])
    name, version, _ = picked.registered
    assert client.get_model_version(name, version).tags["secateurs.quantization"] == "int8"
    assert INT8_FILE in {a.path for a in client.list_artifacts(picked.export_run_id)}
