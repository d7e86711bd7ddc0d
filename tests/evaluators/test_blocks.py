"""Depth: removable residual blocks found by tracing, dropped for real, scored on calibration batches."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from evaluators.batches import Calibration, forward
from evaluators.blocks import BlockError, DroppedBlock, analyse_blocks, block_importance, discover_blocks, drop_blocks, least_important
from evaluators.onnx_backend import export_program, onnx_outputs, write_onnx
from evaluators.sparsity import effective_macs_and_params
from evaluators.zoo import InvertedResidual, mobilenetv2_cifar, resnet20, resnet56

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: intra-op threads only spin-wait

IMAGE = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
SMALL = IMAGE[:, :, :16, :16].contiguous()  # the CIFAR models work on any size; smaller is faster


class Residual(nn.Module):
    """A user's pre-norm residual MLP block: ``x + fc2(relu(fc1(norm(x))))``, optionally ``relu`` after the add."""

    def __init__(self, width: int, relu_after: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.relu_after = relu_after

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(self.norm(x))))
        if scale is not None:
            h = h * scale
        out = x + h
        return torch.relu(out) if self.relu_after else out


class PostNorm(nn.Module):
    """``norm(x + fc(x))``: residual, but the norm after the add keeps it from becoming the identity."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc(x))


class Projected(nn.Module):
    """``fc2(relu(fc1(x))) + proj(x)``: a residual shape whose shortcut is a layer, not the identity."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) + self.proj(x)


class ResidualMLP(nn.Module):
    """A user-defined model: stem, residual blocks in a ModuleList (one scaled by a keyword input), head."""

    def __init__(self, width: int = 16, blocks: int = 3, relu_stem: bool = False, relu_after: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(8, width), *([nn.ReLU()] if relu_stem else []))
        self.blocks = nn.ModuleList(Residual(width, relu_after) for _ in range(blocks))
        self.post = PostNorm(width)
        self.projected = Projected(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        x = self.stem(x)
        for index, block in enumerate(self.blocks):
            x = block(x, scale=scale) if index == 0 else block(x)
        return self.head(self.projected(self.post(x)))


def names(blocks):
    return [b.name for b in blocks]


def zero_branch(block: nn.Module) -> None:
    """Make the block's residual branch output exactly zero (its last layer's weights and bias)."""
    last = block.bn2 if hasattr(block, "bn2") else block.block[-1] if hasattr(block, "block") else block.fc2
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()


# ---------------------------------------------------------------- discovery


def test_resnet20_blocks_are_the_basic_blocks_without_a_projection_shortcut():
    model = resnet20(width=4).eval()
    blocks, rejected = analyse_blocks(model, SMALL)
    assert names(blocks) == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]
    assert {b.kind for b in blocks} == {"BasicBlock"}
    assert {b.tail for b in blocks} == {"relu"}
    assert {b.replacement for b in blocks} == {"identity"}  # every block's input comes out of a ReLU
    assert "the identity needs the same shape" in rejected["layer2.0"]
    assert "ends in `2` (BasicBlock)" in rejected["layer1"]


def test_resnet56_has_every_basic_block_but_the_two_that_change_shape():
    model = resnet56(width=4).eval()
    blocks = discover_blocks(model, SMALL)
    expected = [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(9) if not (s > 1 and i == 0)]
    assert names(blocks) == expected


def test_discovery_leaves_a_training_model_as_it_was():
    model = resnet20(width=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(discover_blocks(model, SMALL)) == 7
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics did not move


def test_mobilenetv2_blocks_are_the_inverted_residuals_with_a_skip():
    model = mobilenetv2_cifar(width_mult=0.25).eval()
    expected = [n for n, m in model.named_modules() if isinstance(m, InvertedResidual) and m.use_residual]
    blocks, rejected = analyse_blocks(model, SMALL)
    assert len(expected) >= 5 and names(blocks) == expected
    assert all(b.tail is None and b.replacement == "identity" for b in blocks)
    assert "not its input plus a branch" in rejected["features.2.block"]


def test_user_residual_mlp_blocks_and_why_others_are_not():
    model = ResidualMLP().eval()
    blocks, rejected = analyse_blocks(model, torch.randn(4, 8))
    assert names(blocks) == ["blocks.0", "blocks.1", "blocks.2"]
    assert "ends in `norm` (LayerNorm) after its residual add" in rejected["post"]
    assert "shortcut goes through `proj` (Linear)" in rejected["projected"]
    assert "not called" in rejected["blocks"]


def test_block_called_with_keyword_and_dict_inputs_is_found():
    model = ResidualMLP().eval()
    blocks = discover_blocks(model, {"x": torch.randn(4, 8), "scale": torch.full((4, 16), 0.5)})
    assert names(blocks) == ["blocks.0", "blocks.1", "blocks.2"]


def test_relu_after_the_add_is_kept_when_the_block_input_can_be_negative():
    x = torch.randn(4, 8)
    negative_inputs = discover_blocks(ResidualMLP(relu_after=True).eval(), x)
    relu_inputs = discover_blocks(ResidualMLP(relu_after=True, relu_stem=True).eval(), x)
    assert negative_inputs[0].replacement == "relu"    # the stem is a Linear: its output can be negative
    assert relu_inputs[0].replacement == "identity"    # the stem ends in a ReLU
    assert all(b.replacement == "identity" for b in negative_inputs[1:])  # after a block's ReLU
    # all-zero example inputs do not make a Linear's output look like a ReLU's
    assert discover_blocks(ResidualMLP(relu_after=True).eval(), torch.zeros(4, 8))[0].replacement == "relu"


class Cast(nn.Module):
    """A residual block whose skip path casts its input (Hugging Face RMSNorm style): a no-op to
    the input's own dtype, a real change through bfloat16."""

    def __init__(self, width: int, lossy: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.lossy = lossy

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        h = x.to(torch.bfloat16).to(torch.float32) if self.lossy else x.to(torch.float32)
        return h + self.fc(self.norm(h))


def test_a_cast_to_the_inputs_own_dtype_on_the_skip_path_is_no_change():
    model = nn.Sequential(nn.Linear(4, 8), Cast(8, lossy=False), Cast(8, lossy=True), nn.Linear(8, 2)).eval()
    blocks, rejected = analyse_blocks(model, torch.randn(2, 4))
    assert names(blocks) == ["1"]
    assert "does not take its input unchanged" in rejected["2"]


def test_prenorm_transformer_layer_is_found_through_torch_export_and_postnorm_is_not():
    width = 16
    pre = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    post = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True, norm_first=False)
    model = nn.Sequential(nn.Linear(8, width), pre, post, nn.Linear(width, 2)).eval()
    blocks, rejected = analyse_blocks(model, torch.randn(2, 5, 8))
    assert names(blocks) == ["1"]
    assert blocks[0].params == sum(p.numel() for p in pre.parameters())
    assert "layer_norm" in rejected["2"]


# ---------------------------------------------------------------- dropping


@pytest.mark.parametrize("factory, block_names, inputs", [
    (lambda: resnet20(width=4), ["layer1.1", "layer3.2"], SMALL),
    (lambda: mobilenetv2_cifar(width_mult=0.25), ["features.3"], SMALL),
    (lambda: ResidualMLP(relu_after=True), ["blocks.0", "blocks.2"], torch.randn(1, 8)),
])
def test_dropping_is_the_block_without_its_branch_and_removes_its_params_and_macs(factory, block_names, inputs):
    torch.manual_seed(0)
    model = factory().eval()
    blocks = {b.name: b for b in discover_blocks(model, inputs)}
    dense_macs, dense_params = effective_macs_and_params(model, inputs)
    own = sum(p.numel() for n in block_names for p in model.get_submodule(n).parameters())
    zeroed = copy.deepcopy(model)
    for name in block_names:
        zero_branch(zeroed.get_submodule(name))

    drop_blocks(model, block_names, inputs)
    macs, params = effective_macs_and_params(model, inputs)

    assert all(isinstance(model.get_submodule(n), DroppedBlock) for n in block_names)
    assert dense_params - params == own == sum(blocks[n].params for n in block_names)
    assert dense_macs - macs == sum(blocks[n].macs for n in block_names) > 0
    assert not [k for k in model.state_dict() if any(k.startswith(n + ".") for n in block_names)]
    with torch.no_grad():
        assert torch.allclose(model(inputs), zeroed(inputs), atol=1e-5)  # exact: the block with a zero branch


def test_resnet_basic_block_macs_match_the_conv_arithmetic():
    model = resnet20().eval()  # width 16: layer1 blocks are two 3x3 16->16 convs on 32x32
    block = discover_blocks(model, IMAGE)[0]
    hw, c = 32 * 32, 16
    convs, batchnorms, relus = 2 * 9 * c * c * hw, 2 * 2 * c * hw, 2 * c * hw  # BN: scale and shift; ReLU: twice
    assert block.macs == convs + batchnorms + relus


def test_dropped_blocks_are_gone_from_torch_export_and_onnx(tmp_path: Path):
    model = resnet20(width=4).eval()
    dense_program = export_program(model, SMALL)
    drop_blocks(model, ["layer1.0", "layer2.2"], SMALL)
    program = export_program(model, SMALL)
    lifted = set(program.graph_signature.inputs_to_parameters.values()) | set(program.graph_signature.inputs_to_buffers.values())
    assert not [n for n in lifted if n.startswith(("layer1.0.", "layer2.2."))]
    assert len(program.graph.nodes) < len(dense_program.graph.nodes)
    path = write_onnx(program, tmp_path / "dropped.onnx")
    import onnx

    initializers = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert not [n for n in initializers if "layer1.0." in n or "layer2.2." in n]
    assert [n for n in initializers if "layer1.1." in n]
    with torch.no_grad():
        expected = model(SMALL).numpy()
    np.testing.assert_allclose(onnx_outputs(path, SMALL)[0], expected, atol=1e-4)


def test_dropping_keeps_output_shapes_and_replays_to_the_same_module():
    first, second = resnet20(width=4).eval(), resnet20(width=4).eval()
    second.load_state_dict(first.state_dict())
    for model in (first, second):
        drop_blocks(model, ["layer2.1"], SMALL)
    assert first.state_dict().keys() == second.state_dict().keys()
    with torch.no_grad():
        assert first(SMALL).shape == (1, 10)
        assert torch.equal(first(SMALL), second(SMALL))


# ---------------------------------------------------------------- bad input


def test_a_block_that_cannot_become_the_identity_says_why_and_lists_the_removable_ones():
    model = resnet20(width=4).eval()
    with pytest.raises(BlockError, match=r"'layer2.0' cannot be dropped: it maps .* removable blocks: layer1.0, layer1.1"):
        drop_blocks(model, ["layer1.0", "layer2.0"], SMALL)
    assert not isinstance(model.layer1[0], DroppedBlock)  # nothing changed
    with pytest.raises(BlockError, match=r"'nope' cannot be dropped \(no module of that name"):
        drop_blocks(model, ["nope"], SMALL)
    with pytest.raises(BlockError, match=r"'projected' cannot be dropped: its residual add does not take its input unchanged"):
        drop_blocks(ResidualMLP().eval(), ["projected"], torch.randn(2, 8))


# ---------------------------------------------------------------- importance


def calibration_for_mlp(model: nn.Module) -> Calibration:
    """Batches whose targets are the model's own outputs, with a squared-error loss: the dense model
    scores 0, and dropping any block whose branch is not zero raises it."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 8, generator=g)
    with torch.no_grad():
        y = model(x)
    return Calibration.from_tensors(x, y, batch_size=16, loss=lambda m, batch: ((forward(m, batch) - batch[1]) ** 2).mean())


@pytest.mark.parametrize("criterion", ["cosine", "loss"])
def test_a_block_with_a_zero_branch_is_the_least_important(criterion):
    torch.manual_seed(0)
    model = ResidualMLP(blocks=4).eval()
    zero_branch(model.blocks[2])
    scores = block_importance(model, calibration_for_mlp(model), criterion=criterion)
    assert set(scores) == {"blocks.0", "blocks.1", "blocks.2", "blocks.3"}
    assert scores["blocks.2"] == pytest.approx(0.0, abs=1e-6)
    assert all(scores[n] > 1e-4 for n in scores if n != "blocks.2")
    assert least_important(scores, 1) == ["blocks.2"]
    assert isinstance(model.blocks[2], Residual)  # scoring leaves the model as it was


def test_block_importance_rejects_unknown_criterion_and_names():
    model = ResidualMLP().eval()
    calibration = calibration_for_mlp(model)
    with pytest.raises(ValueError, match="criterion must be one of cosine, loss, but got 'l2'"):
        block_importance(model, calibration, criterion="l2")
    with pytest.raises(BlockError, match="'post' cannot be dropped"):
        block_importance(model, calibration, ["post"])
    with pytest.raises(ValueError, match=r"count must satisfy 0 <= count <= 2"):
        least_important({"a": 0.1, "b": 0.2}, 3)
