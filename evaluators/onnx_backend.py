"""torch.export and ONNX: the programs a pruned model is shipped as, and an ONNX Runtime latency
backend for users who deploy with it (``measure.backend: onnxruntime``)."""
from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evaluators import measure
from evaluators.prune_base import flat_tensors


@contextlib.contextmanager
def quiet_exporters():
    """torch.export/ONNX print progress, deprecation warnings and 'torchvision is not installed' lines."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_program(model: nn.Module, example_inputs: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` the model with the batch dimension dynamic where the model allows it."""
    with quiet_exporters():
        return torch.export.export(model, (example_inputs,), dynamic_shapes=({0: torch.export.Dim.AUTO},))


def flat_outputs(outputs: Any) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() for t in flat_tensors(outputs)]


def max_abs_diff(expected: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Largest absolute difference between two lists of output arrays (inf if their shapes differ)."""
    if len(expected) != len(got):
        return math.inf
    diffs = [float(np.abs(np.asarray(g, dtype=np.float64) - e).max()) if e.shape == np.shape(g) else math.inf
             for e, g in zip(expected, got)]
    return max(diffs, default=0.0)


def write_onnx(program: torch.export.ExportedProgram, path: Path) -> Path:
    """One self-contained ONNX file, input ``input``, output ``output``."""
    with quiet_exporters():
        torch.onnx.export(program, f=str(path), dynamo=True, external_data=False, verbose=False,
                          input_names=["input"], output_names=["output"])
    return path


def onnx_session(path: Path, threads: int = 0):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_outputs(path: Path, inputs: torch.Tensor) -> list[np.ndarray]:
    session = onnx_session(path)
    return list(session.run(None, {session.get_inputs()[0].name: inputs.detach().cpu().numpy()}))


class OnnxMismatchError(RuntimeError):
    """The ONNX program does not compute what the torch model computes."""


@contextlib.contextmanager
def onnxruntime_call(model: nn.Module, inputs: torch.Tensor, *, threads: int, tolerance: float = 1e-3):
    """Export ``model`` to ONNX, check its outputs against torch on ``inputs``, and yield
    ``(run, max_abs_diff)``: ``run()`` runs ONNX Runtime (CPU) on ``inputs`` once."""
    model = model.cpu().eval()
    inputs = inputs.cpu()
    with torch.no_grad():
        expected = flat_outputs(model(inputs))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_onnx(export_program(model, inputs), Path(tmp) / "model.onnx")
        session = onnx_session(path, threads)
        feed = {session.get_inputs()[0].name: inputs.numpy()}
        diff = max_abs_diff(expected, list(session.run(None, feed)))
        if diff > tolerance:
            raise OnnxMismatchError(f"ONNX outputs differ from torch by {diff:.3g} (max abs), above {tolerance:g}")
        yield (lambda: session.run(None, feed)), diff


def onnxruntime_latency_ms(model: nn.Module, inputs: torch.Tensor, *, warmup: int, repeats: int, threads: int,
                           tolerance: float = 1e-3) -> dict[str, float]:
    """Export ``model`` to ONNX, check its outputs against torch on ``inputs``, and time ONNX
    Runtime (CPU) on them: median, p10 and p90 in ms, plus ``onnx_max_abs_diff``."""
    with onnxruntime_call(model, inputs, threads=threads, tolerance=tolerance) as (run, diff):
        stats = measure.interleaved_latency_ms({0: run}, rounds=1, warmup=warmup, repeats=repeats, threads=threads)[0]
    return {**stats, "onnx_max_abs_diff": diff}
