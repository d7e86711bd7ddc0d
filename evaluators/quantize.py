"""int8 quantization of the artifact a user ships, with the libraries' own quantizers, and the
measurements taken on that artifact: accuracy, latency with the runtime that runs it, file size.

- ONNX Runtime (``measure.backend: onnxruntime``): :func:`quantize_onnx` quantizes an exported ONNX
  file with ``onnxruntime.quantization``: ``static`` (weights and activations int8, activation
  ranges calibrated on batches, QDQ format, per-channel weights; what ONNX Runtime recommends for
  CNNs) or ``dynamic`` (int8 weights, activations quantized at run time; meant for MatMul-heavy
  models: on convolutions it becomes ``ConvInteger``, which ONNX Runtime runs slowly on CPUs).
- torch eager on CPU: :func:`quantize_torch_dynamic` is PyTorch's dynamic int8 of ``nn.Linear``
  and ``nn.LSTM`` (``torch.ao.quantization.quantize_dynamic``, fbgemm/x86 kernels).

:class:`OnnxRuntimeModel` runs an ONNX file in ONNX Runtime behind the ``nn.Module`` call a torch
model has, so every evaluation written for torch models (a task's accuracy, a loss, the batch
contract of :mod:`evaluators.batches`) measures the int8 artifact itself, not the float model.

>>> import tempfile
>>> from evaluators.onnx_backend import export_program, write_onnx
>>> model, x = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval(), torch.randn(8, 64)
>>> folder = Path(tempfile.mkdtemp())
>>> float_path = write_onnx(export_program(model, x), folder / "float.onnx")
>>> int8 = quantize_onnx(float_path, folder / "int8.onnx", mode="static", calibration=[x])
>>> OnnxRuntimeModel(int8)(x).shape, quantized_op_counts(int8)["QuantizeLinear"] > 0
(torch.Size([8, 4]), True)
"""
from __future__ import annotations

import contextlib
import logging
import platform
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from evaluators.batches import Batch, Calibration, Inputs, inputs_of
from evaluators.onnx_backend import onnx_session

ONNX_MODES = ("static", "dynamic")
ACTIVATION_TYPES = ("uint8", "int8")
TORCH_DYNAMIC_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.LSTM)
# ops that only a quantized ONNX graph holds
INT8_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "QLinearConv",
            "QLinearMatMul", "DynamicQuantizeLSTM")


class QuantizationError(ValueError):
    """A quantization request that cannot be carried out; the message names the setting and what is valid."""


# ---------------------------------------------------------------- ONNX Runtime


def onnx_feed(names: Sequence[str], inputs: Inputs) -> dict[str, np.ndarray]:
    """The ONNX Runtime feed for model ``inputs`` (a tensor, a tuple of positional inputs or a dict
    of keyword inputs), given the graph's input ``names`` in order.

    >>> sorted(onnx_feed(["input"], torch.zeros(2, 3)))
    ['input']
    """
    if isinstance(inputs, dict):
        values = [inputs[n] for n in names] if set(names) <= set(inputs) else list(inputs.values())
    elif isinstance(inputs, (tuple, list)):
        values = list(inputs)
    else:
        values = [inputs]
    if len(values) != len(names):
        raise QuantizationError(f"the ONNX graph takes {len(names)} inputs ({', '.join(names)}), but got {len(values)}")
    return {n: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for n, v in zip(names, values)}


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by ONNX Runtime (CPU), called like the torch model it was exported from:
    ``model(x)``, ``model(*inputs)`` or ``model(**inputs)`` return torch tensors (one output: a
    tensor; several: a tuple). It has no parameters; ``threads`` 0 lets ONNX Runtime choose.

    >>> import tempfile
    >>> from evaluators.onnx_backend import export_program, write_onnx
    >>> path = write_onnx(export_program(nn.Linear(3, 2).eval(), torch.zeros(4, 3)), Path(tempfile.mkdtemp()) / "m.onnx")
    >>> OnnxRuntimeModel(path)(torch.zeros(4, 3)).shape
    torch.Size([4, 2])
    """

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = onnx_session(self.path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    @property
    def providers(self) -> list[str]:
        """The execution providers the session runs on (e.g. ``['CPUExecutionProvider']``)."""
        return list(self.session.get_providers())

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        inputs = kwargs if kwargs else (args[0] if len(args) == 1 else args)
        outputs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, onnx_feed(self.input_names, inputs))]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def runner(self, inputs: Inputs) -> Callable[[], Any]:
        """A call that runs the session once on ``inputs`` (the feed prepared once): what to time."""
        feed = onnx_feed(self.input_names, inputs)
        return lambda: self.session.run(None, feed)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}"


def _calibration_reader(batches: Iterable[Batch], names: Sequence[str]):
    """An ``onnxruntime.quantization.CalibrationDataReader`` over batches (their inputs only)."""
    from onnxruntime.quantization import CalibrationDataReader

    class BatchReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter([onnx_feed(names, inputs_of(b)) for b in batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    return BatchReader()


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization logs a warning per model that was not pre-processed, and more."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def cpu_int8_settings() -> dict[str, Any]:
    """The int8 settings ONNX Runtime advises for this CPU (its quantizer's documentation, 2026):
    x86 without VNNI: uint8 activations and ``reduce_range`` (7-bit weights), because its U8S8
    kernels add pairs of products in 16 bits, which saturate with full 8-bit weights; x86 with
    VNNI (``avx512_vnni``, ``avx_vnni``, ``amx_int8``): uint8 activations, full range; ARM: int8
    activations, full range. ``why`` says which case applied.

    >>> sorted(cpu_int8_settings())
    ['activations', 'reduce_range', 'why']
    """
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64") or machine.startswith("arm"):
        return {"activations": "int8", "reduce_range": False, "why": f"ARM CPU ({machine})"}
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if vnni:
        return {"activations": "uint8", "reduce_range": False, "why": f"x86 CPU with VNNI ({', '.join(vnni)})"}
    return {"activations": "uint8", "reduce_range": True, "why": "x86 CPU without VNNI (or its flags could not be read)"}


def quantize_onnx(float_path: str | Path, out_path: str | Path, *, mode: str = "static",
                  calibration: Calibration | Iterable[Batch] | None = None, per_channel: bool = True,
                  activations: str | None = None, reduce_range: bool | None = None,
                  op_types: Sequence[str] | None = None) -> Path:
    """Write the int8 version of the ONNX file ``float_path`` to ``out_path`` (returned), with
    ``onnxruntime.quantization``; the float graph is first pre-processed as it recommends
    (``quant_pre_process``: shape inference and graph optimisation).

    - ``mode="static"``: QDQ format; activation ranges from ``calibration`` (a
      :class:`~evaluators.batches.Calibration` or batches, any batch form; their inputs are fed);
      ``activations`` ``uint8`` (U8S8) or ``int8`` (S8S8); weights int8, ``per_channel`` by default.
    - ``mode="dynamic"``: int8 weights, activations quantized at run time; no calibration.

    ``op_types`` limits which ONNX op types are quantized (e.g. ``["MatMul", "Gemm"]``; None: all
    that ONNX Runtime quantizes). ``reduce_range`` quantizes weights to 7 bits. Left at None,
    ``activations`` and ``reduce_range`` follow :func:`cpu_int8_settings` for this machine (record
    the resolved values with the artifact: a file quantized elsewhere may differ).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_dynamic, quantize_static

    if mode not in ONNX_MODES:
        raise QuantizationError(f"mode must be one of {', '.join(ONNX_MODES)}, but got {mode!r}")
    advised = cpu_int8_settings()
    activations = advised["activations"] if activations is None else activations
    reduce_range = advised["reduce_range"] if reduce_range is None else reduce_range
    if activations not in ACTIVATION_TYPES:
        raise QuantizationError(f"activations must be one of {', '.join(ACTIVATION_TYPES)}, but got {activations!r}")
    batches = list(calibration.batches if isinstance(calibration, Calibration) else calibration or ())
    if mode == "static" and not batches:
        raise QuantizationError("mode 'static' needs calibration batches (its activation ranges come from them); "
                                "give calibration=..., or use mode 'dynamic'")
    float_path, out_path = Path(float_path), Path(out_path)
    op_types = list(op_types) if op_types is not None else None
    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared))
        if mode == "static":
            names = [i.name for i in onnx_session(prepared).get_inputs()]
            quantize_static(str(prepared), str(out_path), _calibration_reader(batches, names), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, reduce_range=reduce_range, op_types_to_quantize=op_types,
                            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                            weight_type=QuantType.QInt8)
        else:
            quantize_dynamic(str(prepared), str(out_path), per_channel=per_channel, reduce_range=reduce_range,
                             op_types_to_quantize=op_types, weight_type=QuantType.QInt8)
    return out_path


def quantized_op_counts(path: str | Path) -> dict[str, int]:
    """How many nodes of each int8 op type (:data:`INT8_OPS`) the ONNX file holds: empty for a float model."""
    import onnx

    counts = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    return {op: counts[op] for op in INT8_OPS if counts[op]}


def file_size_mb(path: str | Path) -> float:
    """Size of the file at ``path`` in MB (10^6 bytes): the artifact a user ships."""
    return Path(path).stat().st_size / 1e6


# ---------------------------------------------------------------- torch eager (CPU)


def quantize_torch_dynamic(model: nn.Module, layer_types: Iterable[type[nn.Module]] = TORCH_DYNAMIC_TYPES) -> nn.Module:
    """A copy of ``model`` (in eval mode) whose layers of ``layer_types`` (default ``nn.Linear`` and
    ``nn.LSTM``) hold int8 weights and quantize their activations at run time: PyTorch's
    ``torch.ao.quantization.quantize_dynamic``, run by its CPU kernels (fbgemm/x86). The original
    is left as it was. Its ``state_dict`` is the int8 artifact (``measure.size_mb`` sizes it).

    PyTorch marks ``torch.ao.quantization`` deprecated in favour of ``torchao``; in torch 2.13 it
    still works, and torchao's int8 dynamic linear was 15x slower than float on this CPU (checked
    2026-11-30), so this is the one to use for CPU eager until its replacement runs as fast.
    """
    layer_types = tuple(layer_types)
    supported = (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
    unsupported = [t.__name__ for t in layer_types if not (isinstance(t, type) and issubclass(t, supported))]
    if unsupported or not layer_types:
        raise QuantizationError(f"layer_types must be some of {', '.join(t.__name__ for t in supported)}, but got "
                                f"{unsupported or 'none'}")
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as exc:  # removed in a future torch
        raise QuantizationError(f"this torch ({torch.__version__}) has no torch.ao.quantization.quantize_dynamic: {exc}") from None
    import copy

    copied = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copied, set(layer_types), dtype=torch.qint8)
