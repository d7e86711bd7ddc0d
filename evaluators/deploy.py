"""The artifact a policy ships as, and what a trial measures on it: the task's scores, the latency
in the runtime that runs it, and its size.

A policy ships float or int8 (``Policy.quantization``). Its model is pruned and fine-tuned in
float first; quantization is applied to the fine-tuned model (post-training quantization, no
quantization-aware training). Then everything is measured on what ships:

=============  =========================================  ==============================================
quantization   ``measure.backend: torch``                 ``measure.backend: onnxruntime``
=============  =========================================  ==============================================
none           the torch model: scored, timed in eager,   the torch model scored; exported to ONNX,
               sized as its state dict                    checked against torch, timed in ONNX Runtime
int8           refused (static int8 runs in ONNX Runtime) exported, checked, quantized statically (QDQ,
                                                          activation ranges from the task's calibration
                                                          batches, :func:`~evaluators.quantize.cpu_int8_settings`);
                                                          scored, timed and sized as that int8 file
int8_dynamic   torch's dynamic int8 of Linear/LSTM (CPU): ONNX Runtime's dynamic quantizer; scored,
               scored, timed, sized as its state dict     timed and sized as that int8 file
=============  =========================================  ==============================================

>>> from evaluators.models import DigitsCNN
>>> model, x = DigitsCNN().eval(), torch.randn(8, 1, 8, 8)
>>> with deployed(model, "int8", x, backend="onnxruntime", threads=1, calibration=lambda: [x]) as artifact:
...     artifact.model(x).shape, artifact.metrics["quantized_ops"] > 0
(torch.Size([8, 10]), True)
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator

import torch
from torch import nn

from evaluators import measure
from evaluators.batches import Inputs, call
from evaluators.quantize import (
    TORCH_DYNAMIC_TYPES, OnnxRuntimeModel, QuantizationError, cpu_int8_settings, file_size_mb, quantize_onnx, quantize_torch_dynamic,
    quantized_op_counts,
)
from spaces.depth import QUANTIZATION_HELP

RUNS_ON: dict[str, tuple[str, ...]] = {  # quantization -> the measure backends that can run it
    "none": ("torch", "onnxruntime"),
    "int8": ("onnxruntime",),
    "int8_dynamic": ("torch", "onnxruntime"),
}
INT8_FILE = "model.int8.onnx"  # the quantized ONNX file a trial measures and ``pick --out`` ships
EXECUTION_PROVIDER = "CPUExecutionProvider"  # the one evaluators.onnx_backend.onnx_session runs on


def check_quantization(choices: Iterable[str], backend: str, device: str) -> None:
    """Refuse quantization choices the measure settings cannot run, in one line naming what is valid.

    >>> check_quantization(["none", "int8"], "torch", "cpu")
    Traceback (most recent call last):
    evaluators.quantize.QuantizationError: space.quantization: 'int8' cannot run with measure.backend: torch (int8: static int8 (weights and activations; activation ranges from calibration batches): ONNX Runtime); valid with it: none, int8_dynamic
    """
    for choice in choices:
        valid = [q for q, backends in RUNS_ON.items() if backend in backends]
        if backend not in RUNS_ON.get(choice, ()):
            raise QuantizationError(f"space.quantization: {choice!r} cannot run with measure.backend: {backend} ({choice}: "
                                    f"{QUANTIZATION_HELP.get(choice, 'unknown')}); valid with it: {', '.join(valid)}")
        if choice != "none" and device == "cuda":
            raise QuantizationError(f"space.quantization: {choice!r} runs on the CPU (int8 kernels of {backend}), but measure.device "
                                    f"is cuda; use measure.device: cpu, or space.quantization: [none]")


def check_model(choices: Iterable[str], backend: str, model: nn.Module) -> None:
    """Refuse torch dynamic int8 for a model with no layer it quantizes (``nn.Linear``, ``nn.LSTM``)."""
    if "int8_dynamic" in choices and backend == "torch" and not any(isinstance(m, TORCH_DYNAMIC_TYPES) for m in model.modules()):
        raise QuantizationError(f"space.quantization: 'int8_dynamic' with measure.backend: torch quantizes nn.Linear and nn.LSTM "
                                f"layers, and {type(model).__name__} has none; use measure.backend: onnxruntime (its dynamic int8 "
                                "covers convolutions too) or remove int8_dynamic")


def settings(quantization: str, backend: str) -> dict[str, str]:
    """How the artifact of a ``quantization`` runs with ``backend``, as recorded beside its metrics
    (MLflow tags ``secateurs.<key>``) and stated in the model card: the runtime and execution
    provider that time it, and for int8 the resolved format, types and weight range.

    >>> settings("none", "torch")["runtime"].startswith("torch")
    True
    """
    if backend == "onnxruntime":
        import onnxruntime

        out = {"quantization": quantization, "runtime": f"onnxruntime {onnxruntime.__version__}", "execution_provider": EXECUTION_PROVIDER}
        if quantization != "none":
            advised = cpu_int8_settings()
            static = quantization == "int8"
            out.update({
                "int8_format": "QDQ, static (activation ranges calibrated)" if static else "dynamic (activations quantized at run time)",
                "int8_activations": advised["activations"] if static else "uint8, ranges computed per run",
                "int8_weights": "int8, per channel" + (" (7-bit range: reduce_range)" if advised["reduce_range"] else ""),
                "int8_why": advised["why"],
            })
        return out
    out = {"quantization": quantization, "runtime": f"torch {torch.__version__.split('+')[0]} eager"}
    if quantization == "int8_dynamic":
        out.update({"int8_format": "torch dynamic (nn.Linear, nn.LSTM)", "int8_activations": "quantized at run time",
                    "int8_weights": "int8", "int8_engine": str(torch.backends.quantized.engine)})
    return out


@dataclasses.dataclass
class Artifact:
    """What ships, ready to measure: ``model`` (what the task's evaluation scores: the torch model,
    or the int8 file behind the ``nn.Module`` call), ``timer()`` (a context that yields one forward
    pass on the timing inputs, the thing to time), ``size_mb`` (None: the float model's own size,
    which the caller computes), ``metrics`` (``onnx_max_abs_diff`` of the float export's check,
    ``quantized_ops``), ``settings`` (see :func:`settings`) and ``path`` (the int8 ONNX file)."""

    quantization: str
    model: nn.Module
    timer: Callable[[], ContextManager[Callable[[], Any]]]
    size_mb: float | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    settings: dict[str, str] = dataclasses.field(default_factory=dict)
    path: Path | None = None


@contextlib.contextmanager
def _timed_torch(model: nn.Module, inputs: Inputs, channels_last: bool) -> Iterator[Callable[[], Any]]:
    """One eager forward pass on ``inputs``; with ``channels_last`` the weights and (image) inputs
    are channels-last while it is timed, and the weights go back to contiguous after."""
    if not channels_last:
        yield functools.partial(call, model, inputs)
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield functools.partial(call, model, inputs.contiguous(memory_format=torch.channels_last))
    finally:
        model.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def deployed(model: nn.Module, quantization: str, inputs: Inputs, *, backend: str, threads: int, channels_last: bool = False,
             calibration: Callable[[], Any] | None = None, tolerance: float = 1e-3, keep: Path | None = None) -> Iterator[Artifact]:
    """The artifact ``model`` (pruned and fine-tuned, in eval mode) ships as with ``quantization``
    and ``backend`` (see the module docstring), timed on ``inputs`` with ``threads``.
    ``calibration()`` gives the batches static int8 calibrates on (any batch form, or a
    :class:`~evaluators.batches.Calibration`); ``keep``: a folder to copy the int8 ONNX file into
    (as :data:`INT8_FILE`). Files live until the context ends."""
    if backend not in RUNS_ON.get(quantization, ()):
        check_quantization([quantization], backend, "cpu")
    described = settings(quantization, backend)
    if quantization == "none" and backend == "torch":
        yield Artifact(quantization, model, lambda: _timed_torch(model, inputs, channels_last), settings=described)
        return
    if quantization == "none":
        from evaluators.onnx_backend import onnxruntime_call

        with onnxruntime_call(model, inputs, threads=threads, tolerance=tolerance) as (run, diff):
            yield Artifact(quantization, model, lambda: contextlib.nullcontext(run), metrics={"onnx_max_abs_diff": diff},
                           settings=described)
        return
    if backend == "torch":
        quantized = quantize_torch_dynamic(model)
        layers = sum(1 for m in quantized.modules() if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic"))
        yield Artifact(quantization, quantized, lambda: _timed_torch(quantized, inputs, False), size_mb=measure.size_mb(quantized),
                       metrics={"quantized_ops": layers}, settings=described)
        return
    with tempfile.TemporaryDirectory(prefix="secateurs-int8-") as tmp:
        path, diff = _quantize_onnx(model, quantization, inputs, Path(tmp), calibration, tolerance)
        if keep is not None:
            shutil.copyfile(path, Path(keep) / INT8_FILE)
        scored = OnnxRuntimeModel(path, threads=max(1, torch.get_num_threads()))  # scoring: the trial's threads
        timed = OnnxRuntimeModel(path, threads=threads)                          # timing: measure.threads
        yield Artifact(quantization, scored, lambda: contextlib.nullcontext(timed.runner(inputs)), size_mb=file_size_mb(path),
                       metrics={"onnx_max_abs_diff": diff, "quantized_ops": sum(quantized_op_counts(path).values())},
                       settings=described, path=path)


def _quantize_onnx(model: nn.Module, quantization: str, inputs: Inputs, folder: Path, calibration: Callable[[], Any] | None,
                   tolerance: float) -> tuple[Path, float]:
    """Export ``model`` to ``folder``/model.onnx (checked against torch) and quantize it to
    ``folder``/:data:`INT8_FILE`; returns that file and the check's largest absolute difference."""
    from evaluators.onnx_backend import export_checked

    static = quantization == "int8"
    if static and calibration is None:
        raise QuantizationError("quantization 'int8' (static) needs calibration batches: pass calibration=...")
    _, diff = export_checked(model, inputs, folder / "model.onnx", tolerance=tolerance)
    path = quantize_onnx(folder / "model.onnx", folder / INT8_FILE, mode="static" if static else "dynamic",
                         calibration=calibration() if static else None)
    return path, diff
