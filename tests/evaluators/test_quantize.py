"""int8 with the libraries' own quantizers: ONNX Runtime static/dynamic on the exported file, torch
dynamic for Linear/LSTM; accuracy, latency and size measured on the int8 artifact."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from evaluators import measure
from evaluators.batches import Calibration, forward, logits_of
from evaluators.onnx_backend import export_program, onnx_outputs, write_onnx
from evaluators.quantize import (OnnxRuntimeModel, QuantizationError, file_size_mb, onnx_feed, quantize_onnx,
                                 quantize_torch_dynamic, quantized_op_counts)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quadrant_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """12x12 noise images; class c (0-3) has a brighter quadrant c."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 12, 12, generator=g)
    for c in range(4):
        r, q = divmod(c, 2)
        x[y == c, :, 6 * r:6 * r + 6, 6 * q:6 * q + 6] += 1.5
    return x, y


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 4),
    )


def fit(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], steps: int = 60) -> nn.Module:
    torch.manual_seed(0)
    x, y = data
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        index = torch.randint(0, len(x), (32,))
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, batches) -> float:
    """Top-1 accuracy through the batch contract: the same code for a torch model and an ONNX Runtime one."""
    correct = total = 0
    with torch.no_grad():
        for batch in batches:
            correct += int((logits_of(forward(model, batch)).argmax(1) == batch[1]).sum())
            total += len(batch[1])
    return correct / total


@pytest.fixture(scope="module")
def trained_cnn(tmp_path_factory) -> tuple[nn.Module, Path, list, Calibration]:
    model = fit(small_cnn(), quadrant_data(1024, seed=0))
    x, y = quadrant_data(256, seed=1)
    test = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    calibration = Calibration.from_tensors(*quadrant_data(128, seed=2), batch_size=32)
    path = write_onnx(export_program(model, x[:8]), tmp_path_factory.mktemp("cnn") / "float.onnx")
    return model, path, test, calibration


def test_static_int8_cnn_accuracy_latency_and_size_are_those_of_the_int8_artifact(trained_cnn, tmp_path):
    model, float_path, test, calibration = trained_cnn
    int8_path = quantize_onnx(float_path, tmp_path / "int8.onnx", mode="static", calibration=calibration)

    ops = quantized_op_counts(int8_path)
    assert ops.get("QuantizeLinear", 0) >= 2 and ops.get("DequantizeLinear", 0) >= 4
    assert quantized_op_counts(float_path) == {}
    assert file_size_mb(int8_path) < 0.4 * file_size_mb(float_path)

    float_model, int8_model = OnnxRuntimeModel(float_path), OnnxRuntimeModel(int8_path)
    assert int8_model.providers == ["CPUExecutionProvider"]
    x = test[0][0]
    with torch.no_grad():
        assert torch.allclose(float_model(x), model(x), atol=1e-4)
    assert (int8_model(x) - float_model(x)).abs().max() > 1e-3  # it really is another model

    float_accuracy, int8_accuracy = accuracy(float_model, test), accuracy(int8_model, test)
    assert float_accuracy >= 0.85
    assert abs(int8_accuracy - float_accuracy) <= 0.05

    stats = measure.interleaved_latency_ms({"float": float_model.runner(x), "int8": int8_model.runner(x)},
                                           rounds=1, warmup=1, repeats=3)
    assert all(0 < s["latency_p10_ms"] <= s["latency_ms"] <= s["latency_p90_ms"] for s in stats.values())


@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_static_calibration_takes_any_batch_form(trained_cnn, tmp_path, activations):
    _, float_path, test, _ = trained_cnn
    bare = [batch[0] for batch in test[:2]]  # tensors, no targets
    path = quantize_onnx(float_path, tmp_path / "int8.onnx", calibration=bare, activations=activations, per_channel=False)
    assert accuracy(OnnxRuntimeModel(path), test) >= 0.8


def test_dynamic_int8_quantizes_the_matmuls_of_a_linear_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
    x = torch.randn(16, 64)
    float_path = write_onnx(export_program(model, x), tmp_path / "float.onnx")
    int8_path = quantize_onnx(float_path, tmp_path / "int8.onnx", mode="dynamic")
    ops = quantized_op_counts(int8_path)
    assert ops.get("DynamicQuantizeLinear", 0) >= 1 and ops.get("MatMulInteger", 0) >= 3
    assert file_size_mb(int8_path) < 0.4 * file_size_mb(float_path)
    with torch.no_grad():
        expected = model(x)
    got = OnnxRuntimeModel(int8_path)(x)
    error = float((got - expected).abs().max() / expected.abs().max())
    assert 0 < error < 0.05


def test_bad_quantization_settings_say_what_is_valid(trained_cnn, tmp_path):
    _, float_path, _, _ = trained_cnn
    with pytest.raises(QuantizationError, match="mode 'static' needs calibration batches"):
        quantize_onnx(float_path, tmp_path / "a.onnx")
    with pytest.raises(QuantizationError, match="mode must be one of static, dynamic, but got 'int4'"):
        quantize_onnx(float_path, tmp_path / "a.onnx", mode="int4")
    with pytest.raises(QuantizationError, match="activations must be one of uint8, int8, but got 'fp8'"):
        quantize_onnx(float_path, tmp_path / "a.onnx", mode="dynamic", activations="fp8")
    with pytest.raises(QuantizationError, match="layer_types must be some of Linear, LSTM.* but got \\['Conv2d'\\]"):
        quantize_torch_dynamic(small_cnn(), [nn.Conv2d])


def test_onnx_feed_maps_tensor_tuple_and_dict_inputs_to_graph_inputs():
    a, b = torch.zeros(2, 3), torch.ones(2, 5)
    assert set(onnx_feed(["x"], a)) == {"x"}
    feed = onnx_feed(["ids", "mask"], (a, b))
    assert feed["mask"].shape == (2, 5)
    feed = onnx_feed(["ids", "mask"], {"mask": b, "ids": a})
    assert feed["ids"].shape == (2, 3) and feed["mask"].shape == (2, 5)
    with pytest.raises(QuantizationError, match=r"the ONNX graph takes 2 inputs \(ids, mask\), but got 1"):
        onnx_feed(["ids", "mask"], a)


class TextLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 16)
        self.lstm = nn.LSTM(16, 128, num_layers=2, batch_first=True)
        self.head = nn.Sequential(nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 2))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embedding(tokens))
        return self.head(states.mean(1))


def test_torch_dynamic_int8_of_linear_and_lstm_leaves_the_original_alone():
    torch.manual_seed(0)
    model = TextLSTM().eval()
    tokens = torch.randint(0, 20, (8, 12))
    quantized = quantize_torch_dynamic(model)

    assert isinstance(model.lstm, nn.LSTM) and type(model.head[0]) is nn.Linear
    assert type(quantized.lstm).__name__ == "LSTM" and type(quantized.lstm).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert type(quantized.head[0]).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert type(quantized.embedding) is nn.Embedding  # not a layer type asked for
    assert measure.size_mb(quantized) < 0.4 * measure.size_mb(model)
    with torch.no_grad():
        expected, got = model(tokens), quantized(tokens)
    assert 0 < float((got - expected).abs().max()) < 0.05 * float(expected.abs().max()) + 0.01

    only_linear = quantize_torch_dynamic(model, [nn.Linear])
    assert isinstance(only_linear.lstm, nn.LSTM) and type(only_linear.lstm).__module__.startswith("torch.nn")
