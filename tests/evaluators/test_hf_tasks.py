"""Hugging Face models and text tasks: loading, refusals before any trial, dict batches, perplexity and accuracy."""
from __future__ import annotations

import json
import math

import pytest
import torch

from evaluators.batches import inputs_of, targets_of
from evaluators.hf import checkpoint, pruning, tasks
from evaluators.hf.models import HFModelError, build_model, family_of, load_model, read_config
from evaluators.tasks import TaskConfig
from tests.data import DATA_DIRS, data_root

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LM = "evaluators.hf.tasks:make_causal_lm_task"
CLASSIFIER = "evaluators.hf.tasks:make_classifier_task"
TINY_LM = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}
SMALL_DATA = {"train_size": 200, "test_size": 60, "vocab_size": 300, "seq_len": 16}


@pytest.fixture(scope="module")
def sst2() -> str:
    root = data_root("sst2.csv")
    if root is None:
        pytest.skip(f"sst2.csv is in none of {', '.join(map(str, DATA_DIRS))}")
    return str(root)


def lm_config(sst2: str, **options) -> TaskConfig:
    return TaskConfig(name=LM, data_root=sst2, options={**SMALL_DATA, **options}, model_options=TINY_LM)


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(HFModelError, match=r"has no config\.json; expected a save_pretrained directory"):
        load_model(tmp_path)
    with pytest.raises(HFModelError, match="is not a directory"):
        read_config(tmp_path / "missing")


def test_a_family_secateurs_cannot_prune_is_named_with_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
    with pytest.raises(HFModelError, match=r"model_type 'gpt2' is not a family secateurs can prune; supported: llama .*bert .*vit"):
        load_model(tmp_path)
    with pytest.raises(HFModelError, match="'mamba' is not a family"):
        build_model({"model_type": "mamba"})
    with pytest.raises(HFModelError, match="cross-attention"):
        family_of({"model_type": "bert", "add_cross_attention": True})
    with pytest.raises(HFModelError, match="llama models come as base, causal_lm, sequence_classification"):
        build_model(TINY_LM, "image_classification")


def test_the_lm_task_gives_packed_dict_batches_and_perplexity(sst2):
    task = tasks.make_causal_lm_task(lm_config(sst2))
    assert (task.metric, task.mode) == ("perplexity", "min")
    batch = next(task.train_batches(8))
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (8, 16)
    assert torch.equal(targets_of(batch), batch["input_ids"]) and set(inputs_of(batch)) == {"input_ids"}
    model = task.build_model()
    assert model.config.vocab_size == len(task.tokenizer) and model.config.eos_token_id == task.tokenizer.eos_token_id
    result = task.evaluate(model, task.test_batches(16))
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    batches = list(task.test_batches(16))
    mean = sum(task.loss(model, b).item() * b["input_ids"].numel() for b in batches) / sum(b["input_ids"].numel() for b in batches)
    assert result["loss"] == pytest.approx(mean, rel=1e-5)  # all blocks are the same length: the means agree
    assert task.example_inputs(3, 24)["input_ids"].shape == (3, 24)


def test_training_lowers_held_out_perplexity(sst2):
    task = tasks.make_causal_lm_task(lm_config(sst2))
    model = task.build_model()
    before = task.evaluate(model, task.test_batches(32))["perplexity"]
    tasks.fit(model, task, epochs=2, lr=1e-2, batch_size=16)
    assert task.evaluate(model, task.test_batches(32))["perplexity"] < 0.5 * before


def test_the_pruned_lm_reloads_with_the_metric_it_reported(sst2, tmp_path):
    task = tasks.make_causal_lm_task(lm_config(sst2))
    model = task.build_model()
    pruning.prune_heads(model, "model.layers.0.self_attn", [2, 3])
    pruning.prune_neurons(model, "model.layers.1.mlp", range(20))
    reported = task.evaluate(model, task.test_batches(16))
    checkpoint.save_pretrained(model, tmp_path, tokenizer=task.tokenizer)
    reloaded = tasks.make_causal_lm_task(TaskConfig(name=LM, data_root=sst2, options=SMALL_DATA, model=str(tmp_path)))
    again = reloaded.build_model()
    assert reloaded.tokenizer.get_vocab() == task.tokenizer.get_vocab()
    assert reloaded.evaluate(again, reloaded.test_batches(16)) == reported


def test_the_classifier_task_pads_with_a_mask_and_reports_accuracy(sst2):
    config = TaskConfig(name=CLASSIFIER, data_root=sst2, options=SMALL_DATA,
                        model_options={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "max_position_embeddings": 32})
    task = tasks.make_classifier_task(config)
    batch = next(task.train_batches(4))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape == (4, 16)
    assert batch["labels"].dtype == torch.long and set(batch["labels"].tolist()) <= {0, 1}
    model = task.build_model()
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 2
    assert 0.0 <= task.evaluate(model, task.test_batches(32))["accuracy"] <= 1.0
    assert task.loss(model, batch).shape == ()


def test_bad_task_options_fail_before_any_trial(sst2, tmp_path):
    with pytest.raises(HFModelError, match=r"options\.seq_len: 64 is above the model's max_position_embeddings \(32\)"):
        tasks.make_causal_lm_task(lm_config(sst2, seq_len=64))
    with pytest.raises(HFModelError, match="unknown option\\(s\\) 'seqlen'"):
        tasks.make_causal_lm_task(lm_config(sst2, seqlen=8))
    with pytest.raises(HFModelError, match="options.tokenizer: must be one of bpe, word"):
        tasks.make_causal_lm_task(lm_config(sst2, tokenizer="sentencepiece"))
    with pytest.raises(HFModelError, match="has no config.json"):
        tasks.make_causal_lm_task(TaskConfig(name=LM, data_root=sst2, options=SMALL_DATA, model=str(tmp_path)))
    model = build_model(TINY_LM, "causal_lm", vocab_size=300)
    checkpoint.save_pretrained(model, tmp_path / "no_tokenizer")
    with pytest.raises(HFModelError, match="has no tokenizer"):
        tasks.make_causal_lm_task(TaskConfig(name=LM, data_root=sst2, options=SMALL_DATA, model=str(tmp_path / "no_tokenizer")))
    assert not any((tmp_path / "no_tokenizer").glob("tokenizer*"))


def test_a_word_level_tokenizer_works_too(sst2):
    task = tasks.make_causal_lm_task(lm_config(sst2, tokenizer="word"))
    assert len(task.tokenizer) <= 300
    assert task.evaluate(task.build_model(), task.test_batches(32))["perplexity"] > 1
