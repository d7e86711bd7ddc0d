"""Export files on their own (no MLflow): several inputs, dynamic sequence length, relative checks,
and the files that pass kept when another fails. Marked integration: torch.export and the ONNX
exporter take several seconds per model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import search.export as export_module
from evaluators import zoo
from evaluators.onnx_backend import onnx_session
from search.export import load_pruned, stage_export
from spaces import Policy
from tests.models import TokenClassifier

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.integration]


def _tokens(n: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 50, (n, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_a_two_input_text_model_exports_with_dynamic_batch_and_sequence(tmp_path):
    torch.manual_seed(0)
    model = TokenClassifier(vocab_size=50).eval()
    diffs, left_out = stage_export(tmp_path, model, Policy("l1", {}), _tokens(2, 12), _tokens(16, 12), tolerance=1e-4, meta={})
    assert left_out == [] and diffs["onnx_max_rel_diff"] < 1e-5 and diffs["pt2_max_rel_diff"] < 1e-5
    shorter = _tokens(3, 5, seed=1)  # another batch size and a shorter sequence than exported with
    with torch.no_grad():
        expected = model(**shorter).numpy()
        program = torch.export.load(str(tmp_path / "model.pt2")).module()
        assert np.allclose(program(**shorter).numpy(), expected, atol=1e-5)
    session = onnx_session(tmp_path / "model.onnx")
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    got = session.run(None, {k: v.numpy() for k, v in shorter.items()})[0]
    assert np.allclose(got, expected, atol=1e-5)
    assert torch.equal(load_pruned(lambda: TokenClassifier(vocab_size=50), tmp_path / "model.pt")(**shorter), model(**shorter))  # zeros of the saved input spec trace it


def test_a_transformer_takes_a_shorter_sequence_after_export(tmp_path):
    torch.manual_seed(0)
    model = zoo.TextTransformer(vocab_size=40, max_len=16, embed_dim=16, num_heads=2, ff_dim=32, num_layers=1).eval()
    ids = torch.randint(1, 40, (8, 16), generator=torch.Generator().manual_seed(0))
    diffs, left_out = stage_export(tmp_path, model, Policy("l1", {}), ids[:2], ids, tolerance=1e-4, meta={})
    assert left_out == []
    short = ids[:3, :9]
    with torch.no_grad():
        expected = model(short).numpy()
        assert np.allclose(torch.export.load(str(tmp_path / "model.pt2")).module()(short).numpy(), expected, atol=1e-4)
    session = onnx_session(tmp_path / "model.onnx")
    assert np.allclose(session.run(None, {"input": short.numpy()})[0], expected, atol=1e-4)


def test_an_lstm_whose_sequence_torch_export_fixes_is_exported_with_a_note(tmp_path):
    torch.manual_seed(0)
    model = zoo.TextLSTM(vocab_size=40, embed_dim=16, hidden_size=16, head_size=16, num_layers=1).eval()
    ids = torch.randint(1, 40, (8, 16), generator=torch.Generator().manual_seed(0))
    diffs, notes = stage_export(tmp_path, model, Policy("l1", {}), ids[:2], ids, tolerance=1e-4, meta={})
    assert {p.name for p in tmp_path.iterdir()} == {"policy.json", "model.pt", "model.pt2", "model.onnx"}
    assert notes == ["model.pt2 and model.onnx take input 'tokens' with dimension 1 fixed at 16 (torch.export specialised it, as it "
                     "does for an nn.LSTM unrolled over its sequence): pad shorter inputs to 16"]
    with torch.no_grad():  # the batch stays dynamic
        assert np.allclose(torch.export.load(str(tmp_path / "model.pt2")).module()(ids[:3]).numpy(), model(ids[:3]).numpy(), atol=1e-5)


class Large(nn.Module):
    """Logits near 700, as an EfficientNet gave: float32 rounding alone differs by ~1e-3 there."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return 700 + self.fc(self.conv(x).mean(dim=(2, 3)))


def test_checks_are_relative_and_a_failed_one_leaves_out_only_its_file(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Large().eval()
    x = torch.randn(8, 3, 12, 12)
    real = export_module.onnx_outputs
    # 2e-3 absolute on logits near 700: 3e-6 relative, a pass
    monkeypatch.setattr(export_module, "onnx_outputs", lambda path, inputs: [o + 2e-3 for o in real(path, inputs)])
    (tmp_path / "a").mkdir()
    diffs, left_out = stage_export(tmp_path / "a", model, Policy("l1", {}), x[:2], x, tolerance=1e-4, meta={})
    assert left_out == [] and diffs["onnx_max_abs_diff"] > 1e-3 and diffs["onnx_max_rel_diff"] < 1e-5
    # 1% of the largest output: a fail, and only model.onnx goes
    monkeypatch.setattr(export_module, "onnx_outputs", lambda path, inputs: [o * 1.01 for o in real(path, inputs)])
    (tmp_path / "b").mkdir()
    diffs, left_out = stage_export(tmp_path / "b", model, Policy("l1", {}), x[:2], x, tolerance=1e-4, meta={})
    assert {p.name for p in (tmp_path / "b").iterdir()} == {"policy.json", "model.pt", "model.pt2"}
    assert len(left_out) == 1 and left_out[0].startswith("model.onnx not written: its outputs differ from the torch model by 0.01 "
                                                         "(relative to the largest output; ")
    assert "over 8 test inputs, above the tolerance 0.0001 (--onnx-tolerance)" in left_out[0]
