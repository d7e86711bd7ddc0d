"""Recurrent hidden units and attention heads: a pruned module computes exactly what the dense one
computes with the removed units silenced (zeroed rows, or zeroed out_proj columns)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from evaluators import pruning, zoo
from evaluators.attention_pruning import PrunedMultiheadAttention, head_vectors
from evaluators.rnn_pruning import rebuild, unit_vectors
from spaces import Policy


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gates(rnn: nn.RNNBase) -> int:
    return {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[type(rnn)]


def _silence(rnn: nn.RNNBase, drops: dict[tuple[int, int], list[int]]) -> nn.RNNBase:
    """The dense module with the dropped units' gate rows zeroed: their hidden state stays 0 from h0 = 0
    (LSTM: c = 0.5 c, h = 0.5 tanh(c); GRU: h = 0.5 h; RNN: h = tanh(0))."""
    silenced = copy.deepcopy(rnn)
    hidden, gates = rnn.hidden_size, _gates(rnn)
    with torch.no_grad():
        for (layer, d), units in drops.items():
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            rows = [g * hidden + j for g in range(gates) for j in units]
            for base in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(silenced, base + sfx)[rows] = 0.0
    return silenced


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rebuilt_recurrent_module_equals_dense_with_units_silenced(cls, bidirectional):
    torch.manual_seed(0)
    rnn = cls(5, 6, num_layers=3, batch_first=True, bidirectional=bidirectional).eval()
    dirs = 2 if bidirectional else 1
    drops = {(l, d): sorted({(l + 2 * d) % 6, (3 * l + d + 1) % 6}) for l in range(3) for d in range(dirs)}
    drops = {k: v if len(v) == 2 else v + [5 - v[0]] for k, v in drops.items()}
    x = torch.randn(2, 7, 5)
    expected, _ = _silence(rnn, drops)(x)
    rebuild(rnn, drops)
    assert rnn.hidden_size == 4
    got, _ = rnn(x)
    kept = [d * 6 + j for d in range(dirs) for j in range(6) if j not in drops[(2, d)]]
    assert torch.allclose(got, expected[..., kept], atol=1e-6)
    got.sum().backward()


def test_unit_vectors_hold_each_units_rows_and_columns():
    rnn = nn.LSTM(3, 5, num_layers=2, bidirectional=True)
    v = unit_vectors(rnn, 0, 1)
    j = 2
    w_ih, w_hh = rnn.weight_ih_l0_reverse, rnn.weight_hh_l0_reverse
    expected = torch.cat([w_ih[[j, 5 + j, 10 + j, 15 + j]].flatten(), w_hh[[j, 5 + j, 10 + j, 15 + j]].flatten(),
                          w_hh[:, j], rnn.weight_ih_l1[:, 5 + j], rnn.weight_ih_l1_reverse[:, 5 + j]])
    assert torch.equal(v[j], expected.detach())


@pytest.mark.parametrize("bidirectional", [False, True])
def test_text_lstm_pruned_end_to_end_equals_dense_with_lowest_l1_units_silenced(bidirectional):
    torch.manual_seed(0)
    model = zoo.TextLSTM(30, embed_dim=6, hidden_size=8, head_size=6, bidirectional=bidirectional).eval()
    tokens = torch.randint(1, 30, (3, 9))
    tokens[1, 5:] = 0
    dense = copy.deepcopy(model)
    pruning.apply(Policy("l1", {"lstm": 0.25}, granularity="structured"), model, tokens[:1])
    dirs = 2 if bidirectional else 1
    # the definition of l1 for a hidden unit: the sum of |w| over every weight the unit owns
    drops = {(l, d): torch.argsort(unit_vectors(dense.lstm, l, d).abs().sum(1), stable=True)[:2].tolist()
             for l in range(2) for d in range(dirs)}
    silenced = copy.deepcopy(dense)
    silenced.lstm = _silence(dense.lstm, drops)
    assert model.lstm.hidden_size == 6 and model.classifier[1].in_features == 6 * dirs
    with torch.no_grad():
        assert torch.allclose(model(tokens), silenced(tokens), atol=1e-6)


@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_lstm_with_projections_is_refused_with_what_to_do():
    class Proj(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 8, proj_size=3, batch_first=True)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.lstm(x)[0].mean(1))

    with pytest.raises(pruning.PruningError, match="'lstm'.*proj_size=3.*exclude"):
        pruning.apply(Policy("l1", {"lstm": 0.5}, granularity="structured"), Proj(), torch.zeros(1, 5, 4))


# --------------------------------------------------------------------------- attention heads


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
def test_pruned_attention_equals_dense_with_dropped_heads_silenced(batch_first, kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    q = torch.randn(2, 5, 8)
    kv = torch.randn(2, 7, kdim or 8)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, 5:] = True
    causal = torch.ones(5, 7, dtype=torch.bool).triu(3)
    full = PrunedMultiheadAttention.from_attention(mha, range(4)).eval()
    for need_weights in (True, False):
        a = mha(q, kv, kv, key_padding_mask=padding, attn_mask=causal, need_weights=need_weights)
        b = full(q, kv, kv, key_padding_mask=padding, attn_mask=causal, need_weights=need_weights)
        assert torch.allclose(a[0], b[0], atol=1e-6)
        assert (a[1] is None) == (b[1] is None) and (a[1] is None or torch.allclose(a[1], b[1], atol=1e-6))
    small = PrunedMultiheadAttention.from_attention(mha, [0, 2]).eval()
    silenced = copy.deepcopy(mha)
    with torch.no_grad():
        silenced.out_proj.weight[:, 2:4] = 0.0  # head 1's columns
        silenced.out_proj.weight[:, 6:8] = 0.0  # head 3's columns
    expected = silenced(q, kv, kv, key_padding_mask=padding, need_weights=False)[0]
    assert torch.allclose(small(q, kv, kv, key_padding_mask=padding, need_weights=False)[0], expected, atol=1e-6)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in mha.parameters())


def test_per_head_attention_masks_follow_the_kept_heads():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    masks = torch.rand(2 * 4, 5, 5) > 0.7
    masks[..., 0] = False  # every query may see the first key
    small = PrunedMultiheadAttention.from_attention(mha, [1, 3])
    silenced = copy.deepcopy(mha)
    with torch.no_grad():
        silenced.out_proj.weight[:, 0:2] = 0.0
        silenced.out_proj.weight[:, 4:6] = 0.0
    assert torch.allclose(small(x, x, x, attn_mask=masks)[0], silenced(x, x, x, attn_mask=masks)[0], atol=1e-6)


def test_transformer_heads_pruned_end_to_end_equal_dense_with_lowest_l2_heads_silenced():
    torch.manual_seed(0)
    model = zoo.TextTransformer(30, max_len=9, embed_dim=16, num_heads=4, ff_dim=16, dropout=0.0).eval()
    tokens = torch.randint(1, 30, (3, 9))
    dense = copy.deepcopy(model)
    ratios = {"encoder.layers.0.self_attn": 0.5, "encoder.layers.1.self_attn": 0.25}
    report = pruning.prune(Policy("l2", ratios, granularity="structured"), model, tokens[:1])
    assert report.groups == {"encoder.layers.0.self_attn": (4, 2), "encoder.layers.1.self_attn": (4, 1)}
    silenced = copy.deepcopy(dense)
    for layer, drop in ((0, 2), (1, 1)):
        mha = dense.encoder.layers[layer].self_attn
        heads = torch.argsort(head_vectors(mha).pow(2).sum(1), stable=True)[:drop].tolist()  # l2: sum of squares
        with torch.no_grad():
            for h in heads:
                silenced.encoder.layers[layer].self_attn.out_proj.weight[:, 4 * h:4 * h + 4] = 0.0
        assert model.encoder.layers[layer].self_attn.num_heads == 4 - drop
    with torch.no_grad():
        assert torch.allclose(model(tokens), silenced(tokens), atol=1e-5)
    # the pruned model exports without secateurs code in the program
    program = torch.export.export(model, (tokens,))
    assert torch.allclose(program.module()(tokens), model(tokens), atol=1e-6)


def test_residual_width_coupled_to_attention_stays_a_multiple_of_the_heads():
    model = zoo.TextTransformer(30, max_len=9, embed_dim=16, num_heads=4, ff_dim=16).eval()
    tokens = torch.randint(1, 30, (2, 9))
    pruning.apply(Policy("l1", {"encoder.layers.1.linear2": 0.4}, round_to=1), model, tokens[:1])
    width = model.embedding.embedding_dim
    # 16 - floor(6.4) = 10 channels would break nn.MultiheadAttention's 4 heads: rounded up to 12
    assert width == 12 and model.encoder.layers[0].self_attn.embed_dim == 12
    assert model(tokens).shape == (2, 2)
