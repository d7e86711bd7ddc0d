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
from evaluators.batches import call, to_device
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


def dynamic_dims(tensor: torch.Tensor) -> tuple[int, ...]:
    """The dimensions an export leaves dynamic where the model allows: the batch, and the
    sequence of integer inputs of two or more dimensions (token ids, masks)."""
    if tensor.dim() >= 2 and not tensor.is_floating_point() and not tensor.is_complex():
        return (0, 1)
    return (0,)


def _dynamic(tensor: torch.Tensor) -> dict[int, Any]:
    return {dim: torch.export.Dim.AUTO for dim in dynamic_dims(tensor)}


def export_program(model: nn.Module, example_inputs: Any) -> torch.export.ExportedProgram:
    """``torch.export`` the model on ``example_inputs`` (a tensor, a tuple of positional inputs or a
    dict of keyword inputs), with the batch dimension dynamic, and for integer inputs of two or
    more dimensions (token ids, attention masks) the sequence dimension too, where the model allows it.
    Use at least two examples: torch.export specialises dimensions of size 1."""
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
        shapes: Any = {k: _dynamic(v) for k, v in kwargs.items()}
    else:
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        kwargs, shapes = {}, tuple(_dynamic(a) for a in args)
    with quiet_exporters():
        return torch.export.export(model, args, kwargs=kwargs or None, dynamic_shapes=shapes)


def call_program(program: torch.export.ExportedProgram, inputs: Any) -> Any:
    """Run an exported program's module on model inputs (tensor, tuple or dict)."""
    module = program.module() if isinstance(program, torch.export.ExportedProgram) else program
    if isinstance(inputs, dict):
        return module(**inputs)
    return module(*inputs) if isinstance(inputs, (tuple, list)) else module(inputs)


def flat_outputs(outputs: Any) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() for t in flat_tensors(outputs)]


def max_abs_diff(expected: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Largest absolute difference between two lists of output arrays (inf if their shapes differ)."""
    if len(expected) != len(got):
        return math.inf
    diffs = [float(np.abs(np.asarray(g, dtype=np.float64) - e).max()) if e.shape == np.shape(g) and e.size else
             (0.0 if e.shape == np.shape(g) else math.inf) for e, g in zip(expected, got)]
    return max(diffs, default=0.0)


def max_rel_diff(expected: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Largest absolute difference of each output relative to that output's largest magnitude
    (the absolute difference where an output is all zeros; inf if the shapes differ): logits near
    700 that differ by 1e-2 differ by 1.4e-5.

    >>> max_rel_diff([np.array([700.0, -3.0])], [np.array([700.01, -3.0])]) < 2e-5
    True
    """
    if len(expected) != len(got):
        return math.inf
    worst = 0.0
    for e, g in zip(expected, got):
        if e.shape != np.shape(g):
            return math.inf
        if not e.size:
            continue
        diff = float(np.abs(np.asarray(g, dtype=np.float64) - e).max())
        scale = float(np.abs(np.asarray(e, dtype=np.float64)).max())
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def write_onnx(program: torch.export.ExportedProgram, path: Path) -> Path:
    """One self-contained ONNX file, output ``output``; a single input is named ``input``, several
    keep the names of the model's ``forward`` arguments."""
    single = len(program.graph_signature.user_inputs) == 1
    with quiet_exporters():
        torch.onnx.export(program, f=str(path), dynamo=True, external_data=False, verbose=False,
                          input_names=["input"] if single else None, output_names=["output"])
    return path


def onnx_session(path: Path, threads: int = 0):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def session_feed(session: Any, inputs: Any) -> dict[str, np.ndarray]:
    """The ONNX Runtime feed for model inputs: a dict by name (in order when the graph names its one
    input ``input``), a tuple or a tensor in order."""
    names = [spec.name for spec in session.get_inputs()]
    if isinstance(inputs, dict) and set(inputs) == set(names):
        return {k: v.detach().cpu().numpy() for k, v in inputs.items()}
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
    return {spec.name: v.detach().cpu().numpy() for spec, v in zip(session.get_inputs(), values)}


def onnx_outputs(path: Path, inputs: Any) -> list[np.ndarray]:
    session = onnx_session(path)
    return list(session.run(None, session_feed(session, inputs)))


class OnnxMismatchError(RuntimeError):
    """The ONNX program does not compute what the torch model computes."""


def export_checked(model: nn.Module, inputs: Any, path: Path, *, threads: int = 1, tolerance: float = 1e-3) -> tuple[Any, float]:
    """Export ``model`` (moved to the CPU, eval mode) to the ONNX file ``path`` and check its outputs
    against torch on ``inputs`` (relative to each output's largest magnitude, see :func:`max_rel_diff`;
    above ``tolerance``: :class:`OnnxMismatchError`). Returns the checked session (``threads``) and
    the largest absolute difference."""
    model = model.cpu().eval()
    inputs = to_device(inputs, "cpu")
    with torch.no_grad():
        expected = flat_outputs(call(model, inputs))
    write_onnx(export_program(model, inputs), Path(path))
    session = onnx_session(Path(path), threads)
    got = list(session.run(None, session_feed(session, inputs)))
    relative = max_rel_diff(expected, got)
    if relative > tolerance:
        raise OnnxMismatchError(f"ONNX outputs differ from torch by {relative:.3g} (relative to the largest output), above {tolerance:g}")
    return session, max_abs_diff(expected, got)


@contextlib.contextmanager
def onnxruntime_call(model: nn.Module, inputs: Any, *, threads: int, tolerance: float = 1e-3):
    """Export ``model`` to ONNX, check its outputs against torch on ``inputs`` (see
    :func:`export_checked`), and yield ``(run, max_abs_diff)``: ``run()`` runs ONNX Runtime (CPU)
    on ``inputs`` once."""
    with tempfile.TemporaryDirectory() as tmp:
        session, diff = export_checked(model, inputs, Path(tmp) / "model.onnx", threads=threads, tolerance=tolerance)
        feed = session_feed(session, to_device(inputs, "cpu"))
        yield (lambda: session.run(None, feed)), diff


def onnxruntime_latency_ms(model: nn.Module, inputs: Any, *, warmup: int, repeats: int, threads: int,
                           tolerance: float = 1e-3) -> dict[str, float]:
    """Export ``model`` to ONNX, check its outputs against torch on ``inputs``, and time ONNX
    Runtime (CPU) on them: median, p10 and p90 in ms, plus ``onnx_max_abs_diff``."""
    with onnxruntime_call(model, inputs, threads=threads, tolerance=tolerance) as (run, diff):
        stats = measure.interleaved_latency_ms({0: run}, rounds=1, warmup=warmup, repeats=repeats, threads=threads)[0]
    return {**stats, "onnx_max_abs_diff": diff}
