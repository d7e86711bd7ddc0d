"""Unit tests for evaluators: measurement, training, dense checkpoints, one trial, configs."""
from __future__ import annotations

import contextlib
import dataclasses

import copy
import io
import math
import pickle
import time
import types

import pytest
import torch
from torch import nn

from evaluators import checkpoint as checkpoint_mod
from evaluators import measure, trial
from evaluators.checkpoint import CheckpointError, cached_checkpoint_path, ensure_dense_checkpoint, load_dense
from evaluators.models import MLP, DigitsCNN
from evaluators.pruning import apply
from evaluators.tasks import Task, TaskConfig
from evaluators.train import NonFiniteLossError, accuracy, train
from evaluators.trial import Deployments, FinetuneConfig, MeasureConfig, Reference, evaluate, measure_latencies, prune_and_finetune
from spaces import Policy

X8 = torch.zeros(1, 1, 8, 8)
HALF = {"features.0": 0.5, "features.3": 0.5, "features.7": 0.5, "classifier.1": 0.5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _toy_data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.flatten(1)[:, :10].argmax(dim=1)).long()
    return x, y


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- measure


def test_latency_percentiles_are_ordered_and_positive():
    stats = measure.latency_ms(DigitsCNN(width=4), torch.zeros(4, 1, 8, 8), warmup=1, repeats=9)
    assert set(stats) == {"latency_ms", "latency_p10_ms", "latency_p90_ms"}
    assert 0 < stats["latency_p10_ms"] <= stats["latency_ms"] <= stats["latency_p90_ms"]


class _Sleeper(nn.Module):
    """Each forward pass sleeps for the next duration of a list: latencies with known order statistics."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = list(seconds)

    def forward(self, x):
        time.sleep(self.seconds.pop(0))
        return x


def test_latency_statistics_are_the_median_and_percentiles_of_the_timed_passes():
    # 11 passes of 0, 5, ..., 50 ms in shuffled order: sorted, p10 is the 2nd (5 ms), the median
    # the 6th (25 ms) and p90 the 10th (45 ms); sleep only ever overshoots, so only lower bounds are checked
    ms = [25, 0, 50, 10, 45, 5, 35, 20, 40, 15, 30]
    stats = measure.latency_ms(_Sleeper([m / 1000 for m in ms]), torch.zeros(1), warmup=0, repeats=len(ms))
    assert 5 <= stats["latency_p10_ms"] < stats["latency_ms"] < stats["latency_p90_ms"]
    assert stats["latency_ms"] >= 25
    assert stats["latency_p90_ms"] >= 45


def test_latency_restores_thread_count_and_rejects_zero_repeats():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        measure.latency_ms(nn.Linear(4, 2), torch.zeros(2, 4), warmup=0, repeats=2, threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(ValueError, match="repeats"):
        measure.latency_ms(nn.Linear(4, 2), torch.zeros(2, 4), repeats=0)


def test_interleaved_timing_runs_the_calls_round_robin():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("dense", "a", "b")}
    stats = measure.interleaved_latency_ms(calls, rounds=3, warmup=1, repeats=2)
    # each round: every call's warm-up and timed runs, in turn; three rounds
    assert order == (["dense"] * 3 + ["a"] * 3 + ["b"] * 3) * 3
    assert set(stats) == {"dense", "a", "b"}
    with pytest.raises(ValueError, match="rounds"):
        measure.interleaved_latency_ms(calls, rounds=0, warmup=0, repeats=1)


def test_interleaved_timing_keeps_ratios_when_the_machine_slows_down(monkeypatch):
    # two equally fast calls on a machine that gets slower with every run: timed one after the
    # other, the second looks ~1.7x slower; timed round-robin, they come out within 25% of each
    # other. The machine is simulated (a clock each run advances), so load here cannot move it.
    clock = {"now": 0.0, "runs": 0}
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))

    def work():
        clock["runs"] += 1
        clock["now"] += 0.002 * (1 + clock["runs"] / 20)

    calls = {"first": work, "second": work}
    one_after_other = {k: measure.interleaved_latency_ms({k: c}, rounds=1, warmup=0, repeats=20)[k]["latency_ms"] for k, c in calls.items()}
    clock["runs"] = 0
    together = measure.interleaved_latency_ms(calls, rounds=10, warmup=0, repeats=2)
    assert one_after_other["second"] / one_after_other["first"] > 1.5
    assert together["second"]["latency_ms"] / together["first"]["latency_ms"] < 1.25


@pytest.mark.parametrize("channels_last", [False, True])
def test_measure_latencies_times_each_policy_model(digits_task, digits_checkpoint, channels_last):
    config = MeasureConfig(batch_size=8, warmup=1, repeats=3, channels_last=channels_last)
    policies = {"dense": Policy(criterion="l1", ratios={}), "pruned": Policy(criterion="l1", ratios={"features.0": 0.5})}
    stats = measure_latencies(policies, digits_task, digits_checkpoint, config, rounds=2)
    assert set(stats) == {"dense", "pruned"}
    for values in stats.values():
        assert 0 < values["latency_p10_ms"] <= values["latency_ms"] <= values["latency_p90_ms"]


def test_deployments_build_each_artifact_once_however_often_it_is_timed(digits_task, digits_checkpoint, monkeypatch):
    # the end-of-search re-timing times the frontier in passes: each policy is pruned and exported once
    built, open_ = [], []
    real = trial._deployed

    @contextlib.contextmanager
    def counted(model, quantization, *args, **kwargs):
        built.append(quantization)
        with real(model, quantization, *args, **kwargs) as artifact:
            open_.append(model)
            try:
                yield artifact
            finally:
                open_.remove(model)

    monkeypatch.setattr(trial, "_deployed", counted)
    config = MeasureConfig(batch_size=8, warmup=1, repeats=3)
    dense, pruned = Policy(criterion="l1", ratios={}), Policy(criterion="l1", ratios={"features.0": 0.5})
    with Deployments(digits_task, digits_checkpoint, config) as ready:
        first = ready.latencies({"dense": dense, "pruned": pruned}, rounds=2)
        second = ready.latencies({"dense": dense, "pruned": pruned}, rounds=2)
        assert len(built) == 2
        third = ready.latencies({"pruned": pruned, "other": Policy(criterion="l1", ratios={"features.0": 0.25})}, rounds=2)
        assert len(built) == 3 and len(open_) == 2  # only the new policy is built; "dense", left out, is released
        changed = ready.latencies({"pruned": Policy(criterion="l2", ratios={"features.0": 0.5})}, rounds=2)
        assert len(built) == 4  # a key whose policy changed is built again
        again = ready.latencies({"dense": dense}, rounds=2)
        assert len(built) == 5 and len(open_) == 1  # released when a call left it out: built again
    assert not open_  # the context's end releases the rest
    for stats in (first, second, third, changed, again):
        for values in stats.values():
            assert 0 < values["latency_p10_ms"] <= values["latency_ms"] <= values["latency_p90_ms"]
    assert set(third) == {"pruned", "other"}


def test_size_mb_is_bytes_of_saved_state_dict_and_shrinks_after_pruning():
    model = DigitsCNN(width=8)

    def saved_bytes(m):
        buffer = io.BytesIO()
        torch.save(m.state_dict(), buffer)
        return len(buffer.getvalue())

    dense = measure.size_mb(model)
    assert dense == saved_bytes(model) / 1e6
    # dominated by float32 weights: at least 4 bytes per parameter
    assert dense * 1e6 >= 4 * _numel(model)
    apply(Policy(criterion="l1", ratios=HALF), model, X8)
    pruned = measure.size_mb(model)
    assert pruned == saved_bytes(model) / 1e6
    assert pruned < dense


def test_macs_and_params_of_known_layers():
    # Conv2d(1 -> 2, 3x3, no bias) on 5x5: 2 * 3 * 3 outputs, 9 MACs each; Linear(18 -> 4, no bias): 72 MACs
    model = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.Flatten(), nn.Linear(18, 4, bias=False))
    macs, params = measure.macs_and_params(model, torch.zeros(1, 1, 5, 5))
    assert params == 2 * 9 + 18 * 4
    assert macs == 2 * 3 * 3 * 9 + 18 * 4


def test_macs_and_params_decrease_after_pruning_and_params_is_numel():
    model = DigitsCNN(width=8)
    model.train()
    macs, params = measure.macs_and_params(model, X8)
    assert model.training  # mode restored
    assert params == _numel(model)
    apply(Policy(criterion="l2", ratios=HALF), model, X8)
    pmacs, pparams = measure.macs_and_params(model, X8)
    assert pparams == _numel(model)
    assert pparams < params
    assert pmacs < macs


# --------------------------------------------------------------------------- train


def test_train_step_count_follows_epochs_and_max_steps():
    data = _toy_data(100)
    # steps per epoch = ceil(100 / 32) = 4
    assert train(MLP(hidden=(8,)), data, FinetuneConfig(epochs=2, lr=0.01, batch_size=32)) == 8
    assert train(MLP(hidden=(8,)), data, FinetuneConfig(epochs=0.6, lr=0.01, batch_size=32)) == round(0.6 * 4)
    assert train(MLP(hidden=(8,)), data, FinetuneConfig(epochs=5, lr=0.01, batch_size=32, max_steps=3)) == 3


def test_train_with_zero_epochs_does_not_touch_weights():
    model = MLP(hidden=(8,))
    before = copy.deepcopy(model.state_dict())
    assert train(model, _toy_data(), FinetuneConfig(epochs=0, lr=0.1)) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_lowers_the_loss_and_is_reproducible():
    data = _toy_data(128)
    torch.manual_seed(0)
    a = MLP(hidden=(16,))
    b = copy.deepcopy(a)
    loss = nn.CrossEntropyLoss()
    with torch.no_grad():
        start = loss(a(data[0]), data[1]).item()
    train(a, data, FinetuneConfig(epochs=5, lr=0.05, batch_size=32), seed=3)
    train(b, data, FinetuneConfig(epochs=5, lr=0.05, batch_size=32), seed=3)
    with torch.no_grad():
        assert loss(a(data[0]), data[1]).item() < start
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_train_raises_on_absurd_learning_rate():
    with pytest.raises(NonFiniteLossError, match="lr="):
        train(MLP(hidden=(16,)), _toy_data(128), FinetuneConfig(epochs=2, lr=1e30, batch_size=16))


def test_train_raises_on_nan_data():
    x, y = _toy_data(32)
    x[3, 0, 2, 2] = float("nan")
    with pytest.raises(NonFiniteLossError):
        train(MLP(hidden=(16,)), (x, y), FinetuneConfig(epochs=1, lr=0.01, batch_size=64))


def test_accuracy_counts_correct_predictions():
    class Fixed(nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x.flatten(1)[:, 0].long(), 3).float()

    x = torch.tensor([0, 1, 2, 2, 1]).float().reshape(5, 1)
    y = torch.tensor([0, 1, 1, 2, 0])
    assert accuracy(Fixed(), (x, y), batch_size=2) == pytest.approx(3 / 5)


# --------------------------------------------------------------------------- checkpoint


def _tiny_task(model_factory=lambda: MLP(hidden=(8,))) -> Task:
    return Task(model=model_factory, train_data=_toy_data(32), eval_data=_toy_data(16, seed=1), num_classes=10, name="toy")


def test_ensure_dense_checkpoint_trains_once_then_reuses_cache(tmp_path, monkeypatch, digits_task):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    config = TaskConfig(name="digits", dense_epochs=1)
    calls = []
    real_train = checkpoint_mod.train

    def counting_train(model, data, training, **kwargs):
        calls.append(training)
        return real_train(model, data, training, **kwargs)

    monkeypatch.setattr(checkpoint_mod, "train", counting_train)
    path = ensure_dense_checkpoint(config, digits_task, log=lambda _msg: None)
    assert path == cached_checkpoint_path(config, digits_task)
    assert path.is_file() and tmp_path in path.parents
    assert len(calls) == 1
    assert calls[0].epochs == 1 and calls[0].lr == config.dense_lr
    mtime = path.stat().st_mtime_ns

    def no_train(*args, **kwargs):
        raise AssertionError("the cached checkpoint should have been reused")

    monkeypatch.setattr(checkpoint_mod, "train", no_train)
    again = ensure_dense_checkpoint(config, digits_task, log=lambda _msg: None)
    assert again == path
    assert path.stat().st_mtime_ns == mtime
    assert not list(path.parent.glob("*.tmp"))

    model = load_dense(digits_task, path)
    assert isinstance(model, DigitsCNN) and not model.training
    assert accuracy(model, digits_task.eval_data) > 0.5  # it was really trained


def test_cache_key_depends_on_training_settings_but_not_on_checkpoint(tmp_path, monkeypatch, digits_task):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    a = cached_checkpoint_path(TaskConfig(name="digits", dense_epochs=1), digits_task)
    assert a != cached_checkpoint_path(TaskConfig(name="digits", dense_epochs=2), digits_task)
    assert a != cached_checkpoint_path(TaskConfig(name="digits", dense_epochs=1, model="mlp"), digits_task)
    assert a == cached_checkpoint_path(TaskConfig(name="digits", dense_epochs=1, checkpoint="x.pt"), digits_task)


def test_cache_key_depends_on_the_training_data(tmp_path, monkeypatch, digits_task):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    config = TaskConfig(name="digits", dense_epochs=1)
    x, y = digits_task.train_data
    other = dataclasses.replace(digits_task, train_data=(x.clone(), y.roll(1)))
    same = dataclasses.replace(digits_task, train_data=(x.clone(), y.clone()))
    assert cached_checkpoint_path(config, digits_task) == cached_checkpoint_path(config, same)
    assert cached_checkpoint_path(config, digits_task) != cached_checkpoint_path(config, other)


def test_unreadable_cached_checkpoint_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    config = TaskConfig(name="digits", dense_epochs=1, model="mlp")
    task = _tiny_task()
    path = cached_checkpoint_path(config, task)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    messages = []
    assert ensure_dense_checkpoint(config, task, log=messages.append) == path
    assert any("unreadable" in m for m in messages)
    load_dense(task, path)  # now valid


def test_user_checkpoint_is_used_as_is(tmp_path):
    task = _tiny_task()
    model = task.build_model()
    path = tmp_path / "dense.pt"
    torch.save({"state_dict": model.state_dict()}, path)  # the wrapped form is accepted too
    config = TaskConfig(name="digits", dense_epochs=1, checkpoint=str(path))
    assert ensure_dense_checkpoint(config, task, log=lambda _m: None) == path.resolve()
    loaded = load_dense(task, path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_checkpoint_of_another_model_does_not_match(tmp_path, digits_task):
    path = tmp_path / "mlp.pt"
    torch.save(MLP(in_features=64).state_dict(), path)
    with pytest.raises(CheckpointError, match="does not match") as info:
        load_dense(digits_task, path)
    assert "DigitsCNN" in str(info.value)
    config = TaskConfig(name="digits", checkpoint=str(path))
    with pytest.raises(CheckpointError, match="does not match"):
        ensure_dense_checkpoint(config, digits_task, log=lambda _m: None)


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "dense.pt"
    with pytest.raises(CheckpointError) as info:
        load_dense(_tiny_task(), path)
    assert str(path) in str(info.value)


class _Trap:
    """Unpickling this object creates a file: proof that arbitrary code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_loading_uses_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"net.1.weight": torch.zeros(1), "payload": _Trap(marker)}, path)
    with pytest.raises(CheckpointError, match=r"holds pickled Python objects \(such as io.open\).*save the weights instead") as info:
        load_dense(_tiny_task(), path)
    assert str(path) in str(info.value)
    assert not marker.exists()

    # the trap does fire under a full unpickler, so the check above can fail
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_plain_pickle_of_an_arbitrary_object_is_rejected(tmp_path):
    path = tmp_path / "obj.pt"
    with open(path, "wb") as handle:
        pickle.dump({"weights": _Trap(tmp_path / "never")}, handle, protocol=2)
    with pytest.raises(CheckpointError):
        load_dense(_tiny_task(), path)
    assert not (tmp_path / "never").exists()


# --------------------------------------------------------------------------- trial.evaluate


@pytest.fixture(scope="module")
def dense_digits(digits_checkpoint, digits_task):
    """The shared one-epoch DigitsCNN checkpoint, its test accuracy and its parameter count."""
    model = load_dense(digits_task, digits_checkpoint)
    return digits_checkpoint, accuracy(model, digits_task.eval_data), _numel(model)


FAST_MEASURE = MeasureConfig(batch_size=8, warmup=1, repeats=3)


def test_evaluate_half_policy_on_digits(digits_task, dense_digits):
    path, dense_acc, dense_params = dense_digits
    policy = Policy(criterion="l1", ratios=HALF)
    dense = Reference({"accuracy": dense_acc}, macs=0, params=dense_params)
    metrics = evaluate(policy, digits_task, path, FinetuneConfig(epochs=0.2), FAST_MEASURE, dense=dense)

    dense_model = load_dense(digits_task, path)
    dense_macs, _ = measure.macs_and_params(dense_model, X8)
    assert 0 < metrics.params < dense_params
    assert 0 < metrics.macs < dense_macs
    assert metrics.size_mb < measure.size_mb(dense_model)
    assert metrics.param_sparsity == pytest.approx(1 - metrics.params / dense_params)
    accuracy_ = metrics.scores["accuracy"]
    assert 0.0 <= accuracy_ <= 1.0
    assert metrics.changes["accuracy_drop"] == pytest.approx(dense_acc - accuracy_)
    assert metrics.changes["accuracy_change"] == pytest.approx(accuracy_ - dense_acc)
    assert metrics.changes["params_change"] == metrics.params - dense_params
    steps_per_epoch = math.ceil(len(digits_task.train_data[0]) / 64)
    assert metrics.finetune_steps == round(0.2 * steps_per_epoch)
    assert 0 < metrics.latency_p10_ms <= metrics.latency_ms <= metrics.latency_p90_ms
    assert min(metrics.time_prune_s, metrics.time_finetune_s, metrics.time_measure_s) >= 0
    assert set(metrics.to_dict()) >= {"accuracy", "accuracy_drop", "accuracy_change", "macs_change", "params", "size_mb",
                                      "latency_ms", "param_sparsity"}
    # the checkpoint file itself is left untouched
    assert all(torch.equal(v, load_dense(digits_task, path).state_dict()[k]) for k, v in dense_model.state_dict().items())


def test_evaluate_without_finetune_equals_pruning_the_checkpoint_by_hand(digits_task, dense_digits):
    path, dense_acc, dense_params = dense_digits
    policy = Policy(criterion="l2", ratios={"features.3": 0.5, "classifier.1": 0.25})
    metrics = evaluate(policy, digits_task, path, FinetuneConfig(epochs=0), FAST_MEASURE)
    by_hand = apply(policy, load_dense(digits_task, path), digits_task.example())
    assert metrics.finetune_steps == 0
    assert metrics.scores["accuracy"] == accuracy(by_hand, digits_task.eval_data)
    assert metrics.params == _numel(by_hand)
    assert metrics.to_dict()["accuracy_drop"] == 0.0  # no dense reference given: it is its own


def test_evaluate_with_empty_policy_keeps_the_dense_model(digits_task, dense_digits):
    path, dense_acc, dense_params = dense_digits
    metrics = evaluate(Policy(criterion="l1", ratios={}), digits_task, path, FinetuneConfig(epochs=0), FAST_MEASURE,
                       dense=Reference({"accuracy": dense_acc}, macs=0, params=dense_params))
    assert metrics.params == dense_params
    assert metrics.param_sparsity == 0.0
    assert metrics.scores == {"accuracy": dense_acc}
    assert metrics.changes["accuracy_drop"] == 0.0 == metrics.changes["params_change"]


def test_evaluate_accepts_checkpoint_bytes(digits_task, dense_digits):
    path, dense_acc, dense_params = dense_digits
    policy = Policy(criterion="l1", ratios={"features.7": 0.5})
    from_path = evaluate(policy, digits_task, path, FinetuneConfig(epochs=0), FAST_MEASURE)
    from_bytes = evaluate(policy, digits_task, path.read_bytes(), FinetuneConfig(epochs=0), FAST_MEASURE)
    assert (from_bytes.scores, from_bytes.params, from_bytes.macs) == (from_path.scores, from_path.params, from_path.macs)
    with pytest.raises(CheckpointError, match="does not match"):
        load_dense(digits_task, measure.state_dict_bytes(MLP(in_features=64)))


def test_prune_and_finetune_replays_to_the_same_model(digits_task, dense_digits):
    path = dense_digits[0]
    policy = Policy(criterion="random", ratios=HALF, seed=5)
    finetune = FinetuneConfig(epochs=0.1)
    a, timings = prune_and_finetune(policy, digits_task, path, finetune)
    b, _ = prune_and_finetune(policy, digits_task, path, finetune)
    assert timings["finetune_steps"] == round(0.1 * math.ceil(len(digits_task.train_data[0]) / 64)) > 0
    assert not a.training
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # and fine-tuning really changed the pruned weights
    pruned = apply(policy, load_dense(digits_task, path), X8)
    assert not torch.equal(pruned.state_dict()["features.0.weight"], sa["features.0.weight"])


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "section, kwargs, field, shown",
    [
        (FinetuneConfig, {"epochs": -1.0}, "epochs", "-1.0"),
        (FinetuneConfig, {"lr": 0.0}, "lr", "0.0"),
        (FinetuneConfig, {"lr": float("nan")}, "lr", "nan"),
        (FinetuneConfig, {"batch_size": 0}, "batch_size", "0"),
        (FinetuneConfig, {"max_steps": -5}, "max_steps", "-5"),
        (MeasureConfig, {"device": "tpu"}, "device", "'tpu'"),
        (MeasureConfig, {"batch_size": 0}, "batch_size", "0"),
        (MeasureConfig, {"threads": 0}, "threads", "0"),
        (MeasureConfig, {"repeats": 0}, "repeats", "0"),
        (MeasureConfig, {"warmup": -1}, "warmup", "-1"),
    ],
)
def test_finetune_and_measure_configs_reject_bad_values_naming_the_field(section, kwargs, field, shown):
    with pytest.raises(ValueError) as info:
        section(**kwargs)
    message = str(info.value)
    assert message.startswith(field + ":")
    assert shown in message


def test_finetune_config_accepts_zero_epochs_and_fractions():
    assert FinetuneConfig(epochs=0).epochs == 0
    assert FinetuneConfig(epochs=0.25, max_steps=0).max_steps == 0


@pytest.mark.parametrize("epochs", [float("nan"), float("inf")])
def test_finetune_config_rejects_non_finite_epochs(epochs):
    with pytest.raises(ValueError, match="epochs"):
        FinetuneConfig(epochs=epochs)


@pytest.mark.parametrize("kwargs", [{"momentum": 0.0}, {"momentum": -0.5}, {"weight_decay": -1.0}])
def test_finetune_config_values_it_accepts_are_trainable(kwargs):
    try:
        config = FinetuneConfig(epochs=1, **kwargs)
    except ValueError as exc:  # rejecting it up front, naming the field, is fine too
        assert next(iter(kwargs)) in str(exc)
        return
    train(MLP(hidden=(8,)), _toy_data(32), config)


def test_measure_config_resolves_devices():
    assert MeasureConfig(device="cpu").resolve_device() == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert MeasureConfig(device="auto").resolve_device().type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            MeasureConfig(device="cuda").resolve_device()


@pytest.mark.parametrize(
    "kwargs, field",
    [({"name": "imagenet"}, "name"), ({"model": "resnet"}, "model"), ({"dense_epochs": 0}, "dense_epochs"),
     ({"dense_lr": 0.0}, "dense_lr"), ({"batch_size": 0}, "batch_size")],
)
def test_task_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        TaskConfig(**kwargs)
