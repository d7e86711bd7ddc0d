"""User checkpoints in the layouts people have them, and the dense cache keyed by the model's code."""
from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from evaluators import checkpoint as checkpoint_mod
from evaluators.checkpoint import CheckpointError, architecture_fingerprint, cached_checkpoint_path, ensure_dense_checkpoint, load_dense
from evaluators.tasks import Task, TaskConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _task(model=lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))) -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    return Task(model=model, train_data=(x, x[:, :3].argmax(1)), eval_data=(x[:16], x[:16, :3].argmax(1)), name="toy")


def _same(a: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("layout", ["plain", "data_parallel", "compiled", "training_checkpoint", "lightning", "safetensors"])
def test_weights_load_in_the_layouts_people_save_them(tmp_path, layout):
    task = _task()
    state = task.build_model().state_dict()
    path = tmp_path / ("dense.safetensors" if layout == "safetensors" else "dense.pt")
    if layout == "safetensors":
        save_file(state, str(path))
    else:
        content = {
            "plain": state,
            "data_parallel": {f"module.{k}": v for k, v in state.items()},
            "compiled": {f"_orig_mod.{k}": v for k, v in state.items()},
            "training_checkpoint": {"epoch": 12, "model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []},
                                    "best_accuracy": 0.93},
            "lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3, "global_step": 900,
                          "hyper_parameters": {"lr": 0.1}},
        }[layout]
        torch.save(content, path)
    assert _same(load_dense(task, path), state)
    assert _same(load_dense(task, path.read_bytes()), state)  # as trials receive it


def test_weights_that_do_not_fit_name_the_first_keys_and_shapes(tmp_path):
    task = _task()
    other = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3), nn.Linear(3, 3)).state_dict()
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as info:
        load_dense(task, tmp_path / "other.pt")
    assert str(info.value) == (
        f"task.checkpoint: '{tmp_path / 'other.pt'}' does not match the task's model Sequential: unexpected keys: 3.weight, 3.bias; "
        "shapes differ: 0.weight (12, 6) in the checkpoint, (8, 6) in the model, 0.bias (12,) in the checkpoint, (8,) in the model, "
        "2.weight (3, 12) in the checkpoint, (3, 8) in the model")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no_weights.pt")
    with pytest.raises(CheckpointError, match=r"is a dict of epoch, optimizer with no state dict \(expected tensors by name, or one under state_dict"):
        load_dense(task, tmp_path / "no_weights.pt")


def test_a_whole_pickled_model_says_what_to_save_instead(tmp_path):
    task = _task()
    torch.save(task.build_model(), tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match=r"holds pickled Python objects \(such as torch.nn.modules.container.Sequential\): a whole "
                                              r"model.*save the weights instead: torch.save\(model.state_dict\(\), path\)"):
        load_dense(task, tmp_path / "whole.pt")


def _module_with_forward(tmp_path, body: str):
    """A model class in a module on disk, as a user's code is; returns its class after (re)loading."""
    (tmp_path / "usermodel.py").write_text(textwrap.dedent(f"""
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(6, 3)

            def forward(self, x):
                {body}
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        sys.modules.pop("usermodel", None)  # a new process with the edited code
        return importlib.import_module("usermodel").Net
    finally:
        sys.path.remove(str(tmp_path))


def test_the_cache_key_changes_with_the_models_code_and_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    config = TaskConfig(name="x:y", dense_epochs=1)
    first = _module_with_forward(tmp_path, "return self.fc(x)")
    before = (architecture_fingerprint(first()), cached_checkpoint_path(config, _task(first)))
    assert architecture_fingerprint(first()) == before[0]
    edited = _module_with_forward(tmp_path, "return self.fc(x).relu()")  # the user edits forward: same modules and shapes
    assert (architecture_fingerprint(edited()), cached_checkpoint_path(config, _task(edited))) != before
    sys.modules.pop("usermodel", None)
    assert cached_checkpoint_path(config, _task()) != cached_checkpoint_path(
        config, _task(lambda: nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))))


def test_the_cached_dense_model_is_named_when_reused_and_retrain_trains_it_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    task = _task()
    config = TaskConfig(name="x:y", dense_epochs=2, batch_size=16)
    threads_seen: list[int] = []
    real_loss = task.loss

    def spying_loss(model, batch):
        threads_seen.append(torch.get_num_threads())
        return real_loss(model, batch)

    task.loss = spying_loss
    torch.set_num_threads(2)
    lines: list[str] = []
    path = ensure_dense_checkpoint(config, task, log=lines.append, threads=1)
    assert torch.get_num_threads() == 2 and set(threads_seen) == {1} and len(threads_seen) == 2 * 4
    assert lines[0].startswith("training the dense toy model for 2 epochs")
    assert [line.split(":")[0] for line in lines[1:3]] == ["  dense epoch 1/2", "  dense epoch 2/2"]
    assert lines[3].startswith("dense model trained: accuracy ")

    lines.clear()
    assert ensure_dense_checkpoint(config, task, log=lines.append) == path
    assert lines == [f"using the cached dense model at {path} (task.retrain: true trains it again)"]
    mtime = path.stat().st_mtime_ns
    lines.clear()
    assert ensure_dense_checkpoint(TaskConfig(name="x:y", dense_epochs=2, batch_size=16, retrain=True), task, log=lines.append) == path
    assert lines[0].startswith("training the dense toy model") and path.stat().st_mtime_ns != mtime
    assert TaskConfig(name="x:y", retrain=True).cache_key() == TaskConfig(name="x:y").cache_key()
    monkeypatch.setattr(checkpoint_mod, "train", None)  # not called again
