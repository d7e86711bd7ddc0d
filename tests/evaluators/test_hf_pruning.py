"""Pruning Hugging Face models in place: GQA-consistent heads, MLP neurons, whole layers."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from evaluators.hf import pruning
from evaluators.hf.models import layers_of
from evaluators.hf.pruning import HFPruningError
from tests.models import BERT, LLAMA, tiny_hf

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def llama():
    return tiny_hf(LLAMA, "causal_lm")


@pytest.fixture
def bert():
    return tiny_hf(BERT, "sequence_classification", num_labels=2)


def ids(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(1))


def attention(model, i=0):
    return layers_of(model)[i].self_attn


def test_discover_lists_heads_neurons_and_layers(llama):
    units = pruning.discover(llama)
    assert [(u.kind, u.size) for u in units[:3]] == [("heads", 8), ("neurons", 96), ("layer", 1)]
    heads = units[0]
    assert (heads.kv_heads, heads.head_dim, heads.group_size) == (4, 8, 2)
    assert heads.members == tuple(f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert len(units) == 3 * 3


def test_whole_kv_groups_go_with_their_query_heads(llama):
    pruning.prune_heads(llama, "model.layers.0.self_attn", [2, 3, 6, 7])  # groups 1 and 3
    att = attention(llama)
    assert (att.q_proj.out_features, att.k_proj.out_features, att.v_proj.out_features, att.o_proj.in_features) == (32, 16, 16, 32)
    assert att.num_key_value_groups == 2
    assert pruning.layer_shapes(llama)[0] == pruning.LayerShape(4, 2, 8, 96)


def test_query_heads_within_groups_keep_every_kv_head(llama):
    pruning.prune_heads(llama, "model.layers.1.self_attn", [1, 2, 5, 6])  # one query head from each group
    att = attention(llama, 1)
    assert (att.q_proj.out_features, att.k_proj.out_features, att.num_key_value_groups) == (32, 32, 1)


def test_kept_heads_compute_what_they_computed_before(llama):
    """With grouped-query attention, a kept query head still reads its own key/value head: the
    attention output restricted to the kept heads is unchanged by pruning."""
    captured = {}
    hook = lambda name: (lambda m, args: captured.__setitem__(name, args[0].detach().clone()))  # noqa: E731
    h = attention(llama).o_proj.register_forward_pre_hook(hook("dense"))
    llama(ids())
    h.remove()
    keep = [2, 3, 4, 5, 6, 7]
    pruning.prune_heads(llama, "model.layers.0.self_attn", keep)
    h = attention(llama).o_proj.register_forward_pre_hook(hook("pruned"))
    llama(ids())
    h.remove()
    dense = captured["dense"].view(2, 10, 8, 8)[:, :, keep]
    assert torch.allclose(captured["pruned"].view(2, 10, 6, 8), dense, atol=1e-5)


def test_uneven_heads_per_group_are_refused_with_the_valid_counts(llama):
    with pytest.raises(HFPruningError, match=r"same number of query heads.*\[2, 1, 0, 0\]"):
        pruning.prune_heads(llama, "model.layers.0.self_attn", [0, 1, 2])
    u = pruning.discover(llama)[0]
    with pytest.raises(HFPruningError, match=r"valid counts: \[2, 4, 6, 8\]"):
        pruning.heads_to_keep(u, torch.ones(8), 3, "kv_groups")
    with pytest.raises(HFPruningError, match="valid counts: \\[4, 8\\]"):
        pruning.heads_to_keep(u, torch.ones(8), 6, "query_heads")


def test_head_ratios_that_break_gqa_grouping_name_the_valid_ones(llama):
    u = pruning.discover(llama)[0]  # 8 query heads, 4 key-value groups of 2
    assert [pruning.heads_for_ratio(u, r, "kv_groups") for r in (0.0, 0.25, 0.5, 0.75)] == [8, 6, 4, 2]
    assert pruning.heads_for_ratio(u, 0.5, "query_heads") == 4
    with pytest.raises(HFPruningError, match=r"ratio 0\.3 prunes 2\.4 of 8 .*valid ratios: 0, 0\.25, 0\.5, 0\.75"):
        pruning.heads_for_ratio(u, 0.3, "kv_groups")
    with pytest.raises(HFPruningError, match="mode query_heads; valid ratios: 0, 0.5"):
        pruning.heads_for_ratio(u, 0.25, "query_heads")


def test_heads_to_keep_by_scores_in_both_modes(llama):
    u = pruning.discover(llama)[0]
    scores = torch.tensor([9.0, 0.0, 1.0, 1.0, 5.0, 5.0, 0.0, 2.0])  # group sums: 9, 2, 10, 2
    assert pruning.heads_to_keep(u, scores, 4, "kv_groups") == [0, 1, 4, 5]
    assert pruning.heads_to_keep(u, scores, 4, "query_heads") == [0, 2, 4, 7]
    for i, mode in enumerate(("kv_groups", "query_heads")):
        u = pruning.discover(llama)[i * 3]  # the heads of layer i
        pruning.prune_heads(llama, u.name, pruning.heads_to_keep(u, scores, 4, mode))  # consistent by construction
    assert [(s.num_attention_heads, s.num_key_value_heads) for s in pruning.layer_shapes(llama)[:2]] == [(4, 2), (4, 4)]


def test_neurons_and_bad_indices(llama):
    pruning.prune_neurons(llama, "model.layers.2.mlp", range(0, 96, 3))
    mlp = layers_of(llama)[2].mlp
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features, mlp.intermediate_size) == (32, 32, 32, 32)
    with pytest.raises(HFPruningError, match=r"must lie in 0\.\.31"):
        pruning.prune_neurons(llama, "model.layers.2.mlp", [0, 40])
    with pytest.raises(HFPruningError, match="must not be empty"):
        pruning.prune_neurons(llama, "model.layers.2.mlp", [])
    with pytest.raises(HFPruningError, match="is a neurons unit, not heads"):
        pruning.prune_heads(llama, "model.layers.2.mlp", [0])
    with pytest.raises(HFPruningError, match="no prunable unit named 'model.layers.9.mlp'"):
        pruning.prune_neurons(llama, "model.layers.9.mlp", [0])


def test_dropped_layers_are_gone_and_the_cache_follows(llama):
    before = pruning.parameter_count(llama)
    per_layer = sum(p.numel() for p in layers_of(llama)[1].parameters())
    pruning.drop_layers(llama, [1])
    assert len(layers_of(llama)) == 2 and llama.config.num_hidden_layers == 2
    assert pruning.parameter_count(llama) == before - per_layer
    assert [layer.self_attn.layer_idx for layer in layers_of(llama)] == [0, 1]
    assert not any(".1." in n and "layers.1." not in n for n, _ in llama.named_parameters())
    out = llama(ids(), use_cache=True)
    assert isinstance(out.cache, DynamicCache) and len(out.cache.layers) == 2
    with pytest.raises(HFPruningError, match="at least one must stay"):
        pruning.drop_layers(llama, [0, 1])
    with pytest.raises(HFPruningError, match=r"must lie in 0\.\.1"):
        pruning.drop_layers(llama, [2])


def test_forward_and_generate_run_after_width_and_depth_pruning(llama):
    pruning.prune_heads(llama, "model.layers.0.self_attn", [0, 1, 4, 5])
    pruning.prune_heads(llama, "model.layers.2.self_attn", [0, 2, 4, 6])
    pruning.prune_neurons(llama, "model.layers.0.mlp", range(40))
    pruning.drop_layers(llama, [1])
    x = ids()
    assert llama(x).logits.shape == (2, 10, 64)
    greedy = llama.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert greedy.shape == (2, 15)
    # the cache gives the same next tokens as recomputing the whole prefix
    full = llama(greedy[:, :-1]).logits[:, -1].argmax(-1)
    assert torch.equal(full, greedy[:, -1])


def test_bert_heads_neurons_and_layers(bert):
    x = {"input_ids": ids(), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    pruning.prune_heads(bert, "bert.encoder.layer.0.attention.self", [1, 3])
    pruning.prune_neurons(bert, "bert.encoder.layer.1.intermediate", range(20))
    pruning.drop_layers(bert, [2])
    att = bert.bert.encoder.layer[0].attention.self
    assert (att.num_attention_heads, att.all_head_size, att.query.out_features) == (2, 32, 32)
    assert bert.bert.encoder.layer[0].attention.output.dense.in_features == 32
    assert [s.intermediate_size for s in pruning.layer_shapes(bert)] == [96, 20]
    assert bert(**x).logits.shape == (2, 2)
