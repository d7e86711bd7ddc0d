"""Ship a chosen policy: rebuild it, write deployable files, log and register it in MLflow.

Files written (staged in a temporary folder and moved into place once the export is done, so a
failure overwrites nothing):

- ``policy.json`` — the :class:`~spaces.Policy` (replayed on the dense model it rebuilds the shapes);
- ``model.pt`` — ``{"format", "policy", "state_dict", "input", "meta"}``, plain data that loads with
  ``torch.load(weights_only=True)``; :func:`load_pruned` turns it back into a module;
- ``model.pt2`` — a ``torch.export`` program (``torch.export.load(path).module()``), the batch
  dimension dynamic, and the sequence dimension of integer inputs (token ids, masks) too;
- ``model.onnx`` — one self-contained file, its outputs checked against torch with onnxruntime;
- ``model.int8.onnx`` — for a policy that ships int8 with ONNX Runtime: the quantized file its
  metrics were measured on (``model.pt``, ``model.pt2`` and ``model.onnx`` are then the float model
  it was quantized from);
- ``metrics.json`` and ``MODEL_CARD.md``.

``model.pt2`` and ``model.onnx`` are checked against the torch model on test inputs, relative to
each output's largest magnitude; one that fails its check (or cannot be exported) is left out and
named, and the files that passed are kept.

>>> model = load_pruned(task, "export/model.pt")  # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from evaluators import pruning
from evaluators.batches import batch_size_of, call
from evaluators.deploy import INT8_FILE
from evaluators.onnx_backend import call_program, export_program, flat_outputs, max_abs_diff, max_rel_diff, onnx_outputs, write_onnx
from search.records import ProductionError
from spaces import Policy

FORMAT = "secateurs.pruned-model/1"
EXPORT_FILES = ("policy.json", "model.pt", "model.pt2", "model.onnx", INT8_FILE, "metrics.json", "MODEL_CARD.md")
TASK_TAG = "secateurs.task"
MODEL_CLASS_TAG = "secateurs.model_class"


def model_identity(task_name: str, model: nn.Module) -> dict[str, str]:
    """What a registered model must agree on to take a new version: the task and the model class."""
    cls = type(model)
    return {TASK_TAG: task_name, MODEL_CLASS_TAG: f"{cls.__module__}.{cls.__qualname__}"}


# --- model.pt and load_pruned ----------------------------------------------------------------

def input_spec(inputs: Any) -> dict[str, Any]:
    """Plain data describing model inputs of one example: ``{"shape", "dtype"}`` for a tensor,
    ``{"tuple": [...]}`` or ``{"dict": {...}}`` for several.

    >>> input_spec(torch.zeros(4, 3))
    {'shape': [1, 3], 'dtype': 'float32'}
    """
    if isinstance(inputs, torch.Tensor):
        return {"shape": [1, *inputs.shape[1:]], "dtype": str(inputs.dtype).removeprefix("torch.")}
    if isinstance(inputs, dict):
        return {"dict": {str(k): input_spec(v) for k, v in inputs.items()}}
    if isinstance(inputs, (tuple, list)):
        return {"tuple": [input_spec(v) for v in inputs]}
    raise TypeError(f"model inputs must be a tensor, a tuple or a dict of tensors, but got {type(inputs).__name__}")


def inputs_from_spec(spec: Mapping[str, Any]) -> Any:
    """Zero inputs of the shape and dtype :func:`input_spec` recorded."""
    if "dict" in spec:
        return {k: inputs_from_spec(v) for k, v in spec["dict"].items()}
    if "tuple" in spec:
        return tuple(inputs_from_spec(v) for v in spec["tuple"])
    return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))


def save_weights(model: nn.Module, policy: Policy, path: str | Path, example_inputs: Any, meta: Mapping[str, str] | None = None) -> Path:
    """Write ``model.pt``: the policy and the pruned state dict, as plain data (no pickled code)."""
    path = Path(path)
    torch.save({
        "format": FORMAT,
        "policy": policy.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "input": input_spec(example_inputs),
        "meta": {str(k): str(v) for k, v in (meta or {}).items()},
    }, path)
    return path


def load_pruned(task_or_model_factory: Any, path: str | Path, example_inputs: Any = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_weights`: a fresh dense model (from a task's
    ``build_model`` or a zero-argument factory), pruned by the saved policy to get the pruned
    shapes, then loaded with the saved weights. Returns it in eval mode on the CPU.

    >>> from evaluators.models import DigitsCNN
    >>> model = load_pruned(DigitsCNN, "export/model.pt")  # doctest: +SKIP
    """
    saved = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ProductionError(f"{str(path)!r} is not a secateurs pruned model (expected format {FORMAT!r})")
    if hasattr(task_or_model_factory, "build_model"):
        model = task_or_model_factory.build_model()
    elif callable(task_or_model_factory):
        model = task_or_model_factory()
    else:
        raise TypeError(f"load_pruned needs a task (with build_model) or a model factory, but got {task_or_model_factory!r}")
    if example_inputs is None:
        example_inputs = inputs_from_spec(saved["input"])
    policy = Policy.from_dict(saved["policy"])
    try:
        pruning.restore(policy, model.eval(), example_inputs, saved["state_dict"])
    except (pruning.PruningError, RuntimeError) as exc:
        first = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
        raise ProductionError(f"{str(path)!r} does not fit {type(model).__name__} pruned by its policy: {first}") from None
    return model.eval()


# --- torch.export and ONNX -------------------------------------------------------------------

# torch.export and ONNX live in evaluators.onnx_backend (the ONNX Runtime latency backend uses them too).


# --- the export folder -------------------------------------------------------------------------

def check_out_dir(out: str | Path, force: bool) -> Path:
    """``out`` must be absent, an empty folder, or (with ``force``) a folder whose files we may replace."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ProductionError(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ProductionError(f"--out {str(out)!r} exists and is not empty; choose another directory or pass --force to replace its export files")
    return out


def stage_export(stage: Path, model: nn.Module, policy: Policy, example_inputs: Any, check_inputs: Any, *, tolerance: float,
                 meta: Mapping[str, str]) -> tuple[dict[str, float], list[str]]:
    """Write policy.json, model.pt, model.pt2 and model.onnx into ``stage`` and check that the
    programs give ``model``'s outputs on ``check_inputs`` (model inputs: a tensor, a tuple or a
    dict), relative to each output's largest magnitude, within ``tolerance``. A program that fails
    its check or cannot be exported is removed from ``stage`` and the rest kept. Returns the max
    absolute and relative differences, and one line per file left out or input dimension the
    programs fix."""
    model = model.cpu().eval()
    with torch.no_grad():
        expected = flat_outputs(call(model, check_inputs))
    (stage / "policy.json").write_text(policy.to_json() + "\n")
    save_weights(model, policy, stage / "model.pt", example_inputs, meta)
    diffs: dict[str, float] = {}
    failed: list[str] = []
    program = None
    try:
        program = export_program(model, example_inputs)
        failed += fixed_dimensions(program, example_inputs)
        torch.export.save(program, str(stage / "model.pt2"))
        with torch.no_grad():
            got = flat_outputs(call_program(torch.export.load(str(stage / "model.pt2")), check_inputs))
        _check(stage / "model.pt2", expected, got, tolerance, batch_size_of(check_inputs), diffs, failed)
    except Exception as exc:  # torch.export refusing the model: keep model.pt
        failed.append(f"model.pt2 not written: torch.export failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        (stage / "model.pt2").unlink(missing_ok=True)
    if program is None:
        failed.append("model.onnx not written: it is made from the torch.export program")
        return diffs, failed
    try:
        write_onnx(program, stage / "model.onnx")
        _check(stage / "model.onnx", expected, onnx_outputs(stage / "model.onnx", check_inputs), tolerance, batch_size_of(check_inputs), diffs, failed)
    except Exception as exc:
        failed.append(f"model.onnx not written: the ONNX export failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        (stage / "model.onnx").unlink(missing_ok=True)
    return diffs, failed


def fixed_dimensions(program: torch.export.ExportedProgram, example_inputs: Any) -> list[str]:
    """One line per input dimension asked to be dynamic that the exported program fixed (an
    ``nn.LSTM`` is unrolled over its sequence by torch.export, so its length is fixed)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    from evaluators.onnx_backend import dynamic_dims

    names = program.graph_signature.user_inputs
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    if isinstance(example_inputs, dict):
        values = list(example_inputs.values())
    else:
        values = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
    lines = []
    for name, value in zip(names, values):
        shape = getattr(placeholders.get(name), "meta", {}).get("val")
        if shape is None or not isinstance(value, torch.Tensor):
            continue
        for dim in dynamic_dims(value):
            if dim > 0 and is_concrete_int(shape.shape[dim]):
                size = int(shape.shape[dim])
                lines.append(f"model.pt2 and model.onnx take input {name!r} with dimension {dim} fixed at {size} "
                             f"(torch.export specialised it, as it does for an nn.LSTM unrolled over its sequence): pad "
                             f"shorter inputs to {size}")
    return lines


def _check(path: Path, expected: list[np.ndarray], got: list[np.ndarray], tolerance: float, examples: int,
           diffs: dict[str, float], failed: list[str]) -> None:
    kind = path.suffix.lstrip(".")
    diffs[f"{kind}_max_abs_diff"] = max_abs_diff(expected, got)
    diffs[f"{kind}_max_rel_diff"] = relative = max_rel_diff(expected, got)
    if relative > tolerance:
        path.unlink(missing_ok=True)
        failed.append(f"{path.name} not written: its outputs differ from the torch model by {relative:.3g} (relative to the "
                      f"largest output; {diffs[f'{kind}_max_abs_diff']:.3g} max abs) over {examples} test inputs, above the "
                      f"tolerance {tolerance:g} (--onnx-tolerance)")


def publish(stage: Path, out: Path) -> list[Path]:
    """Move the staged files into ``out`` (created if needed); a stale export file there that this
    export did not write (e.g. an old model.onnx, or the ``save_pretrained`` files of a Hugging Face
    model exported before) is removed, anything else is left alone."""
    from search.hf_export import PRETRAINED_FILES

    out.mkdir(parents=True, exist_ok=True)
    written = []
    staged = sorted(p.name for p in stage.iterdir() if p.is_file())
    for name in dict.fromkeys([*EXPORT_FILES, *PRETRAINED_FILES, *staged]):
        source, target = stage / name, out / name
        if source.exists():
            os.replace(source, target) if _same_device(stage, out) else shutil.move(str(source), str(target))
            written.append(target)
        elif target.is_file():
            target.unlink()
    return written


def _same_device(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def staging_dir(out: Path | None) -> tempfile.TemporaryDirectory:
    """A temporary folder beside ``out`` (same filesystem, so files move into place atomically)."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.staging-")
    return tempfile.TemporaryDirectory(prefix="secateurs-export-")


# --- MODEL_CARD.md ---------------------------------------------------------------------------

_CARD_COSTS = ("latency_ms", "latency_p10_ms", "latency_p90_ms", "size_mb", "macs", "params")


def score_columns(scores: Sequence[str]) -> list[str]:
    """Each score and its change against the dense model (``accuracy_drop`` for accuracy)."""
    return [c for q in scores for c in (q, "accuracy_drop" if q == "accuracy" else f"{q}_change")]


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{float(value):.4f}"


def model_card(*, title: str, columns: Mapping[str, Mapping[str, float]], facts: list[tuple[str, str]], policy: Policy, command: str,
               loading: list[str], scores: Sequence[str] = ("accuracy",)) -> str:
    """A short Markdown card: ``scores`` (the search's) and the costs side by side, how the model was
    made, how to load it."""
    names = list(columns)
    lines = [f"# {title}", "", "## Metrics", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for metric in [*score_columns(scores), *_CARD_COSTS]:
        lines.append(f"| {metric} | " + " | ".join(_cell(columns[n].get(metric)) for n in names) + " |")
    lines += ["", "Latency: median of timed forward passes (p10/p90 beside it) as configured in the search's "
              "`measure` section; columns measured in the same process are comparable, across runs less so.", "",
              "## How it was made", ""]
    lines += [f"- {key}: {value}" for key, value in facts]
    lines += ["", "Policy (fraction of channels removed per prunable group):", "", "```json", policy.to_json(), "```",
              "", "Command:", "", "```", command, "```", "", "## Loading", ""]
    lines += loading
    return "\n".join(lines) + "\n"


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    return path

