"""The built-in tasks, thin users of :class:`evaluators.tasks.Task`: their data in memory as tensors
(sliced into batches), cross-entropy, top-1 accuracy.

- ``digits``: scikit-learn's bundled 8x8 digits; default model ``digits_cnn``.
- ``fashion_mnist``: Fashion-MNIST IDX files; default model ``fashion_cnn``.
- ``cifar10``: CIFAR-10 npz or batches; default model ``resnet20``; ``options.augment`` adds random
  crops (padding 4) and horizontal flips to the training batches.
- ``sst2``: SST-2 sentences as padded token ids; default model ``text_lstm``.
- ``hf_causal_lm`` / ``hf_text_classification``: a Hugging Face model (``task.model``: a
  ``save_pretrained`` directory, or ``task.model_options``: a config to build and train) on the SST-2
  sentences with a tokenizer trained here: perplexity, or sentiment accuracy
  (:mod:`evaluators.hf.tasks`; transformers is imported only for these).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from evaluators import datasets
from evaluators.data import random_crop_flip
from evaluators.models import MODELS, build_model
from evaluators.tasks import Task, TaskConfig

# Options each built-in task takes in ``task.options``: name -> (default, minimum). Integers, with
# a None default meaning "all" (null then allowed); a boolean default means a true/false switch.
TASK_OPTIONS: dict[str, dict[str, tuple[int | bool | None, int | None]]] = {
    "digits": {},
    "fashion_mnist": {"train_size": (None, 1), "test_size": (None, 1)},
    "cifar10": {"train_size": (None, 1), "test_size": (None, 1), "augment": (False, None)},
    "sst2": {"max_len": (50, 1), "min_count": (1, 1), "max_vocab": (20000, 3)},
}


HF_TASKS = ("hf_causal_lm", "hf_text_classification")


def check_builtin(config: TaskConfig) -> None:
    """``options`` and ``model`` of a built-in task's config: known names and valid values."""
    if config.name in HF_TASKS:
        from evaluators.hf.tasks import check_config

        check_config(config)
        return
    if config.model is not None and config.model not in MODELS:
        raise ValueError(f"model: unknown model {config.model!r}; valid: {', '.join(sorted(MODELS))}")
    valid = TASK_OPTIONS[config.name]
    for key, value in config.options.items():
        if key not in valid:
            names = ", ".join(sorted(valid)) or "none"
            raise ValueError(f"options: unknown option {key!r} for task {config.name}; valid: {names}")
        default, minimum = valid[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"options: {key} for task {config.name} must be true or false, but got {value!r}")
            continue
        if value is None and default is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            allowed = f"an integer >= {minimum}" + (" or null (all)" if default is None else "")
            raise ValueError(f"options: {key} for task {config.name} must be {allowed}, but got {value!r}")


def task_options(config: TaskConfig) -> dict[str, Any]:
    """The built-in task's options: its defaults overlaid with ``config.options``.

    >>> task_options(TaskConfig(name="sst2", options={"max_len": 32}))["max_len"], task_options(TaskConfig(name="sst2"))["min_count"]
    (32, 1)
    """
    return {**{k: default for k, (default, _) in TASK_OPTIONS[config.name].items()}, **config.options}


def _model_factory(task: str, config: TaskConfig, default: str, inputs: dict[str, Any]) -> Callable[[], nn.Module]:
    """The factory of the task's model (``config.model`` or ``default``), given the arguments in
    ``inputs`` that its constructor takes plus ``config.model_options`` (checked by name here; the
    model is checked on the data when the task is made)."""
    name = config.model or default
    parameters = inspect.signature(MODELS[name]).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = [k for k in config.model_options if k not in parameters and not takes_any]
    if unknown:
        valid = ", ".join(k for k, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL)
        raise ValueError(f"task {task}: model_options {', '.join(map(repr, unknown))} not taken by model {name!r}; valid: {valid}")
    kwargs = {k: v for k, v in inputs.items() if k in parameters or takes_any}
    return functools.partial(build_model, name, **{**kwargs, **config.model_options})


def make_digits_task(config: TaskConfig) -> Task:
    """scikit-learn's bundled 8x8 digits (1,797 images), split 80/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0 - 0.5)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    inputs = {"num_classes": 10, "in_channels": 1, "in_features": 64}
    return Task(
        name="digits",
        num_classes=10,
        model=_model_factory("digits", config, "digits_cnn", inputs),
        train_data=(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        eval_data=(torch.from_numpy(x_test), torch.from_numpy(y_test)),
    )


def _image_task(name: str, config: TaskConfig, default_model: str, train: datasets.Split, test: datasets.Split,
                augment: bool = False) -> Task:
    x_train, x_test = torch.from_numpy(train.x), torch.from_numpy(test.x)
    inputs = {"num_classes": 10, "in_channels": x_train.shape[1], "in_features": int(np.prod(x_train.shape[1:]))}
    return Task(
        name=name,
        num_classes=10,
        model=_model_factory(name, config, default_model, inputs),
        train_data=(x_train, torch.from_numpy(train.y)),
        eval_data=(x_test, torch.from_numpy(test.y)),
        train_transform=random_crop_flip if augment else None,
    )


def make_fashion_mnist_task(config: TaskConfig) -> Task:
    """Fashion-MNIST (60,000 / 10,000 28x28 grayscale images, 10 classes) from its IDX files, as
    Debian's ``dataset-fashion-mnist`` installs them; normalised, NCHW float32. Default model:
    ``fashion_cnn``. Options ``train_size`` / ``test_size`` take class-balanced subsets."""
    options = task_options(config)
    train, test, _ = datasets.load_fashion_mnist(
        datasets.resolve_data_root(config.data_root), train_size=options["train_size"], test_size=options["test_size"]
    )
    return _image_task("fashion_mnist", config, "fashion_cnn", train, test)


def make_cifar10_task(config: TaskConfig) -> Task:
    """CIFAR-10 (32x32 RGB, 10 classes) from a ``cifar10*.npz`` or ``cifar-10-batches-py/``;
    normalised by channel, NCHW float32. Default model: ``resnet20``. Options ``train_size`` /
    ``test_size`` take class-balanced subsets (the same whatever ``seed``); ``augment: true`` crops
    each training image at random from it padded by 4 and flips it horizontally half the time
    (dense training and fine-tuning batches only; evaluation and calibration see the images as they are)."""
    options = task_options(config)
    train, test, _ = datasets.load_cifar10(
        datasets.resolve_data_root(config.data_root), train_size=options["train_size"], test_size=options["test_size"]
    )
    return _image_task("cifar10", config, "resnet20", train, test, augment=options["augment"])


def make_sst2_task(config: TaskConfig) -> Task:
    """SST-2 binary sentiment from ``sst2.csv``: lowercase word tokens, a vocabulary from the train
    split (options ``min_count``, ``max_vocab``), ids padded/truncated to ``max_len``. Trains on the
    train split, tests on the test split. Default model: ``text_lstm``."""
    options = task_options(config)
    train, test, vocab, _ = datasets.load_sst2(
        datasets.resolve_data_root(config.data_root),
        max_len=options["max_len"], min_count=options["min_count"], max_vocab=options["max_vocab"],
    )
    inputs = {"num_classes": 2, "vocab_size": len(vocab), "max_len": options["max_len"], "pad_idx": vocab[datasets.PAD]}
    return Task(
        name="sst2",
        num_classes=2,
        model=_model_factory("sst2", config, "text_lstm", inputs),
        train_data=(torch.from_numpy(train.x), torch.from_numpy(train.y)),
        eval_data=(torch.from_numpy(test.x), torch.from_numpy(test.y)),
    )


def make_hf_causal_lm_task(config: TaskConfig) -> Task:
    """A Hugging Face causal LM on the SST-2 sentences, perplexity (:func:`evaluators.hf.tasks.causal_lm_task`)."""
    from evaluators.hf.tasks import causal_lm_task

    return causal_lm_task(config)


def make_hf_text_classification_task(config: TaskConfig) -> Task:
    """A Hugging Face sequence classifier on SST-2, accuracy (:func:`evaluators.hf.tasks.text_classification_task`)."""
    from evaluators.hf.tasks import text_classification_task

    return text_classification_task(config)


TASKS: dict[str, Callable[[TaskConfig], Task]] = {
    "digits": make_digits_task,
    "fashion_mnist": make_fashion_mnist_task,
    "cifar10": make_cifar10_task,
    "sst2": make_sst2_task,
    "hf_causal_lm": make_hf_causal_lm_task,
    "hf_text_classification": make_hf_text_classification_task,
}
