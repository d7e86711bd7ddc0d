"""The dense checkpoint: given by the user, or trained once and cached by the task config's content."""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from evaluators.tasks import Task, TaskConfig
from evaluators.train import accuracy, train


class CheckpointError(ValueError):
    """A dense checkpoint that is missing or does not fit the task's model."""


def cache_dir() -> Path:
    """Where trained dense models are cached: ``$SECATEURS_CACHE`` or ``~/.cache/secateurs``."""
    return Path(os.environ.get("SECATEURS_CACHE") or Path.home() / ".cache" / "secateurs").expanduser()


def data_fingerprint(task: Task) -> str:
    """A digest of the training data itself, so that the same config over other data files
    (another ``data_root`` or ``$SECATEURS_DATA``) never reuses a dense model trained on the old ones."""
    digest = hashlib.sha256()
    for tensor in task.train_data():
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cached_checkpoint_path(config: TaskConfig, task: Task) -> Path:
    """Where the dense model for ``config`` trained on ``task``'s data is cached."""
    key = hashlib.sha256((config.cache_key() + data_fingerprint(task)).encode()).hexdigest()[:16]
    safe_name = config.name.replace(":", "_").replace("/", "_")
    return cache_dir() / "dense" / f"{safe_name}-{key}.pt"


def load_dense(task: Task, source: str | Path | bytes) -> nn.Module:
    """A fresh model of the task with the dense weights (loaded with ``weights_only=True``).

    ``source`` is a file path, or the file's bytes (how trials on other nodes receive it).
    """
    if isinstance(source, (bytes, bytearray)):
        path, stream = "<checkpoint bytes>", io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"task.checkpoint: file {str(path)!r} does not exist")
        stream = path
    try:
        state = torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"task.checkpoint: cannot load {str(path)!r} as a state dict: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model = task.build_model()
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"task.checkpoint: {str(path)!r} does not match the task's model {type(model).__name__}: "
            f"{' '.join(line.strip() for line in first[:3])}"
        ) from None
    model.eval()
    return model


def ensure_dense_checkpoint(config: TaskConfig, task: Task, log: Callable[[str], None] = print) -> Path:
    """The checkpoint to prune: the user's if given, else the cached one, trained now if missing."""
    if config.checkpoint:
        path = Path(config.checkpoint).expanduser().resolve()
        load_dense(task, path)  # fail before any trial if it does not fit
        return path
    path = cached_checkpoint_path(config, task)
    if path.is_file():
        try:
            load_dense(task, path)
            return path
        except CheckpointError:
            log(f"cached dense checkpoint {path} is unreadable; training it again")
    log(f"training the dense {task.name} model for {config.dense_epochs} epochs (cached at {path})")
    torch.manual_seed(config.seed)
    model = task.build_model()
    train(model, task.train_data(), epochs=config.dense_epochs, lr=config.dense_lr, batch_size=config.batch_size, seed=config.seed)
    log(f"dense model trained: test accuracy {accuracy(model, task.test_data()):.4f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        torch.save(model.state_dict(), handle)
    os.replace(handle.name, path)
    return path
