"""Importance of Hugging Face heads, neurons (magnitude, taylor, wanda, activation) and layers (ShortGPT)."""
from __future__ import annotations

import pytest
import torch

from evaluators.batches import Calibration
from evaluators.hf import importance, pruning
from evaluators.hf.models import layers_of
from evaluators.hf.pruning import HFPruningError
from evaluators.hf.tasks import causal_lm_loss
from tests.models import LLAMA, tiny_hf

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def llama():
    return tiny_hf(LLAMA, "causal_lm", num_hidden_layers=4)


@pytest.fixture
def calibration():
    x = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    return Calibration(({"input_ids": x[:4], "labels": x[:4]}, {"input_ids": x[4:], "labels": x[4:]}), causal_lm_loss)


def silence_head(model, layer: int, head: int, hd: int = 8) -> None:
    """Zero the query rows and output columns of one query head: it contributes nothing."""
    att = layers_of(model)[layer].self_attn
    with torch.no_grad():
        att.q_proj.weight[head * hd:(head + 1) * hd] = 0
        att.o_proj.weight[:, head * hd:(head + 1) * hd] = 0


@pytest.mark.parametrize("criterion", importance.CRITERIA)
def test_a_silenced_head_and_neuron_score_lowest(llama, calibration, criterion):
    silence_head(llama, 1, 5)
    mlp = layers_of(llama)[2].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[7] = 0
        mlp.up_proj.weight[7] = 0
        mlp.down_proj.weight[:, 7] = 0
    units = pruning.discover(llama)
    scores = importance.unit_scores(llama, units, criterion, calibration)
    assert set(scores) == {u.name for u in units if u.kind != "layer"}
    heads, neurons = scores["model.layers.1.self_attn"], scores["model.layers.2.mlp"]
    assert heads.shape == (8,) and neurons.shape == (96,)
    assert int(heads.argmin()) == 5 and int(neurons.argmin()) == 7
    assert torch.isfinite(heads).all() and (heads >= 0).all()


def test_data_criteria_need_calibration_and_leave_the_model_as_it_was(llama, calibration):
    units = pruning.discover(llama)
    with pytest.raises(HFPruningError, match="needs calibration batches"):
        importance.unit_scores(llama, units, "taylor")
    with pytest.raises(HFPruningError, match="unknown criterion 'l7'; valid: magnitude, taylor, wanda, activation"):
        importance.unit_scores(llama, units, "l7", calibration)
    llama.train()
    importance.unit_scores(llama, units, "taylor", calibration)
    assert llama.training
    assert all(p.grad is None and p.requires_grad for p in llama.parameters())


def test_wanda_weighs_weights_by_their_input_norms(llama, calibration):
    """Scaling a neuron's down-projection column and dividing its activation alike keeps the output;
    magnitude changes, wanda (|W| * ||x||) does not."""
    u = next(u for u in pruning.discover(llama) if u.name == "model.layers.0.mlp")
    before = importance.unit_scores(llama, [u], "wanda", calibration)[u.name]
    mlp = layers_of(llama)[0].mlp
    with torch.no_grad():
        mlp.up_proj.weight[3] /= 10
        mlp.down_proj.weight[:, 3] *= 10
    after = importance.unit_scores(llama, [u], "wanda", calibration)[u.name]
    # the down-projection part is invariant; the up-projection rows shrink: neuron 3's score changes,
    # the others stay exactly as they were
    others = torch.arange(96) != 3
    assert torch.allclose(before[others], after[others], rtol=1e-5)


def test_block_influence_finds_the_layer_that_changes_nothing(llama, calibration):
    layer = layers_of(llama)[2]
    with torch.no_grad():  # attention and MLP outputs zero: the layer passes its input through
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    scores = importance.block_influence(llama, calibration.batches)
    assert len(scores) == 4 and scores[2] == pytest.approx(0.0, abs=1e-6)
    assert all(s > 1e-3 for i, s in enumerate(scores) if i != 2)
    assert importance.layers_to_drop(llama, 1, calibration.batches) == [2]
    with pytest.raises(HFPruningError, match=r"must be in 0\.\.3"):
        importance.layers_to_drop(llama, 4, calibration.batches)


def test_block_influence_skips_padding_tokens(llama):
    x = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    short = importance.block_influence(llama, [{"input_ids": x[:, :5], "attention_mask": mask[:, :5]}])
    mask[:, 5:] = 0  # right padding: a causal model's first five tokens see what they saw before
    padded = importance.block_influence(llama, [{"input_ids": x, "attention_mask": mask}])
    assert padded == pytest.approx(short, rel=1e-4)
    assert importance.block_influence(llama, [{"input_ids": x}]) != pytest.approx(short, rel=1e-4)
