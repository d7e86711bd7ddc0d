"""Latency backends: eager torch (default), ONNX Runtime, and CUDA when a GPU is present."""
from __future__ import annotations

import io

import pytest
import torch

from evaluators.models import DigitsCNN
from evaluators.tasks import TensorTask
from evaluators.trial import FinetuneConfig, MeasureConfig, evaluate, measure_latencies, measure_model
from spaces import Policy


def tiny_task() -> TensorTask:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    return TensorTask("tiny", 10, lambda: DigitsCNN(width=8), (x, y), (x[:40], y[:40]))


def test_onnxruntime_backend_checks_outputs_and_times_the_onnx_program():
    torch.manual_seed(0)
    task = tiny_task()
    model = task.build_model().eval()
    result = measure_model(model, task, MeasureConfig(batch_size=8, warmup=1, repeats=5, backend="onnxruntime"))
    assert 0 <= result["onnx_max_abs_diff"] < 1e-3
    assert 0 < result["latency_p10_ms"] <= result["latency_ms"] <= result["latency_p90_ms"]


def test_onnxruntime_backend_times_several_policies_together():
    torch.manual_seed(0)
    task = tiny_task()
    model = task.build_model()
    checkpoint = io.BytesIO()
    torch.save(model.state_dict(), checkpoint)
    policies = {"dense": Policy(criterion="l1", ratios={}), "pruned": Policy(criterion="l1", ratios={"features.0": 0.5})}
    stats = measure_latencies(policies, task, checkpoint.getvalue(), MeasureConfig(batch_size=8, warmup=1, repeats=3, backend="onnxruntime"), rounds=2)
    assert set(stats) == {"dense", "pruned"}
    for values in stats.values():
        assert 0 <= values["onnx_max_abs_diff"] < 1e-3
        assert 0 < values["latency_p10_ms"] <= values["latency_ms"] <= values["latency_p90_ms"]


def test_onnxruntime_needs_the_cpu():
    with pytest.raises(ValueError, match="backend: onnxruntime times on the CPU"):
        MeasureConfig(backend="onnxruntime", device="cuda")
    with pytest.raises(ValueError, match="backend: must be one of torch, onnxruntime, but got 'tensorrt'"):
        MeasureConfig(backend="tensorrt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trial_on_cuda_with_amp(tmp_path):
    task = tiny_task()
    checkpoint = tmp_path / "dense.pt"
    torch.save(task.build_model().state_dict(), checkpoint)
    metrics = evaluate(Policy("l1", {"features.3": 0.5}), task, checkpoint, FinetuneConfig(epochs=1, amp=True),
                       MeasureConfig(device="cuda", batch_size=8, warmup=2, repeats=5))
    assert metrics.latency_ms > 0 and 0 <= metrics.accuracy <= 1
