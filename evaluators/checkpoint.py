"""The dense checkpoint: the user's trained weights as they have them, or trained once and cached.

A user checkpoint may be a state dict (also one saved from a ``DataParallel`` /
``DistributedDataParallel`` or ``torch.compile``d model, with ``module.`` / ``_orig_mod.``
prefixes), a ``.safetensors`` file, or a training checkpoint dict that holds the state dict under
``state_dict``, ``model_state_dict``, ``model``, ``module`` or ``net`` among other keys (a
Lightning checkpoint's ``model.`` prefix is removed too). Files are read without unpickling code
(``torch.load(weights_only=True)`` or safetensors); a checkpoint that does not fit the model names
the first mismatching keys and shapes.

The cached dense model is keyed by the task config, a digest of the training data and the model's
architecture (module structure, parameter shapes and the source code of its own module classes),
so editing ``forward`` trains it again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from evaluators.measure import torch_threads
from evaluators.tasks import Task, TaskConfig
from evaluators.train import FinetuneConfig, train

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
PREFIXES = ("module.", "_orig_mod.", "model.")
SAFETENSORS_SUFFIX = ".safetensors"


class CheckpointError(ValueError):
    """A dense checkpoint that is missing, unreadable, or does not fit the task's model."""


def cache_dir() -> Path:
    """Where trained dense models are cached: ``$SECATEURS_CACHE`` or ``~/.cache/secateurs``."""
    return Path(os.environ.get("SECATEURS_CACHE") or Path.home() / ".cache" / "secateurs").expanduser()


def data_fingerprint(task: Task) -> str:
    """A digest of the training data (in memory: every byte; streamed: its kind, length and first
    batch), so that the same config over other data never reuses a dense model trained on the old."""
    return task.fingerprint()


def architecture_fingerprint(model: nn.Module) -> str:
    """A digest of the model's architecture: every module's name and class, every parameter's and
    buffer's name, shape and dtype, the source code of the model's own module classes (those
    not from torch), so that editing ``forward`` changes it, and a model's own ``config`` where it
    carries one (a Hugging Face model: every value, e.g. ``rope_theta``, not only the shapes).

    >>> architecture_fingerprint(nn.Linear(2, 3)) == architecture_fingerprint(nn.Linear(2, 3)) != architecture_fingerprint(nn.Linear(2, 4))
    True
    """
    digest = hashlib.sha256()
    classes: dict[type, None] = {}
    for name, module in model.named_modules():
        digest.update(f"{name}:{type(module).__module__}.{type(module).__qualname__};".encode())
        for cls in type(module).__mro__:
            if cls.__module__.split(".")[0] not in ("torch", "builtins"):
                classes.setdefault(cls)
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    for cls in classes:
        try:
            digest.update(inspect.getsource(cls).encode())
        except (OSError, TypeError):  # defined interactively: its structure and shapes still count
            digest.update(cls.__qualname__.encode())
    config = getattr(model, "config", None)
    if callable(getattr(config, "to_dict", None)):
        digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cached_checkpoint_path(config: TaskConfig, task: Task) -> Path:
    """Where the dense model for ``config`` trained on ``task``'s data is cached."""
    content = config.cache_key() + data_fingerprint(task) + architecture_fingerprint(task.build_model())
    key = hashlib.sha256(content.encode()).hexdigest()[:16]
    safe_name = config.name.replace(":", "_").replace("/", "_")
    return cache_dir() / "dense" / f"{safe_name}-{key}.pt"


# ---------------------------------------------------------------- reading a checkpoint


def _is_safetensors(head: bytes) -> bool:
    """safetensors files start with an 8-byte little-endian header length, then a JSON header."""
    return len(head) > 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def read_checkpoint(source: str | Path | bytes) -> Any:
    """What a checkpoint file (or its bytes) holds, read without unpickling code."""
    if isinstance(source, (bytes, bytearray)):
        label, head, stream = "<checkpoint bytes>", bytes(source[:16]), io.BytesIO(source)
    else:
        path = Path(source).expanduser()
        label = str(path)
        if not path.is_file():
            raise CheckpointError(f"task.checkpoint: file {label!r} does not exist")
        with open(path, "rb") as handle:
            head = handle.read(16)
        stream = path
    if _is_safetensors(head) or label.endswith(SAFETENSORS_SUFFIX):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(stream.getvalue() if isinstance(stream, io.BytesIO) else stream.read_bytes())
        except Exception as exc:
            raise CheckpointError(f"task.checkpoint: cannot read {label!r} as safetensors: {exc}") from None
    try:
        return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (such as {found.group(1)})" if found else ""
        raise CheckpointError(
            f"task.checkpoint: {label!r} holds pickled Python objects{what}: a whole model, or a checkpoint with objects "
            "beside the weights, which secateurs does not unpickle; save the weights instead: "
            "torch.save(model.state_dict(), path) or safetensors.torch.save_file(model.state_dict(), path)") from None
    except Exception as exc:
        raise CheckpointError(f"task.checkpoint: cannot load {label!r} as a state dict: {' '.join(str(exc).split())[:300]}") from None


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def state_dict_of(content: Any, label: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict in what a checkpoint holds: itself, or the one under a usual key of a training
    checkpoint (``state_dict``, ``model_state_dict``, ``model``, ...).

    >>> sorted(state_dict_of({"epoch": 3, "model": {"w": torch.zeros(1)}}))
    ['w']
    """
    if _is_state_dict(content):
        return dict(content)
    if isinstance(content, Mapping):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(content.get(key)):
                return dict(content[key])
        keys = ", ".join(map(str, list(content)[:8]))
        raise CheckpointError(f"task.checkpoint: {label!r} is a dict of {keys} with no state dict (expected tensors by name, or "
                              f"one under {', '.join(STATE_DICT_KEYS)})")
    raise CheckpointError(f"task.checkpoint: {label!r} holds a {type(content).__name__}; expected a state dict (tensors by name)")


def fit_to_model(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` with the prefixes that wrappers add (``module.``, ``_orig_mod.``, ``model.``) removed
    when the model's own keys do not have them.

    >>> sorted(fit_to_model({"module.weight": torch.zeros(3, 2), "module.bias": torch.zeros(3)}, nn.Linear(2, 3)))
    ['bias', 'weight']
    """
    expected = set(model.state_dict())
    state = dict(state)
    changed = True
    while changed and not set(state) & expected:
        changed = False
        for prefix in PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
                break
    return state


def mismatch(state: Mapping[str, torch.Tensor], model: nn.Module, shown: int = 3) -> str | None:
    """What keeps ``state`` from loading into ``model``: the first missing and unexpected keys and
    mismatching shapes; None when it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shapes differ", shapes)):
        if items:
            more = f" (and {len(items) - shown} more)" if len(items) > shown else ""
            parts.append(f"{label}: {', '.join(items[:shown])}{more}")
    return "; ".join(parts) or None


def load_dense(task: Task, source: str | Path | bytes) -> nn.Module:
    """A fresh model of the task with the dense weights, in eval mode.

    ``source`` is a file path, or the file's bytes (how trials on other nodes receive it).
    """
    label = "<checkpoint bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    state = state_dict_of(read_checkpoint(source), label)
    model = task.build_model()
    state = fit_to_model(state, model)
    problem = mismatch(state, model)
    if problem:
        raise CheckpointError(f"task.checkpoint: {label!r} does not match the task's model {type(model).__name__}: {problem}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = " ".join(line.strip() for line in str(exc).strip().splitlines()[:3])
        raise CheckpointError(f"task.checkpoint: {label!r} does not match the task's model {type(model).__name__}: {first}") from None
    model.eval()
    return model


# ---------------------------------------------------------------- the cached dense model


def dense_training(config: TaskConfig) -> FinetuneConfig:
    """How the dense model is trained when secateurs trains it: ``task.dense_epochs`` at
    ``task.dense_lr`` in batches of ``task.batch_size`` (SGD, cosine schedule, float32)."""
    return FinetuneConfig(epochs=config.dense_epochs, lr=config.dense_lr, batch_size=config.batch_size, amp=False)


def ensure_dense_checkpoint(config: TaskConfig, task: Task, log: Callable[[str], None] = print, *, threads: int | None = None) -> Path:
    """The checkpoint to prune: the user's if given, else the cached one, trained now if missing
    (or if ``config.retrain``). Training uses ``threads`` torch threads (as a trial does) when given,
    and logs each epoch; the optimizer is the task's ``dense_optimizer`` when it has one (SGD else).
    A task whose model comes trained (``pretrained``, e.g. a Hugging Face ``save_pretrained``
    directory) is not trained: its weights are written as the checkpoint, fresh each time."""
    if config.checkpoint:
        path = Path(config.checkpoint).expanduser().resolve()
        load_dense(task, path)  # fail before any trial if it does not fit
        return path
    path = cached_checkpoint_path(config, task)
    if getattr(task, "pretrained", False):
        log(f"using the trained weights of {config.model or task.name} as the dense model (copied to {path})")
        _write_state_dict(task.build_model(), path)
        return path
    if path.is_file() and not config.retrain:
        try:
            load_dense(task, path)
            log(f"using the cached dense model at {path} (task.retrain: true trains it again)")
            return path
        except CheckpointError:
            log(f"cached dense checkpoint {path} is unreadable; training it again")
    log(f"training the dense {task.name} model for {config.dense_epochs} epochs (cached at {path})")
    torch.manual_seed(config.seed)
    model = task.build_model()

    every = -(-config.dense_epochs // 20)  # at most about 20 lines

    def progress(epoch: int, steps: int, loss: float, seconds: float) -> None:
        if epoch % every == 0 or epoch == config.dense_epochs:
            log(f"  dense epoch {epoch}/{config.dense_epochs}: loss {loss:.4f} ({seconds:.1f} s)")

    with torch_threads(threads) if threads else contextlib.nullcontext():
        training = dataclasses.replace(dense_training(config), optimizer=getattr(task, "dense_optimizer", "sgd"))
        train(model, task.train_source, training, seed=config.seed, loss=task.loss, transform=task.train_transform,
              on_epoch=progress)
        scores = task.score(model)
    log("dense model trained: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    _write_state_dict(model, path)
    return path


def _write_state_dict(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        torch.save(model.state_dict(), handle)
    os.replace(handle.name, path)
