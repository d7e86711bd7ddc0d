"""Recurrent hidden units and attention heads: a pruned module computes exactly what the dense one
computes with the removed units silenced (zeroed rows, or zeroed out_proj columns)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from evaluators import pruning, zoo
from evaluators.units.mha import PrunedMultiheadAttention, head_vectors
from evaluators.units.rnn import rebuild, unit_vectors
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


class FinalStateClassifier(nn.Module):
    """The most common recurrent classifier: reads the final hidden state (``_, (h_n, _) = lstm(x)``),
    over padded or packed sequences; bidirectional models read the last layer's two directions."""

    def __init__(self, cell: type = nn.LSTM, packed: bool = False, bidirectional: bool = False, num_layers: int = 1) -> None:
        super().__init__()
        self.packed, self.bidirectional = packed, bidirectional
        self.embedding = nn.Embedding(30, 6, padding_idx=0)
        self.rnn = cell(6, 8, num_layers=num_layers, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(16 if bidirectional else 8, 3)

    def forward(self, tokens):
        x = self.embedding(tokens)
        if self.packed:
            lengths = (tokens != 0).sum(1).clamp_min(1).cpu()
            x = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, state = self.rnn(x)
        h_n = state[0] if isinstance(state, tuple) else state
        return self.fc(torch.cat([h_n[-2], h_n[-1]], -1) if self.bidirectional else h_n[-1])


def _kept_units(dense: nn.RNNBase, pruned: nn.RNNBase, layer: int, direction: int) -> list[int]:
    """Which hidden units of the dense module the pruned one kept, found by their (unique) biases."""
    sfx = f"_l{layer}" + ("_reverse" if direction else "")
    dense_bias, pruned_bias = getattr(dense, "bias_ih" + sfx)[: dense.hidden_size], getattr(pruned, "bias_ih" + sfx)[: pruned.hidden_size]
    return [int(torch.nonzero(dense_bias == b).flatten()[0]) for b in pruned_bias]


@pytest.mark.parametrize("cell, packed, bidirectional, num_layers", [
    (nn.LSTM, False, False, 1), (nn.LSTM, True, False, 1), (nn.LSTM, True, True, 1), (nn.LSTM, False, False, 2),
    (nn.GRU, True, False, 2),
])
def test_a_classifier_reading_the_final_hidden_state_is_pruned(cell, packed, bidirectional, num_layers):
    torch.manual_seed(0)
    dense = FinalStateClassifier(cell, packed, bidirectional, num_layers).eval()
    tokens = torch.randint(1, 30, (4, 9))
    tokens[1, 4:] = 0  # padding: packed sequences of different lengths
    groups = {g.name: g for g in pruning.discover_groups(dense, tokens[:1], ["structured"])}
    assert groups["rnn"].kind == "rnn-hidden" and groups["rnn"].size == 8
    model = pruning.apply(Policy("l1", {"rnn": 0.25}, granularity="structured"), copy.deepcopy(dense), tokens[:1])
    dirs = 2 if bidirectional else 1
    assert model.rnn.hidden_size == 6 and model.fc.in_features == 6 * dirs  # the hidden size really shrank
    out = model(tokens)
    assert out.shape == (4, 3)
    out.sum().backward()
    # the pruned model computes what the dense one computes with the removed units silenced
    kept = {(l, d): _kept_units(dense.rnn, model.rnn, l, d) for l in range(num_layers) for d in range(dirs)}
    silenced = copy.deepcopy(dense)
    silenced.rnn = _silence(dense.rnn, {k: [j for j in range(8) if j not in v] for k, v in kept.items()})
    with torch.no_grad():
        assert torch.allclose(model(tokens), silenced(tokens), atol=1e-6)
    rebuilt = pruning.restore(Policy("l1", {"rnn": 0.25}, granularity="structured"), copy.deepcopy(dense), tokens[:1],
                              model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens), model(tokens))


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
    pruning.apply(Policy("l1", {"embedding": 0.4}, round_to=1), model, tokens[:1])  # the residual width
    width = model.embedding.embedding_dim
    # 16 - floor(6.4) = 10 channels would break nn.MultiheadAttention's 4 heads: rounded up to 12
    assert width == 12 and model.encoder.layers[0].self_attn.embed_dim == 12
    assert model(tokens).shape == (2, 2)


# ------------------------------------------------------------ attention written with nn.Linear projections
class FusedAttention(nn.Module):
    """ViT-style: one qkv linear, heads reshaped from ``num_heads`` and ``head_dim``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class SeparateAttention(nn.Module):
    """LLaMA-style: q_proj/k_proj/v_proj/o_proj and ``n_heads``."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        out = nn.functional.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class WidthBoundAttention(FusedAttention):
    """Reshapes with the input width: cannot lose heads."""

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class TinyViT(nn.Module):
    def __init__(self, attention: type, dim: int = 16, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(dim), "attn": attention(dim, heads),
                                                   "mlp": nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))})
                                    for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block["attn"](block["norm"](x))
            x = x + block["mlp"](x)
        return self.head(x.mean(1))


def _silenced_heads(model: TinyViT, drops: dict[int, list[int]]) -> TinyViT:
    """The dense model with the dropped heads' output columns zeroed (their contribution is removed)."""
    silenced = copy.deepcopy(model)
    with torch.no_grad():
        for layer, heads in drops.items():
            att = silenced.blocks[layer]["attn"]
            out = att.proj if hasattr(att, "proj") else att.o_proj
            for h in heads:
                out.weight[:, h * att.head_dim:(h + 1) * att.head_dim] = 0
    return silenced


@pytest.mark.parametrize("attention, heads_attr", [(FusedAttention, "num_heads"), (SeparateAttention, "n_heads")])
def test_heads_of_attention_written_with_linears_are_pruned_in_place(attention, heads_attr):
    torch.manual_seed(0)
    dense = TinyViT(attention).eval()
    x = torch.randn(3, 5, 8)
    groups = {g.name: g for g in pruning.discover_groups(dense, x[:1], ["structured"])}
    assert groups["blocks.0.attn"].kind == "attention-heads" and groups["blocks.0.attn"].size == 4
    # the q/k/v outputs come in heads: never offered as free channels
    assert not any(".attn." in name for name in groups)
    assert not any(".attn" in g.name for g in pruning.discover_groups(dense, x[:1], ["channel"]))
    policy = Policy("l2", {"blocks.0.attn": 0.5, "blocks.1.attn": 0.25}, granularity="structured")
    scores = {i: head_vectors_of(dense.blocks[i]["attn"]) for i in (0, 1)}
    drops = {0: sorted(torch.argsort(scores[0])[:2].tolist()), 1: sorted(torch.argsort(scores[1])[:1].tolist())}
    model = pruning.apply(policy, copy.deepcopy(dense), x[:1])
    att = model.blocks[0]["attn"]
    assert type(att) is attention and getattr(att, heads_attr) == 2 and getattr(model.blocks[1]["attn"], heads_attr) == 3
    with torch.no_grad():
        assert torch.allclose(model(x), _silenced_heads(dense, drops)(x), atol=1e-5)
    model(x).sum().backward()  # trains
    rebuilt = pruning.restore(policy, copy.deepcopy(dense), x[:1], model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())


def head_vectors_of(att: nn.Module) -> torch.Tensor:
    """l2 score per head, computed independently of the engine: q, k, v rows and output columns."""
    hd, heads = att.head_dim, (att.num_heads if hasattr(att, "num_heads") else att.n_heads)
    if hasattr(att, "qkv"):
        q, k, v = att.qkv.weight.chunk(3)
        out = att.proj.weight
    else:
        q, k, v, out = att.q_proj.weight, att.k_proj.weight, att.v_proj.weight, att.o_proj.weight
    return sum(w.reshape(heads, -1).pow(2).sum(1) for w in (q, k, v)) + out.reshape(out.shape[0], heads, hd).pow(2).sum((0, 2))


def test_heads_and_the_residual_width_prune_together():
    torch.manual_seed(1)
    dense = TinyViT(FusedAttention).eval()
    x = torch.randn(2, 5, 8)
    policy = Policy("l1", {"blocks.0.attn": 0.5, "embed": 0.25}, granularity="structured")  # embed: the residual width
    model = pruning.apply(policy, copy.deepcopy(dense), x[:1])
    assert model.embed.out_features == 12 and model.blocks[0]["attn"].qkv.in_features == 12
    assert model.blocks[0]["attn"].num_heads == 2 and model(x).shape == (2, 3)


def test_attention_whose_forward_ignores_the_head_count_is_refused_by_name():
    model = TinyViT(WidthBoundAttention).eval()
    x = torch.randn(2, 5, 8)
    with pytest.raises(pruning.PruningError, match=r"attention module\(s\) 'blocks.0.attn' \(WidthBoundAttention\) no longer run"):
        pruning.apply(Policy("l1", {"blocks.0.attn": 0.5}, granularity="structured"), model, x[:1])


def test_a_group_minimum_width_holds_for_channels_heads_and_global_rankings():
    from evaluators.models import DigitsCNN
    from spaces import Rule, SearchSpace, SpaceConfig

    cnn, example = DigitsCNN(), torch.zeros(1, 1, 8, 8)
    groups = pruning.discover_groups(cnn, example)
    space = SearchSpace(SpaceConfig(rules=[Rule(match="features.3", min_channels=40), Rule(match="features.0", high=0.5, min_channels=20)]), groups)
    policy = space.policy({"ratio.features.0": 0.5, "ratio.features.3": 0.75, "ratio.features.7": 0.75, "ratio.classifier.1": 0.0})
    assert policy.group_min_channels == {"features.0": 20, "features.3": 40}
    assert Policy.from_json(policy.to_json()) == policy
    report = pruning.prune(policy, copy.deepcopy(cnn), example)
    assert report.kept("features.0") == 20 and report.kept("features.3") == 40 and report.kept("features.7") == 16
    # one global ranking never takes a group below its minimum either
    pooled = Policy("l1", {"features.0": 0.9, "features.3": 0.9}, global_groups=["features.0", "features.3"],
                    group_min_channels={"features.0": 30, "features.3": 50})
    report = pruning.prune(pooled, copy.deepcopy(cnn), example)
    assert report.kept("features.0") >= 30 and report.kept("features.3") >= 50
    # attention keeps at least its group minimum of heads
    vit, x = TinyViT(FusedAttention).eval(), torch.randn(1, 5, 8)
    policy = Policy("l1", {"blocks.0.attn": 0.75}, granularity="structured", group_min_channels={"blocks.0.attn": 3})
    assert pruning.apply(policy, vit, x).blocks[0]["attn"].num_heads == 3


def test_a_rule_minimum_must_be_a_positive_integer():
    from spaces import Rule

    with pytest.raises(ValueError, match="min_channels: must be an integer >= 1, but got 0"):
        Rule(match="conv*", min_channels=0)
    with pytest.raises(ValueError, match="must set exactly one of"):
        Rule(match="conv*")
