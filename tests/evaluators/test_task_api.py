"""The task API: data sources, the check of a task, scores and objectives, the fine-tune hook,
user tasks through trials, augmentation."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from evaluators.batches import Calibration, cross_entropy_loss
from evaluators.builtin_tasks import make_cifar10_task
from evaluators.checks import EvaluationError, TaskError, check_objectives, check_scores, check_task
from evaluators.data import DataError, DatasetSource, InMemory, LoaderSource, as_source, random_crop_flip
from evaluators.models import MLP
from evaluators.tasks import FinetuneRun, Task, TaskConfig, make_task
from evaluators.trial import FinetuneConfig, MeasureConfig, Reference, evaluate, finetune_model
from spaces import Policy
from tests.models import TokenClassifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST_MEASURE = MeasureConfig(batch_size=8, warmup=1, repeats=3)


def _xy(n: int = 40, features: int = 6, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return x, x[:, :classes].argmax(dim=1)


def _mlp(features: int = 6, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


class Rows(torch.utils.data.Dataset):
    """Examples read one at a time from an .npy file on disk (memory-mapped), as a user's Dataset."""

    def __init__(self, folder: Path, split: str) -> None:
        self.x = np.load(folder / f"{split}_x.npy", mmap_mode="r")
        self.y = np.load(folder / f"{split}_y.npy", mmap_mode="r")
        self.reads = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.reads += 1
        return torch.from_numpy(np.array(self.x[i])), int(self.y[i])


@pytest.fixture
def files(tmp_path) -> Path:
    for split, seed in (("train", 0), ("test", 1)):
        x, y = _xy(40, seed=seed)
        np.save(tmp_path / f"{split}_x.npy", x.numpy())
        np.save(tmp_path / f"{split}_y.npy", y.numpy())
    return tmp_path


# --------------------------------------------------------------------------- data sources


def test_tensors_in_memory_are_sliced_and_shuffled_by_the_generator():
    x, y = _xy(10)
    source = as_source((x, y), "train_data")
    assert isinstance(source, InMemory) and source.num_examples() == 10 and source.batches_per_epoch(4) == 3
    plain = list(source.batches(4))
    assert [len(b[0]) for b in plain] == [4, 4, 2] and plain[0][0].data_ptr() == x.data_ptr()  # views, no copy
    a = torch.cat([b[1] for b in source.batches(4, shuffle=True, generator=torch.Generator().manual_seed(3))])
    b = torch.cat([b[1] for b in source.batches(4, shuffle=True, generator=torch.Generator().manual_seed(3))])
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(a, y[order])
    as_dict = as_source({"x": x, "labels": y})
    assert [sorted(batch) for batch in as_dict.batches(8)] == [["labels", "x"]] * 2


@pytest.mark.parametrize("data, message", [
    ((torch.zeros(100, 3), torch.zeros(90).long()), "train_data: its tensors must have one length (one row per example), "
                                                      "but got train_data[0] 100, train_data[1] 90"),
    ((np.zeros((4, 3), np.float32), np.zeros(4)), "train_data[0]: is a numpy array; give torch tensors (torch.from_numpy(array))"),
    ((torch.zeros(4, 3), 1), "train_data[1]: must be a tensor, but got int"),
    (3, "train_data: must be tensors (a tensor, a tuple or a dict of them), a torch Dataset, a DataLoader or a function"),
    ((x for x in range(3)), "train_data: is an iterator (a generator?), which can be read only once"),
])
def test_data_that_cannot_be_read_is_one_line(data, message):
    with pytest.raises(DataError) as info:
        as_source(data, "train_data")
    assert str(info.value).startswith(message)


def test_a_dataset_is_read_lazily_batch_by_batch(files):
    dataset = Rows(files, "train")
    source = as_source(dataset, "train_data")
    assert isinstance(source, DatasetSource) and source.num_examples() == 40 and source.batches_per_epoch(16) == 3
    first = next(source.batches(16))
    assert dataset.reads == 16 and first[0].shape == (16, 6) and first[1].dtype == torch.int64  # collated
    seeded = [torch.cat([b[1] for b in source.batches(16, shuffle=True, generator=torch.Generator().manual_seed(1))])
              for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], torch.from_numpy(np.array(dataset.y)))


def test_iterable_datasets_and_loader_factories_are_streamed():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            x, y = _xy(10)
            return iter(zip(x, y))

    stream = as_source(Stream())
    assert stream.num_examples() is None and stream.batches_per_epoch(4) is None
    assert [len(b[0]) for b in stream.batches(4, shuffle=True, generator=torch.Generator())] == [4, 4, 2]

    asked = []

    def make(batch_size):
        asked.append(batch_size)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_xy(10)), batch_size=batch_size)

    source = as_source(make)
    assert isinstance(source, LoaderSource) and source.batches_per_epoch(3) == 4
    assert [len(b[0]) for b in source.batches(5)] == [5, 5] and asked[-1] == 5
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_xy(10)), batch_size=6)
    assert [len(b[0]) for b in as_source(loader).batches(64)] == [6, 4]  # the loader keeps its batch size
    with pytest.raises(DataError, match="the function must return a re-iterable of batches such as a DataLoader, but it returned an iterator"):
        next(as_source(lambda batch_size: iter([])).batches(4))


def test_random_crop_flip_crops_the_padded_image_and_flips_half():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    labels = torch.tensor([4, 7])
    out = random_crop_flip((images, labels), torch.Generator().manual_seed(0))
    again = random_crop_flip((images, labels), torch.Generator().manual_seed(0))
    assert out[0].shape == images.shape and torch.equal(out[1], labels) and torch.equal(out[0], again[0])
    padded = nn.functional.pad(images, (4, 4, 4, 4))
    for n in range(2):
        crops = [padded[n, :, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[0][n], c) or torch.equal(out[0][n], c.flip(-1)) for c in crops)
    flips = [random_crop_flip(images, torch.Generator().manual_seed(s)) for s in range(40)]
    flipped = sum(any(torch.equal(f[0], padded[0, :, dy:dy + 8, dx:dx + 8].flip(-1)) for dy in range(9) for dx in range(9)
                      if not torch.equal(padded[0, :, dy:dy + 8, dx:dx + 8], padded[0, :, dy:dy + 8, dx:dx + 8].flip(-1)))
                  for f in flips)
    assert 8 < flipped < 32  # about half
    tokens = torch.ones(2, 5, dtype=torch.long)
    assert random_crop_flip({"input_ids": tokens, "labels": labels}, torch.Generator())["input_ids"] is tokens


def test_cifar10_augment_option_transforms_training_batches_only(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cifar10.npz", x_train=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), y_train=np.arange(20) % 10,
             x_test=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), y_test=np.arange(10) % 10)
    plain = make_cifar10_task(TaskConfig(name="cifar10", data_root=str(tmp_path)))
    augmented = make_cifar10_task(TaskConfig(name="cifar10", data_root=str(tmp_path), options={"augment": True}))
    assert plain.train_transform is None and augmented.train_transform is random_crop_flip
    train = next(augmented.train_batches(20, seed=0))
    as_is = next(plain.train_batches(20, seed=0))
    assert torch.equal(train[1], as_is[1]) and not torch.equal(train[0], as_is[0])  # same order, other pixels
    assert torch.equal(next(augmented.eval_batches())[0], next(plain.eval_batches())[0])
    assert torch.equal(augmented.calibration().batches[0][0], plain.calibration().batches[0][0])


# --------------------------------------------------------------------------- the check of a task


def _task(**overrides) -> Task:
    x, y = _xy()
    fields = {"model": _mlp, "train_data": (x, y), "eval_data": (x[:10], y[:10])}
    return Task(**{**fields, **overrides})


def _dict_data(n: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 20, (n, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)}


@pytest.mark.parametrize("overrides, message", [
    ({"num_classes": 5}, "Task.model: gives outputs of shape (8, 3); expected (N, 5) for 5 classes"),
    ({"train_data": (_xy()[0], _xy()[1] * 2)}, "train_data: labels must lie in [0, 2] for a model with 3 outputs, but got values from 0 to 4"),
    ({"eval_data": (_xy()[0], _xy()[1].float())}, "eval_data: labels are float32; the default loss (cross-entropy) and evaluation "
                                                   "(accuracy) need integer class ids"),
    ({"eval_data": (_xy()[0][:0], _xy()[1][:0])}, "eval_data: is empty; expected at least one example"),
    ({"train_data": (_xy()[0].index_fill(0, torch.tensor([30]), math.nan), _xy()[1])},
     "train_data: the data has non-finite values (NaN or inf) in its inputs; expected finite numbers"),
    ({"model": lambda: nn.Linear(5, 3)}, "train_data: the model cannot take its batches: it got inputs float32 (8, 6) and raised "
                                         "RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    ({"model": lambda: "a model"}, "Task.model: must return a torch.nn.Module, but returned str"),
    ({"model": lambda: nn.Sequential(nn.Linear(6, 3), nn.Flatten(0))}, "train_data: the model gives outputs of shape (24,) for a batch of 8 examples"),
    ({"train_data": lambda batch_size: [(np.zeros((4, 6), np.float32), np.zeros(4, np.int64))]},
     "train_data: batches must hold torch tensors, but [0] is a numpy array; convert with torch.from_numpy"),
    ({"loss": lambda model, batch: model(batch[0])}, "Task.loss: must return a scalar tensor, but returned float32 (8, 3)"),
    ({"loss": lambda model, batch: torch.tensor(1.0)}, "Task.loss: does not depend on the model's parameters"),
    ({"loss": lambda model, batch: model(batch[0]).pow(2).sum() * math.inf}, "Task.loss: is inf on the first batch of train_data"),
])
def test_a_task_that_cannot_work_is_one_line_before_any_work(overrides, message):
    with pytest.raises(TaskError) as info:
        check_task(_task(**overrides))
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_dict_batches_with_two_inputs_pass_the_check_and_name_what_the_model_got():
    check_task(_task(model=lambda: TokenClassifier(hidden=None), train_data=_dict_data(), eval_data=_dict_data(6), num_classes=2))

    with pytest.raises(TaskError, match=r"^train_data: the model cannot take its batches: it got inputs dict\(input_ids: int64 \(8, 7\), "
                                        r"mask: int64 \(8, 7\)\) and raised TypeError"):
        data = _dict_data()
        data["mask"] = data.pop("attention_mask")
        check_task(_task(model=lambda: TokenClassifier(hidden=None), train_data=data, eval_data=data))


def test_user_loss_and_evaluation_lift_the_classification_checks():
    x = torch.randn(20, 6)
    regression = _task(model=lambda: nn.Linear(6, 1), train_data=(x, x[:, :1] * 2.5), eval_data=(x, x[:, :1] * 2.5),
                       loss=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]),
                       evaluate=lambda m, batches: {"mse": float(sum(nn.functional.mse_loss(m(a), b, reduction="sum") for a, b in batches))},
                       objectives={"mse": "min"})
    check_task(regression)
    assert list(regression.score(regression.build_model())) == ["mse"]


def test_make_task_checks_what_the_factory_returns():
    with pytest.raises(TaskError, match=r"^task.name: 'tests.task_modules:returns_a_dict' returned dict; expected an evaluators.tasks.Task"):
        make_task(TaskConfig(name="tests.task_modules:returns_a_dict"))
    legacy = make_task(TaskConfig(name="tests.task_modules:legacy"))  # the old protocol is adapted
    assert isinstance(legacy, Task) and legacy.num_classes == 3 and legacy.score(legacy.build_model())["accuracy"] >= 0
    wide = make_task(TaskConfig(name="tests.task_modules:choice_of_models", model="wide"))  # task.model is the user's to name
    assert wide.build_model()[0].out_features == 32
    with pytest.raises(ValueError, match="task.model: 'zoo' is not one of this task's models"):
        make_task(TaskConfig(name="tests.task_modules:choice_of_models", model="zoo"))


# --------------------------------------------------------------------------- scores and objectives


@pytest.mark.parametrize("scores, expected, message", [
    ({"map": math.nan}, None, "the task's evaluation returned map = nan; every value must be a finite number"),
    ({"map": "high"}, None, "the task's evaluation returned map = 'high' (str); every value must be a number"),
    ({"map": 0.5}, ["map", "f1"], "the task's evaluation returned no f1 (the dense model's did); it returned map"),
    ({"latency_ms": 3.0}, None, "the task's evaluation returned 'latency_ms', a name secateurs records itself"),
    ([0.5], None, "the task's evaluation must return a non-empty dict of metric names to numbers, but returned list(float)"),
])
def test_scores_must_be_finite_numbers_by_name(scores, expected, message):
    with pytest.raises(EvaluationError) as info:
        check_scores(scores, expected)
    assert str(info.value).startswith(message)


def test_scores_accept_tensors_and_numpy_numbers():
    assert check_scores({"a": torch.tensor(0.25), "b": np.float32(0.5), "c": 3}) == {"a": 0.25, "b": 0.5, "c": 3.0}


def test_objectives_are_checked_against_what_the_dense_evaluation_returned():
    returned = {"rmse": 50.0, "mae": 40.0}
    assert check_objectives({"rmse": "min", "latency_ms": "min", "rmse_change": "min", "macs": "min"}, returned) == {
        "rmse": "min", "latency_ms": "min", "rmse_change": "min", "macs": "min"}
    with pytest.raises(TaskError, match=r"^objectives.accuracy: the task's evaluation does not return 'accuracy'; it returns rmse, mae; "
                                        r"also valid: latency_ms, .*, rmse_change, mae_change, macs_change, params_change$"):
        check_objectives({"accuracy": "max"}, returned)
    with pytest.raises(TaskError, match=r"^search.objectives.rmse: direction must be min or max, but got 'minimize'$"):
        check_objectives({"rmse": "minimize"}, returned, field="search.objectives")
    with pytest.raises(TaskError, match="Task.objectives.rmse: direction must be min or max, but got 'down'"):
        _task(objectives={"rmse": "down"})


# --------------------------------------------------------------------------- trials on user tasks


def _regression_task(train_data, eval_data) -> Task:
    def loss(model, batch):
        return nn.functional.mse_loss(model(batch[0]).squeeze(1), batch[1].float())

    def metrics(model, batches):
        errors = torch.cat([model(x).squeeze(1) - y.float() for x, y in batches])
        return {"rmse": errors.pow(2).mean().sqrt().item(), "mae": errors.abs().mean().item()}

    return Task(model=lambda: MLP(in_features=6, hidden=(16,), num_classes=1), train_data=train_data, eval_data=eval_data,
                loss=loss, evaluate=metrics, objectives={"rmse": "min"}, name="regression")


def test_a_trial_on_a_lazily_read_regression_task_records_every_score_and_its_change(files, tmp_path):
    lazy = _regression_task(Rows(files, "train"), Rows(files, "test"))
    in_memory = _regression_task(tuple(map(torch.as_tensor, _xy(40, seed=0))), tuple(map(torch.as_tensor, _xy(40, seed=1))))
    check_task(lazy)
    checkpoint = tmp_path / "dense.pt"
    torch.manual_seed(0)
    torch.save(lazy.build_model().state_dict(), checkpoint)
    dense = evaluate(Policy("l1", {}), lazy, checkpoint, FinetuneConfig(epochs=0), FAST_MEASURE)
    assert set(dense.scores) == {"rmse", "mae"} and dense.changes["rmse_change"] == 0.0
    assert dense.scores == pytest.approx(evaluate(Policy("l1", {}), in_memory, checkpoint, FinetuneConfig(epochs=0), FAST_MEASURE).scores)
    reference = Reference.from_record(dense.to_dict())
    assert reference == Reference(dense.scores, macs=dense.macs, params=dense.params)
    pruned = evaluate(Policy("l2", {"net.1": 0.5}), lazy, checkpoint, FinetuneConfig(epochs=1, batch_size=8), FAST_MEASURE, dense=reference)
    record = pruned.to_dict()
    assert record["rmse_change"] == pytest.approx(record["rmse"] - dense.scores["rmse"])
    assert record["params_change"] == record["params"] - dense.params < 0 and "accuracy_drop" not in record
    assert pruned.finetune_steps == 5  # ceil(40 / 8) batches, one epoch


def test_a_trial_whose_evaluation_returns_nan_or_misses_a_score_fails_with_the_reason(tmp_path):
    task = _task(evaluate=lambda model, batches: {"accuracy": math.nan})
    checkpoint = tmp_path / "dense.pt"
    torch.save(task.build_model().state_dict(), checkpoint)
    with pytest.raises(EvaluationError, match="returned accuracy = nan"):
        evaluate(Policy("l1", {}), task, checkpoint, FinetuneConfig(epochs=0), FAST_MEASURE)
    plain = _task()
    with pytest.raises(EvaluationError, match=r"returned no f1 \(the dense model's did\); it returned accuracy"):
        evaluate(Policy("l1", {}), plain, checkpoint, FinetuneConfig(epochs=0), FAST_MEASURE,
                 dense=Reference({"accuracy": 0.5, "f1": 0.5}, macs=1, params=1))


def test_the_fine_tune_hook_gets_the_pruned_model_and_the_budget(tmp_path):
    calls: list[FinetuneRun] = []

    def own_loop(run: FinetuneRun) -> int:
        calls.append(run)
        optimizer = torch.optim.Adam(run.model.parameters(), lr=run.lr)
        for _, batch in zip(range(run.steps - 1), run.batches()):
            optimizer.zero_grad()
            run.loss(run.model, batch).backward()
            optimizer.step()
        return run.steps - 1

    task = _task(finetune=own_loop)
    dense = task.build_model()
    checkpoint = tmp_path / "dense.pt"
    torch.save(dense.state_dict(), checkpoint)
    policy = Policy("l1", {"0": 0.5}, finetune={"lr": 0.003})
    model = task.build_model()
    model.load_state_dict(dense.state_dict())
    from evaluators.trial import prune_with_task

    prune_with_task(policy, model, task)
    before = model[0].weight.detach().clone()
    timings = finetune_model(model, policy, task, checkpoint, FinetuneConfig(epochs=2.5, batch_size=16, distill_alpha=0.5), "cpu")
    (run,) = calls
    assert run.model is model and model[0].out_features == 8  # the pruned model itself
    assert run.steps == round(2.5 * 3) == 8 and run.lr == 0.003 and run.batch_size == 16 and run.epochs == 2.5
    assert run.teacher is not None and run.teacher[0].out_features == 16 and not run.teacher.training
    assert run.settings["distill_alpha"] == 0.5 and run.loss is cross_entropy_loss
    assert timings["finetune_steps"] == 7 and not torch.equal(before, model[0].weight) and not model.training
    capped = finetune_model(model, policy, task, checkpoint, FinetuneConfig(epochs=10, max_steps=4), "cpu")
    assert calls[-1].steps == 4 and calls[-1].teacher is None and capped["finetune_steps"] == 3
    assert finetune_model(model, policy, task, checkpoint, FinetuneConfig(epochs=0), "cpu")["finetune_steps"] == 0 and len(calls) == 2

    task = _task(finetune=lambda run: "done")
    with pytest.raises(TypeError, match="Task.finetune: must return the number of steps it took"):
        finetune_model(model, policy, task, checkpoint, FinetuneConfig(epochs=1), "cpu")


def test_calibration_is_a_fixed_draw_with_the_tasks_loss(files):
    def loss(model, batch):
        return cross_entropy_loss(model, batch) * 2

    task = _task(train_data=Rows(files, "train"), calibration_data=Rows(files, "test"), loss=loss)
    calibration = task.calibration(samples=30, batch_size=16)
    assert isinstance(calibration, Calibration) and calibration.loss is loss
    assert [len(b[1]) for b in calibration.batches] == [16, 14]
    drawn = torch.cat([b[0] for b in calibration.batches])
    rows = torch.from_numpy(np.load(files / "test_x.npy"))
    index = [int(torch.nonzero((rows == row).all(dim=1))[0]) for row in drawn]  # rows of the calibration data, each once
    assert len(set(index)) == 30 and index != list(range(30))  # a draw, not the first 30
    again = _task(train_data=Rows(files, "train"), calibration_data=Rows(files, "test"), loss=loss).calibration(samples=30, batch_size=16)
    assert torch.equal(torch.cat([b[0] for b in again.batches]), drawn)  # the same draw in another process
    assert task.calibration(samples=30, batch_size=16) is calibration  # read once
    assert [len(b[1]) for b in task.calibration(samples=50, batch_size=16).batches] == [16, 16, 8]  # 40 examples: fewer than asked


def test_inputs_for_timing_repeat_the_evaluation_examples():
    task = _task(model=lambda: TokenClassifier(hidden=None), train_data=_dict_data(), eval_data=_dict_data(3))
    inputs = task.inputs(8)
    assert sorted(inputs) == ["attention_mask", "input_ids"] and inputs["input_ids"].shape == (8, 7)
    assert torch.equal(inputs["input_ids"][3:6], _dict_data(3)["input_ids"])
    assert task.example()["input_ids"].shape == (1, 7)
    assert _task(example_input=torch.ones(1, 6)).example().sum() == 6


@pytest.mark.parametrize("overrides, message", [
    ({"eval_batch_size": 0}, "Task.eval_batch_size: must be an integer >= 1, but got 0"),
    ({"num_workers": -1}, "Task.num_workers: must be an integer >= 0, but got -1"),
    ({"loss": "mse"}, "Task.loss: must be callable, but got str"),
    ({"finetune": 3}, "Task.finetune: must be callable or None, but got int"),
    ({"objectives": {}}, "Task.objectives: must map metric names to 'min' or 'max', but got {}"),
    ({"num_classes": 0}, "Task.num_classes: must be an integer >= 1 or None, but got 0"),
])
def test_task_fields_are_checked_when_it_is_made(overrides, message):
    with pytest.raises(TaskError) as info:
        _task(**overrides)
    assert str(info.value) == message
