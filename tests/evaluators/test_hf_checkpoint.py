"""Pruned Hugging Face models saved with save_pretrained and reloaded by from_pretrained, exactly."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageClassification,
                          AutoModelForSequenceClassification, BertForSequenceClassification, LlamaForCausalLM)

from evaluators.hf import checkpoint, pruning
from evaluators.hf.models import build_model, load_model
from evaluators.measure import interleaved_latency_ms
from tests.models import BERT, LLAMA, VIT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def llama():
    torch.manual_seed(0)
    return build_model(LLAMA, "causal_lm").eval()


def ids(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(1))


def saved_config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def test_layers_that_differ_round_trip_through_per_layer_config(tmp_path):
    model = llama()
    pruning.prune_heads(model, "model.layers.0.self_attn", [0, 1, 4, 5])   # whole groups 0 and 2
    pruning.prune_heads(model, "model.layers.2.self_attn", [1, 3, 5, 7])   # one query head per group
    pruning.prune_neurons(model, "model.layers.2.mlp", range(0, 96, 2))
    pruning.drop_layers(model, [1])
    x = ids()
    expected = model(x).logits
    checkpoint.save_pretrained(model, tmp_path)
    config = saved_config(tmp_path)
    assert config["model_type"] == "secateurs_llama" and config["architectures"] == ["SecateursLlamaForCausalLM"]
    assert config["num_hidden_layers"] == 2
    assert config["per_layer_config"] == {"0": {"num_attention_heads": 4, "num_key_value_heads": 2},
                                          "1": {"num_attention_heads": 4, "intermediate_size": 48}}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert pruning.layer_shapes(reloaded) == pruning.layer_shapes(model)
    assert pruning.parameter_count(reloaded) == pruning.parameter_count(model)
    assert torch.equal(reloaded(x).logits, expected)
    mask = torch.ones_like(x)
    greedy = model.generate(x, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(reloaded.generate(x, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0), greedy)
    # transformers sizes a static KV cache per layer from per_layer_config's num_key_value_heads
    assert torch.equal(reloaded.generate(x, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                         cache_implementation="static"), greedy)


def test_layers_alike_save_as_the_family_config_that_plain_transformers_loads(tmp_path):
    model = llama()
    for i in range(3):
        pruning.prune_heads(model, f"model.layers.{i}.self_attn", [0, 1, 2, 3])
        pruning.prune_neurons(model, f"model.layers.{i}.mlp", range(64))
    pruning.drop_layers(model, [0])
    x = ids()
    expected = model(x).logits
    checkpoint.save_pretrained(model, tmp_path)
    config = saved_config(tmp_path)
    assert (config["model_type"], config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
            config["intermediate_size"], config["num_hidden_layers"]) == ("llama", 4, 2, 8, 64, 2)
    assert "per_layer_config" not in config or not config["per_layer_config"]
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()  # the family's own class
    assert torch.equal(reloaded(x).logits, expected)


def test_head_counts_the_family_config_cannot_state_use_per_layer_config(tmp_path):
    model = llama()
    for i in range(3):  # 6 heads: LlamaConfig refuses hidden_size 64 % 6 != 0, though the layers are alike
        pruning.prune_heads(model, f"model.layers.{i}.self_attn", range(6))
    checkpoint.save_pretrained(model, tmp_path)
    assert saved_config(tmp_path)["model_type"] == "secateurs_llama"
    assert torch.equal(load_model(tmp_path)(ids()).logits, model(ids()).logits)


def test_bert_and_vit_round_trip(tmp_path):
    torch.manual_seed(0)
    bert = build_model(BERT, "sequence_classification", num_labels=2).eval()
    pruning.prune_heads(bert, "bert.encoder.layer.0.attention.self", [1, 3])
    pruning.prune_neurons(bert, "bert.encoder.layer.1.intermediate", range(50))
    pruning.drop_layers(bert, [2])
    x = {"input_ids": ids(), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    checkpoint.save_pretrained(bert, tmp_path / "bert")
    assert saved_config(tmp_path / "bert")["per_layer_config"] == {"0": {"num_attention_heads": 2}, "1": {"intermediate_size": 50}}
    assert torch.equal(AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert").eval()(**x).logits, bert(**x).logits)

    vit = build_model(VIT, "image_classification", num_labels=3).eval()
    pruning.prune_heads(vit, "vit.layers.0.attention", [0, 2])
    pruning.prune_neurons(vit, "vit.layers.1.mlp", range(10))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    checkpoint.save_pretrained(vit, tmp_path / "vit")
    assert torch.equal(AutoModelForImageClassification.from_pretrained(tmp_path / "vit").eval()(pixels).logits, vit(pixels).logits)


def test_bert_depth_and_mlp_alike_stay_a_plain_bert(tmp_path):
    torch.manual_seed(0)
    bert = build_model(BERT, "sequence_classification", num_labels=2).eval()
    for i in range(3):
        pruning.prune_neurons(bert, f"bert.encoder.layer.{i}.intermediate", range(32))
    pruning.drop_layers(bert, [1])
    checkpoint.save_pretrained(bert, tmp_path)
    config = saved_config(tmp_path)
    assert (config["model_type"], config["intermediate_size"], config["num_hidden_layers"]) == ("bert", 32, 2)
    assert "head_dim" not in config
    x = {"input_ids": ids(), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    assert torch.equal(BertForSequenceClassification.from_pretrained(tmp_path).eval()(**x).logits, bert(**x).logits)


def test_a_reloaded_pruned_model_prunes_and_saves_again(tmp_path):
    model = llama()
    pruning.prune_heads(model, "model.layers.0.self_attn", [0, 1, 4, 5])
    checkpoint.save_pretrained(model, tmp_path / "a")
    again = load_model(tmp_path / "a")
    pruning.drop_layers(again, [1])
    pruning.prune_neurons(again, "model.layers.2.mlp", range(10))  # named after its layer in `again`, now at position 1
    checkpoint.save_pretrained(again, tmp_path / "b")
    assert saved_config(tmp_path / "b")["per_layer_config"] == {"0": {"num_attention_heads": 4, "num_key_value_heads": 2},
                                                                "1": {"intermediate_size": 10}}
    assert torch.equal(load_model(tmp_path / "b")(ids()).logits, again(ids()).logits)


def test_the_saved_config_validates_per_layer_shapes():
    config_class = checkpoint.PRUNED_CONFIGS["llama"]
    with pytest.raises(Exception, match=r"num_attention_heads \(3\) must be a multiple of num_key_value_heads \(2\)"):
        config_class(**{k: v for k, v in LLAMA.items() if k != "model_type"},
                     per_layer_config={0: {"num_attention_heads": 3, "num_key_value_heads": 2}})
    with pytest.raises(Exception, match=r"intermediate_size must be an integer in 1\.\.96"):
        config_class(**{k: v for k, v in LLAMA.items() if k != "model_type"}, per_layer_config={1: {"intermediate_size": 200}})
    assert AutoConfig.for_model("secateurs_llama").model_type == "secateurs_llama"


def test_dropped_layers_cut_parameters_and_measured_latency():
    torch.manual_seed(0)
    dense = build_model({**LLAMA, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 8}, "causal_lm").eval()
    shallow = build_model({**LLAMA, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 8}, "causal_lm").eval()
    pruning.drop_layers(shallow, [1, 2, 3, 4, 5, 6])
    layer_params = sum(p.numel() for p in dense.model.layers[0].parameters())
    assert pruning.parameter_count(dense) - pruning.parameter_count(shallow) == 6 * layer_params
    x = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(0))
    stats = interleaved_latency_ms({"dense": lambda: dense(x), "shallow": lambda: shallow(x)}, rounds=3, warmup=2, repeats=5)
    assert stats["shallow"]["latency_ms"] < 0.6 * stats["dense"]["latency_ms"], stats
