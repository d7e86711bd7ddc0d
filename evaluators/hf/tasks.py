"""Text tasks for Hugging Face models, on the sentences of SST-2 (``sst2.csv``) with a tokenizer
trained here (the ``tokenizers`` library; nothing is downloaded):

- a causal language model (``make_causal_lm_task``): the train sentences, tokenized and packed into
  blocks of ``seq_len`` tokens, to train on; the test sentences, packed alike, for held-out perplexity;
- a sequence classifier (``make_classifier_task``): SST-2 sentiment, sentences padded to ``seq_len``,
  accuracy on the test split.

Batches are dicts (:mod:`evaluators.batches`): ``{"input_ids", "labels"}`` for the language model,
``{"input_ids", "attention_mask", "labels"}`` for the classifier. Each task has ``loss(model, batch)``
and ``evaluate(model, batches) -> {"perplexity": ...}`` / ``{"accuracy": ...}``.

The model is a ``save_pretrained`` directory (``task.model``, with its tokenizer saved beside it:
its weights are the dense model) or, when that is null, a model with fresh weights built from
``task.model_options`` (a Hugging Face config dict: ``{"model_type": "llama", "hidden_size": 64, ...}``)
that secateurs trains as the dense model. Causal LMs are built with ``use_cache: false`` (training,
evaluation and timing run whole sequences; a saved model gets the cache back for ``generate``).

In a config these are the built-in tasks ``hf_causal_lm`` and ``hf_text_classification``
(:func:`causal_lm_task`, :func:`text_classification_task`: :class:`HFTask`, a
:class:`~evaluators.tasks.Task` with the tokenizer beside it); :class:`HFTextTask` is the same data
and model for direct use (training loops, benchmarks).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from evaluators import datasets
from evaluators.batches import (CALIBRATION_SAMPLES, Batch, Calibration, batch_size_of, cross_entropy_loss, forward,
                                logits_of, targets_of, to_device)
from evaluators.hf.models import HFModelError, build_model, family_of, load_model, read_config
from evaluators.tasks import Task, TaskConfig

IGNORE_INDEX = -100
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
TOKENIZER_KINDS = ("bpe", "word")

DEFAULT_LM_CONFIG: dict[str, Any] = {  # a tiny Llama with grouped-query attention (8 query / 4 key-value heads)
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 128,
}
DEFAULT_CLASSIFIER_CONFIG: dict[str, Any] = {  # a tiny BERT encoder
    "model_type": "bert", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 4, "max_position_embeddings": 128,
}
# options of both tasks: name -> default (the model: task.model, a save_pretrained directory, or task.model_options)
TASK_OPTIONS: dict[str, Any] = {
    "seq_len": 64,        # tokens per block (language model) or per padded sentence (classifier)
    "vocab_size": 2000,   # size of the tokenizer trained on the train sentences
    "tokenizer": "bpe",   # bpe | word
    "train_size": None,   # first N train sentences (null: all)
    "test_size": None,    # first N test sentences (null: all)
}


def train_tokenizer(texts: list[str], vocab_size: int = 2000, kind: str = "bpe") -> Any:
    """A fast tokenizer trained on ``texts`` (BPE or word-level, whitespace pre-tokenized) with
    ``<pad>``, ``<unk>``, ``<s>`` and ``</s>``; each text is encoded as ``<s> ... </s>``.

    >>> tok = train_tokenizer(["a good film", "a bad film"], vocab_size=50, kind="word")
    >>> tok.convert_ids_to_tokens(tok("a good film")["input_ids"])
    ['<s>', 'a', 'good', 'film', '</s>']
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in TOKENIZER_KINDS:
        raise HFModelError(f"options.tokenizer: must be one of {', '.join(TOKENIZER_KINDS)}, but got {kind!r}")
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise HFModelError(f"options.vocab_size: must be >= {len(SPECIAL_TOKENS) + 1}, but got {vocab_size}")
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    else:
        tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tokenizer.token_to_id("<s>")), ("</s>", tokenizer.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def pack(ids: list[list[int]], seq_len: int) -> torch.Tensor:
    """Token id lists joined end to end and cut into blocks of ``seq_len`` (the remainder is dropped).

    >>> pack([[1, 2, 3], [4, 5], [6, 7, 8]], 3).tolist()
    [[1, 2, 3], [4, 5, 6]]
    """
    flat = torch.tensor([t for row in ids for t in row], dtype=torch.long)
    blocks = len(flat) // seq_len
    return flat[: blocks * seq_len].view(blocks, seq_len)


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy: the logits at position ``t`` predict ``labels[t + 1]``
    (``-100`` labels are ignored)."""
    logits = logits_of(forward(model, batch))
    labels = targets_of(batch)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def _evaluated(model: nn.Module, batches: Iterator[Batch] | list[Batch]) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Each batch (on the model's device) with the model's logits for it: eval mode, no gradients,
    the model's training mode restored afterwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                batch = to_device(batch, device)
                yield batch, logits_of(forward(model, batch))
    finally:
        model.train(was_training)


def perplexity(model: nn.Module, batches: Iterator[Batch] | list[Batch]) -> dict[str, float]:
    """Held-out perplexity ``exp(mean next-token NLL)`` over every predicted token of ``batches``,
    and that mean NLL as ``loss``; the model runs in eval mode without gradients."""
    total, tokens = 0.0, 0
    for batch, logits in _evaluated(model, batches):
        labels = targets_of(batch)[:, 1:].reshape(-1)
        total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels,
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((labels != IGNORE_INDEX).sum())
    if not tokens:
        raise ValueError("perplexity needs at least one batch with a token to predict")
    return {"perplexity": math.exp(total / tokens), "loss": total / tokens}


def accuracy(model: nn.Module, batches: Iterator[Batch] | list[Batch]) -> dict[str, float]:
    """Share of examples whose arg-max logit is the label; the model runs in eval mode without gradients."""
    correct, seen = 0, 0
    for batch, logits in _evaluated(model, batches):
        correct += int((logits.argmax(-1) == targets_of(batch)).sum())
        seen += batch_size_of(batch)
    if not seen:
        raise ValueError("accuracy needs at least one batch")
    return {"accuracy": correct / seen}


@dataclasses.dataclass
class HFTextTask:
    """A Hugging Face model and dict-batch text data, for training, calibration, evaluation and timing.

    ``data`` holds the tensors of each split (``{"train": {"input_ids": ..., "labels": ...}, "test": ...}``);
    ``metric`` / ``mode`` name what :meth:`evaluate` returns and which way is better.

    >>> ids = torch.arange(12).view(3, 4)
    >>> t = HFTextTask("toy", lambda: None, None, {"train": {"input_ids": ids, "labels": ids}, "test": {"input_ids": ids,
    ...                "labels": ids}}, 4, causal_lm_loss, perplexity, "perplexity", "min")
    >>> [b["input_ids"].shape[0] for b in t.test_batches(2)]
    [2, 1]
    """

    name: str
    model_factory: Callable[[], PreTrainedModel]
    tokenizer: Any
    data: dict[str, dict[str, torch.Tensor]]
    seq_len: int
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module, Any], dict[str, float]]
    metric: str
    mode: str  # "min" or "max"
    head: str = "base"        # the head class the factory builds (a key of evaluators.hf.models.HEADS)
    pretrained: bool = False  # the factory loads trained weights (task.model): the dense model as it is

    def build_model(self) -> PreTrainedModel:
        return self.model_factory()

    def _batches(self, split: str, batch_size: int, shuffle: bool, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, but got {batch_size}")
        tensors = self.data[split]
        n = len(next(iter(tensors.values())))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            yield {k: v[rows] for k, v in tensors.items()}

    def train_batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The train split in batches (shuffled by ``seed``)."""
        return self._batches("train", batch_size, shuffle, seed)

    def test_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """The held-out split in batches, in order."""
        return self._batches("test", batch_size, False, 0)

    def calibration(self, samples: int = CALIBRATION_SAMPLES, batch_size: int = 32, seed: int = 0) -> Calibration:
        """``samples`` train examples (shuffled by ``seed``) with this task's loss, for data-dependent criteria."""
        return Calibration.from_batches(self.train_batches(batch_size, seed=seed), self.loss, samples=samples)

    def example_inputs(self, batch_size: int = 1, seq_len: int | None = None) -> dict[str, torch.Tensor]:
        """Model inputs of ``batch_size`` x ``seq_len`` tokens (default: the task's) to time and export with."""
        seq_len = seq_len or self.seq_len
        ids = self.data["test"]["input_ids"]
        rows = ids[torch.arange(batch_size) % len(ids)]
        if seq_len > rows.shape[1]:
            rows = rows.repeat(1, math.ceil(seq_len / rows.shape[1]))
        inputs = {"input_ids": rows[:, :seq_len].contiguous()}
        if "attention_mask" in self.data["test"]:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return inputs


    def to_task(self, *, num_classes: int | None = None, eval_batch_size: int = 64) -> HFTask:
        """This model and data as the :class:`~evaluators.tasks.Task` a search runs (train split to
        train and calibrate on, test split to evaluate; ``{metric: mode}`` its objective)."""
        return HFTask(model=self.model_factory, train_data=self.data["train"], eval_data=self.data["test"], loss=self.loss,
                      evaluate=self.evaluate, objectives={self.metric: self.mode}, num_classes=num_classes, name=self.name,
                      eval_batch_size=eval_batch_size, tokenizer=self.tokenizer, seq_len=self.seq_len, head=self.head,
                      pretrained=self.pretrained)


@dataclasses.dataclass
class HFTask(Task):
    """A :class:`~evaluators.tasks.Task` whose model is a Hugging Face ``PreTrainedModel``, with what
    saving it needs: the ``tokenizer`` (saved beside a pruned model by ``pick --out``), the sequence
    length batches and timing use, the ``head`` class, and whether the factory loads trained weights
    (``pretrained``: the dense model is those weights, not trained again). Dense training uses
    ``dense_optimizer`` (AdamW: transformers train badly with SGD).

    >>> ids = torch.arange(12).view(3, 4)
    >>> t = HFTask(model=lambda: None, train_data={"input_ids": ids, "labels": ids}, eval_data={"input_ids": ids, "labels": ids},
    ...            loss=causal_lm_loss, evaluate=perplexity, objectives={"perplexity": "min"}, seq_len=4)
    >>> t.inputs(2)["input_ids"].shape
    torch.Size([2, 4])
    """

    tokenizer: Any = None
    seq_len: int = 0
    head: str = "base"
    pretrained: bool = False
    dense_optimizer: str = "adamw"


def fit(model: nn.Module, task: HFTextTask, *, epochs: float = 1.0, lr: float = 1e-3, batch_size: int = 32,
        seed: int = 0, weight_decay: float = 0.0) -> list[float]:
    """Train ``model`` on the task's train split with AdamW for ``epochs`` (a fraction runs part of one),
    linear learning-rate decay; returns the loss of every step."""
    torch.manual_seed(seed)
    n = len(task.data["train"]["input_ids"])
    steps = max(1, math.ceil(epochs * math.ceil(n / batch_size)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        for batch in task.train_batches(batch_size, seed=seed + epoch):
            loss = task.loss(model, to_device(batch, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if len(losses) >= steps:
                break
        epoch += 1
    model.eval()
    return losses


# ------------------------------------------------------------------ factories from a TaskConfig

def task_options(config: TaskConfig) -> dict[str, Any]:
    """The task's options (defaults overlaid with ``config.options``), checked."""
    unknown = sorted(set(config.options) - set(TASK_OPTIONS))
    if unknown:
        raise HFModelError(f"options: unknown option(s) {', '.join(map(repr, unknown))} for task {config.name}; "
                           f"valid: {', '.join(TASK_OPTIONS)}")
    options = {**TASK_OPTIONS, **config.options}
    if options["tokenizer"] not in TOKENIZER_KINDS:
        raise HFModelError(f"options.tokenizer: must be one of {', '.join(TOKENIZER_KINDS)}, but got {options['tokenizer']!r}")
    for key in ("seq_len", "vocab_size"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise HFModelError(f"options.{key}: must be an integer >= 2, but got {value!r}")
    for key in ("train_size", "test_size"):
        value = options[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise HFModelError(f"options.{key}: must be an integer >= 1 or null (all), but got {value!r}")
    return options


def _sentences(config: TaskConfig, options: dict[str, Any]) -> dict[str, tuple[list[str], Any]]:
    path = datasets.find_sst2(datasets.resolve_data_root(config.data_root), config.name)
    rows = datasets.read_sst2_csv(path, config.name)
    train, test = rows["train"], rows["test"]
    n_train, n_test = options["train_size"], options["test_size"]
    return {"train": (train[0][:n_train], train[1][:n_train]), "test": (test[0][:n_test], test[1][:n_test])}


def _model_and_tokenizer(config: TaskConfig, options: dict[str, Any], default: dict[str, Any], head: str,
                         texts: list[str], **overrides: Any) -> tuple[Callable[[], PreTrainedModel], Any, Any]:
    """The model factory, the tokenizer and the model's config; fails now on a bad model or sequence length.
    Fresh models are built from ``default`` overlaid with ``task.model_options``, or from ``task.model_options``
    alone when it names a ``model_type``."""
    causal = head == "causal_lm"
    if config.model is not None:
        directory = Path(config.model).expanduser()
        hf_config = read_config(directory)
        if not (directory / "tokenizer.json").is_file() and not (directory / "tokenizer_config.json").is_file():
            raise HFModelError(f"task.model: {str(directory)!r} has no tokenizer (tokenizer.json); save the tokenizer "
                               "the model was trained with beside it (tokenizer.save_pretrained(dir))")
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)

        def factory() -> PreTrainedModel:
            model = load_model(directory, head, **({"num_labels": overrides["num_labels"]} if "num_labels" in overrides else {}))
            if causal:
                model.config.use_cache = False
            return model
    else:
        values = {**default, **config.model_options} if not config.model_options.get("model_type") else dict(config.model_options)
        family_of(values)
        tokenizer = train_tokenizer(texts, options["vocab_size"], options["tokenizer"])
        extra = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, **overrides}
        if family_of(values).causal:
            extra.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        if causal and "use_cache" not in values:
            extra["use_cache"] = False
        hf_config = build_model(values, head, **extra).config  # fails now if the config is not valid

        def factory() -> PreTrainedModel:
            torch.manual_seed(config.seed)
            return build_model(values, head, **extra)
    model_config = hf_config
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and options["seq_len"] > limit:
        raise HFModelError(f"options.seq_len: {options['seq_len']} is above the model's max_position_embeddings ({limit}); "
                           f"use seq_len <= {limit}")
    return factory, tokenizer, model_config


def make_causal_lm_task(config: TaskConfig) -> HFTextTask:
    """A causal language model on the SST-2 sentences: perplexity (lower is better) on the test
    sentences. Name it in a config as ``task.name: evaluators.hf.tasks:make_causal_lm_task``."""
    options = task_options(config)
    sentences = _sentences(config, options)
    factory, tokenizer, _ = _model_and_tokenizer(config, options, DEFAULT_LM_CONFIG, "causal_lm", sentences["train"][0])
    data = {}
    for split, (texts, _) in sentences.items():
        blocks = pack(tokenizer(texts)["input_ids"], options["seq_len"])
        if not len(blocks):
            raise HFModelError(f"task {config.name}: the {split} sentences give fewer than seq_len={options['seq_len']} tokens")
        data[split] = {"input_ids": blocks, "labels": blocks}
    return HFTextTask(config.name, factory, tokenizer, data, options["seq_len"], causal_lm_loss, perplexity, "perplexity", "min",
                      head="causal_lm", pretrained=config.model is not None)


def make_classifier_task(config: TaskConfig) -> HFTextTask:
    """SST-2 sentiment with a sequence classifier (BERT by default): accuracy (higher is better) on the
    test split. Name it in a config as ``task.name: evaluators.hf.tasks:make_classifier_task``."""
    options = task_options(config)
    sentences = _sentences(config, options)
    factory, tokenizer, _ = _model_and_tokenizer(config, options, DEFAULT_CLASSIFIER_CONFIG, "sequence_classification",
                                                 sentences["train"][0], num_labels=2)
    data = {}
    for split, (texts, labels) in sentences.items():
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=options["seq_len"], return_tensors="pt")
        data[split] = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                       "labels": torch.as_tensor(labels, dtype=torch.long)}
    return HFTextTask(config.name, factory, tokenizer, data, options["seq_len"], cross_entropy_loss, accuracy, "accuracy", "max",
                      head="sequence_classification", pretrained=config.model is not None)


# ------------------------------------------------------------------ the built-in tasks of a search

def causal_lm_task(config: TaskConfig) -> HFTask:
    """Built-in task ``hf_causal_lm``: :func:`make_causal_lm_task` as a search's :class:`HFTask`
    (objective ``perplexity: min`` on the held-out sentences)."""
    return make_causal_lm_task(config).to_task(eval_batch_size=32)


def text_classification_task(config: TaskConfig) -> HFTask:
    """Built-in task ``hf_text_classification``: :func:`make_classifier_task` as a search's
    :class:`HFTask` (objective ``accuracy: max`` on the SST-2 test split)."""
    return make_classifier_task(config).to_task(num_classes=2)


def check_config(config: TaskConfig) -> None:
    """The ``task:`` section of a built-in Hugging Face task, checked without reading data or training
    a tokenizer: its options, the model directory (a ``save_pretrained`` one of a family secateurs
    prunes) or ``model_options`` (a valid config of such a family), and ``seq_len`` against the
    model's ``max_position_embeddings``. Raises :class:`HFModelError` (one line)."""
    options = task_options(config)
    default = DEFAULT_LM_CONFIG if config.name == "hf_causal_lm" else DEFAULT_CLASSIFIER_CONFIG
    if config.model is not None:
        if config.model_options:
            raise HFModelError(f"model_options: a model loaded from task.model ({config.model!r}) takes no model_options, "
                               f"but got {', '.join(config.model_options)}")
        hf_config = read_config(config.model)
        limit = getattr(hf_config, "max_position_embeddings", None)
    else:
        values = {**default, **config.model_options} if not config.model_options.get("model_type") else dict(config.model_options)
        family_of(values)
        limit = values.get("max_position_embeddings")
        if limit is None:
            from transformers import AutoConfig

            limit = getattr(AutoConfig.for_model(values["model_type"]), "max_position_embeddings", None)
    if limit is not None and options["seq_len"] > limit:
        raise HFModelError(f"options.seq_len: {options['seq_len']} is above the model's max_position_embeddings ({limit}); "
                           f"use seq_len <= {limit}")
