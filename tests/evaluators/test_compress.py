"""Depth and int8 in a trial: the widths are pruned, then whole blocks removed, the model fine-tuned,
and only then quantized; scores, latency and size are measured on the artifact that ships.

The model is a user's own residual MLP (tests.task_modules.ResidualMLP) on the bundled digits: no
library block class, found by tracing."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from evaluators import deploy, pruning
from evaluators.blocks import BlockError, analyse_blocks
from evaluators.deploy import INT8_FILE, check_model, check_quantization
from evaluators.quantize import OnnxRuntimeModel, QuantizationError, file_size_mb, quantized_op_counts
from evaluators.tasks import TaskConfig, make_task
from evaluators.train import FinetuneConfig, train
from evaluators.trial import (
    MeasureConfig, Reference, evaluate, measure_latencies, measure_model, promote, prune_and_finetune, prune_model,
    screen,
)
from spaces import Policy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ONNX = MeasureConfig(backend="onnxruntime", warmup=1, repeats=3)
TORCH = MeasureConfig(warmup=1, repeats=3)
SHORT = FinetuneConfig(epochs=0.1)
WIDTHS = {"stem.1": 0.25, "blocks.0.fc1": 0.5}


@pytest.fixture(scope="module")
def task():
    return make_task(TaskConfig(name="tests.task_modules:digits_residual_mlp"))


@pytest.fixture(scope="module")
def checkpoint(task, tmp_path_factory):
    torch.manual_seed(0)
    model = task.build_model()
    train(model, task.train_data, FinetuneConfig(epochs=2, lr=0.05), seed=0)
    path = tmp_path_factory.mktemp("dense") / "residual_mlp.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def dense(task, checkpoint) -> Reference:
    return Reference.from_record(evaluate(Policy(criterion="l1", ratios={}), task, checkpoint, FinetuneConfig(epochs=0), TORCH).to_dict())


def test_a_dropped_block_lowers_params_and_macs_by_exactly_that_blocks_and_leaves_the_state_dict(task, checkpoint, dense):
    blocks = {b.name: b for b in analyse_blocks(task.build_model(), task.example())[0]}
    assert list(blocks) == ["blocks.0", "blocks.1", "blocks.2"]  # a user's own residual layers, found by tracing
    metrics = evaluate(Policy(criterion="l1", ratios={}, drop_blocks=["blocks.1"]), task, checkpoint, FinetuneConfig(epochs=0), TORCH,
                       dense=dense)
    assert metrics.blocks_dropped == 1
    assert metrics.params == dense.params - blocks["blocks.1"].params
    assert metrics.macs == dense.macs - blocks["blocks.1"].macs
    model, _ = prune_model(Policy(criterion="l1", ratios={}, drop_blocks=["blocks.1"]), task, checkpoint)
    assert not any(k.startswith("blocks.1.") for k in model.state_dict()) and any(k.startswith("blocks.2.") for k in model.state_dict())
    with torch.no_grad():
        assert model(task.inputs(5)).shape == (5, 10)


def test_widths_are_pruned_first_then_blocks_and_restore_replays_both(task, checkpoint):
    policy = Policy(criterion="l1", ratios=WIDTHS, drop_blocks=["blocks.2"])
    model, _ = prune_model(policy, task, checkpoint)
    assert model.stem[1].out_features == 24 and model.blocks[0].fc1.out_features == 32  # 32 * 0.75, 64 * 0.5
    assert type(model.blocks[2]).__name__ == "DroppedBlock"
    rebuilt = pruning.restore(policy, task.build_model().eval(), task.example(), model.state_dict())
    assert set(rebuilt.state_dict()) == set(model.state_dict())
    x = task.inputs(16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_a_block_that_cannot_be_removed_is_refused_before_the_widths_change(task):
    model = task.build_model().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BlockError, match=r"block 'stem' cannot be dropped: it maps \(1, 1, 8, 8\) torch.float32 to \(1, 32\) "
                                         r"torch.float32; the identity needs the same shape and dtype; removable blocks: blocks.0, blocks.1, blocks.2"):
        pruning.apply(Policy(criterion="l1", ratios=WIDTHS, drop_blocks=["stem"]), model, task.example())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_int8_is_scored_timed_and_sized_on_the_int8_file(task, checkpoint, dense, tmp_path):
    policy = Policy(criterion="l1", ratios=WIDTHS, drop_blocks=["blocks.1"], quantization="int8")
    model, _ = prune_and_finetune(policy, task, checkpoint, SHORT)  # fine-tuned in float, then quantized
    as_float = measure_model(model, task, ONNX)
    as_int8 = measure_model(model, task, ONNX, quantization="int8", keep=tmp_path)
    shipped = tmp_path / INT8_FILE
    assert as_int8["size_mb"] == file_size_mb(shipped) < as_float["size_mb"]
    assert as_int8["quantized_ops"] == sum(quantized_op_counts(shipped).values()) > 0 and as_float["quantized_ops"] == 0
    int8_model = OnnxRuntimeModel(shipped)
    assert as_int8["accuracy"] == task.score(int8_model)["accuracy"]  # the scores are the file's own
    with torch.no_grad():
        x = task.inputs(64)
        assert not torch.allclose(int8_model(x), model(x), atol=1e-5)  # another artifact than the float model
    assert (as_int8["macs"], as_int8["params"]) == (as_float["macs"], as_float["params"])

    metrics = evaluate(policy, task, checkpoint, SHORT, ONNX, dense=dense)
    assert metrics.scores["accuracy"] == as_int8["accuracy"] and metrics.quantized_ops == as_int8["quantized_ops"]
    tags = metrics.tags()
    assert tags["secateurs.quantization"] == "int8" and tags["secateurs.execution_provider"] == "CPUExecutionProvider"
    assert tags["secateurs.int8_activations"] in ("uint8", "int8") and tags["secateurs.runtime"].startswith("onnxruntime ")


@pytest.mark.parametrize("config, runtime", [(ONNX, "onnxruntime"), (TORCH, "torch")])
def test_dynamic_int8_runs_in_onnx_runtime_and_in_torch_eager(task, checkpoint, dense, config, runtime):
    float_metrics = evaluate(Policy(criterion="l1", ratios={}), task, checkpoint, FinetuneConfig(epochs=0), config, dense=dense)
    metrics = evaluate(Policy(criterion="l1", ratios={}, quantization="int8_dynamic"), task, checkpoint, FinetuneConfig(epochs=0), config,
                       dense=dense)
    assert metrics.quantized_ops > 0 and metrics.size_mb < float_metrics.size_mb
    assert metrics.tags()["secateurs.runtime"].startswith(runtime)
    if runtime == "torch":
        assert metrics.quantized_ops == 8  # every nn.Linear: the stem, two per block, the head


def test_screening_measures_the_int8_artifact_and_promotion_scores_it_again(task, checkpoint, dense):
    policy = Policy(criterion="l1", ratios=WIDTHS, drop_blocks=["blocks.0"], quantization="int8")
    model, screened = screen(policy, task, checkpoint, ONNX, bn_batches=0, dense=dense)
    assert screened.quantized_ops > 0 and screened.blocks_dropped == 1
    final = promote(model, screened, policy, task, checkpoint, SHORT, ONNX, dense=dense)
    assert (final.size_mb, final.latency_ms) == (screened.size_mb, screened.latency_ms)
    assert final.scores["accuracy"] == measure_model(model, task, ONNX, quantization="int8")["accuracy"]  # the fine-tuned model, quantized


def test_retiming_the_frontier_times_each_policys_int8_artifact(task, checkpoint, monkeypatch):
    seen = []
    original = deploy.deployed

    def spy(model, quantization, inputs, **kwargs):
        seen.append(quantization)
        return original(model, quantization, inputs, **kwargs)

    monkeypatch.setattr(deploy, "deployed", spy)
    policies = {"dense": Policy(criterion="l1", ratios={}), "int8": Policy(criterion="l1", ratios={}, drop_blocks=["blocks.0"], quantization="int8")}
    timed = measure_latencies(policies, task, checkpoint, ONNX, rounds=2)
    assert seen == ["none", "int8"]
    assert all(np.isfinite(timed[k]["latency_ms"]) and timed[k]["onnx_max_abs_diff"] < 1e-3 for k in policies)


def test_quantization_a_backend_cannot_run_is_refused_naming_what_is_valid():
    with pytest.raises(QuantizationError, match=r"space.quantization: 'int8' cannot run with measure.backend: torch \(int8: static int8 "
                                                r".*\); valid with it: none, int8_dynamic"):
        check_quantization(["none", "int8"], "torch", "cpu")
    with pytest.raises(QuantizationError, match="'int8_dynamic' runs on the CPU .* but measure.device is cuda"):
        check_quantization(["int8_dynamic"], "torch", "cuda")
    check_quantization(["none", "int8", "int8_dynamic"], "onnxruntime", "cpu")
    with pytest.raises(QuantizationError, match="quantizes nn.Linear and nn.LSTM layers, and Sequential has none"):
        check_model(["int8_dynamic"], "torch", torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()))
    check_model(["int8_dynamic"], "onnxruntime", torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3)))  # ONNX Runtime's covers convolutions
