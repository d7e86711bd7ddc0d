"""Latency backends: eager torch (default), ONNX Runtime, and CUDA when a GPU is present."""
from __future__ import annotations

import io

import pytest
import torch

from evaluators.models import DigitsCNN
from evaluators.tasks import Task
from evaluators.trial import FinetuneConfig, MeasureConfig, evaluate, measure_latencies, measure_model
from spaces import Policy


def tiny_task() -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    return Task(model=lambda: DigitsCNN(width=8), train_data=(x, y), eval_data=(x[:40], y[:40]), num_classes=10, name="tiny")


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


class _LayoutProbe(torch.nn.Module):
    """A conv net that records, on every forward pass, whether its activations and its weights were
    channels-last (with one input channel both layouts coincide, so the input itself cannot tell)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3)
        self.conv2 = torch.nn.Conv2d(8, 8, 3)
        self.head = torch.nn.Linear(8, 10)
        self.seen = []

    @staticmethod
    def _channels_last(t):
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()

    def forward(self, x):
        hidden = self.conv1(x)
        self.seen.append((self._channels_last(hidden), self._channels_last(self.conv2.weight)))
        return self.head(self.conv2(hidden).mean(dim=(2, 3)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_times_channels_last_weights_and_inputs_then_restores_the_model(channels_last):
    task = tiny_task()
    model = _LayoutProbe().eval()
    measure_model(model, task, MeasureConfig(batch_size=8, warmup=1, repeats=3, channels_last=channels_last))
    # the warm-up and timed passes (4) ran channels-last, and only they: not the accuracy pass before them
    assert model.seen[0] == (False, False)
    assert model.seen[1:5] == [(channels_last, channels_last)] * 4
    assert all(seen == (False, False) for seen in model.seen[5:])
    assert model.conv2.weight.is_contiguous()  # what is saved and exported is unchanged


def test_channels_last_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="channels_last: applies to the torch backend; onnxruntime"):
        MeasureConfig(backend="onnxruntime", channels_last=True)
    with pytest.raises(ValueError, match=r"measure.channels_last: needs image inputs \(N, C, H, W\), but the task's inputs are int64 \(1, 12\)"):
        MeasureConfig(channels_last=True).check_inputs(torch.zeros(1, 12, dtype=torch.long))
    MeasureConfig(channels_last=True).check_inputs(torch.zeros(1, 1, 8, 8))
    MeasureConfig().check_inputs(torch.zeros(1, 12))


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
    assert metrics.latency_ms > 0 and 0 <= metrics.scores["accuracy"] <= 1
