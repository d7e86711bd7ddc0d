"""Built-in tasks (fashion_mnist, cifar10, sst2), their data checks and the model zoo."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluators import datasets, pruning, zoo
from evaluators.datasets import DataError, resolve_data_root
from evaluators.models import MODELS
from evaluators.builtin_tasks import make_cifar10_task, make_fashion_mnist_task, make_sst2_task
from evaluators.tasks import TaskConfig, make_task
from spaces import Policy
from tests.data import DATA_DIRS, data_root

FASHION_DIR = datasets.FASHION_MNIST_SYSTEM_DIR


def _needs(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not available on this machine")


def _shared(name: str) -> Path:
    """The directory holding the real data file ``name``: $SECATEURS_DATA, else ../shared/data (tests/data.py)."""
    root = data_root(name)
    if root is None:
        pytest.skip(f"{name} is not in any of {', '.join(map(str, DATA_DIRS))}")
    return root


@pytest.fixture
def no_data_env(monkeypatch, tmp_path):
    """No $SECATEURS_DATA and a HOME without data: only what a test sets is found."""
    monkeypatch.delenv(datasets.DATA_ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _write_cifar_npz(path: Path, n_train: int = 20, n_test: int = 10, **overrides) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.uint8) % 10,
        "x_test": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        "y_test": np.arange(n_test, dtype=np.uint8) % 10,
    }
    arrays.update(overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def _write_sst2_csv(path: Path, text: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text or (
        "text,label,split\n"
        '"a good , good film",1,train\n'
        "a bad film,0,train\n"
        "good fun,1,dev\n"
        "a zebra film,0,test\n"
    ))
    return path


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def _write_fashion_dir(directory: Path, gz: bool, labels: np.ndarray | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, n in (("train", 20), ("t10k", 10)):
        _write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)))
        y = labels if labels is not None and split == "train" else np.arange(n) % 10
        _write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", y)
    return directory


# ---------------------------------------------------------------- real data


def test_cifar10_loads_shared_subset_balanced_and_normalised():
    shared = _shared("cifar10_10k.npz")
    task = make_cifar10_task(TaskConfig(name="cifar10", data_root=str(shared), options={"train_size": 200, "test_size": 100}))
    (x, y), (xt, yt) = task.train_data, task.eval_data
    assert x.shape == (200, 3, 32, 32) and xt.shape == (100, 3, 32, 32)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [20] * 10
    assert 0 <= int(yt.min()) and int(yt.max()) <= 9
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2
    assert task.num_classes == 10 and type(task.build_model()).__name__ == "CifarResNet"


def test_sst2_loads_shared_csv_with_train_vocabulary(monkeypatch):
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(_shared("sst2.csv")))
    task = make_sst2_task(TaskConfig(name="sst2", options={"max_len": 24}))
    (x, y), (xt, yt) = task.train_data, task.eval_data
    assert x.shape == (6920, 24) and xt.shape == (1821, 24)
    assert x.dtype == torch.int64 and set(y.unique().tolist()) == {0, 1} and set(yt.unique().tolist()) == {0, 1}
    assert int(x.max()) < task.build_model().embedding.num_embeddings
    assert task.build_model()(xt[:3]).shape == (3, 2)


def test_fashion_mnist_loads_debian_files_when_no_root_is_configured(no_data_env):
    _needs(FASHION_DIR / "train-images-idx3-ubyte.gz")
    task = make_fashion_mnist_task(TaskConfig(name="fashion_mnist", options={"train_size": 100, "test_size": 50}))
    (x, y), (xt, yt) = task.train_data, task.eval_data
    assert x.shape == (100, 1, 28, 28) and xt.shape == (50, 1, 28, 28) and x.dtype == torch.float32
    assert torch.bincount(y, minlength=10).tolist() == [10] * 10 and int(yt.max()) <= 9
    assert task.build_model()(xt[:2]).shape == (2, 10)


# ---------------------------------------------------------------- data root


def test_data_root_order_is_config_then_env_then_default(monkeypatch, tmp_path, no_data_env):
    assert resolve_data_root(None).path == tmp_path / "home" / ".cache" / "secateurs" / "data"
    assert resolve_data_root(None).source == "default"
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(tmp_path / "env"))
    assert resolve_data_root(None).path == tmp_path / "env"
    assert resolve_data_root(str(tmp_path / "cfg")).path == tmp_path / "cfg"


def test_tasks_find_files_by_name_under_config_env_and_default_roots(monkeypatch, tmp_path, no_data_env):
    _write_cifar_npz(tmp_path / "home" / ".cache" / "secateurs" / "data" / "cifar10_small.npz", n_train=10)
    assert len(make_cifar10_task(TaskConfig(name="cifar10")).train_data[1]) == 10
    _write_cifar_npz(tmp_path / "env" / "cifar10.npz", n_train=20)
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(tmp_path / "env"))
    assert len(make_cifar10_task(TaskConfig(name="cifar10")).train_data[1]) == 20
    _write_cifar_npz(tmp_path / "cfg" / "cifar10_30.npz", n_train=30)
    assert len(make_cifar10_task(TaskConfig(name="cifar10", data_root=str(tmp_path / "cfg"))).train_data[1]) == 30
    # a root that is the file itself
    file = _write_cifar_npz(tmp_path / "elsewhere" / "any_name.npz", n_train=40)
    assert len(make_cifar10_task(TaskConfig(name="cifar10", data_root=str(file))).train_data[1]) == 40
    csv = _write_sst2_csv(tmp_path / "text" / "reviews.csv")
    assert make_sst2_task(TaskConfig(name="sst2", data_root=str(csv))).eval_data[0].shape == (1, 50)


def test_cifar10_reads_official_pickled_batches(tmp_path, no_data_env):
    directory = tmp_path / "root" / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}
        (directory / name).write_bytes(pickle.dumps(batch))
    task = make_cifar10_task(TaskConfig(name="cifar10", data_root=str(tmp_path / "root")))
    assert task.train_data[0].shape == (20, 3, 32, 32) and task.eval_data[1].tolist() == [0, 1, 2, 9]


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files_gz_or_not(tmp_path, gz, no_data_env):
    _write_fashion_dir(tmp_path / "data" / "fashion-mnist", gz)
    task = make_fashion_mnist_task(TaskConfig(name="fashion_mnist", data_root=str(tmp_path / "data")))
    assert task.train_data[0].shape == (20, 1, 28, 28) and task.eval_data[1].tolist() == list(range(10))


def test_sst2_vocabulary_comes_from_the_train_split_only(tmp_path, no_data_env):
    task = make_sst2_task(TaskConfig(name="sst2", data_root=str(_write_sst2_csv(tmp_path / "sst2.csv")), options={"max_len": 4}))
    vocab = datasets.build_vocab(["a good , good film", "a bad film"])
    assert "zebra" not in vocab and "fun" not in vocab
    assert task.eval_data[0].tolist() == [[vocab["a"], vocab[datasets.UNK], vocab["film"], 0]]
    assert task.train_data[0][0].tolist() == [vocab[t] for t in ["a", "good", ",", "good"]]  # truncated


# ---------------------------------------------------------------- bad input


def _raises(match_parts: list[str], factory, config: TaskConfig) -> str:
    with pytest.raises(DataError) as info:
        factory(config)
    message = str(info.value)
    for part in match_parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def test_missing_data_path_names_task_path_and_expectation(tmp_path, no_data_env):
    missing = str(tmp_path / "nope")
    _raises(["task cifar10", missing, "does not exist", "cifar10*.npz"], make_cifar10_task, TaskConfig(name="cifar10", data_root=missing))
    _raises(["task sst2", missing, "sst2.csv"], make_sst2_task, TaskConfig(name="sst2", data_root=missing))
    _raises(["task fashion_mnist", missing, "train-images-idx3-ubyte"], make_fashion_mnist_task,
            TaskConfig(name="fashion_mnist", data_root=missing))
    (tmp_path / "empty").mkdir()
    _raises(["no data found", str(tmp_path / "empty")], make_cifar10_task, TaskConfig(name="cifar10", data_root=str(tmp_path / "empty")))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"x_train": np.zeros((4, 28, 28, 3), np.uint8)}, "(N, 32, 32, 3)"),
        ({"x_test": np.zeros((10, 3, 32, 32), np.uint8)}, "(N, 32, 32, 3)"),
        ({"x_train": np.zeros((20, 32, 32, 3), np.float32)}, "uint8"),
        ({"y_train": np.full(20, 10, np.uint8)}, "[0, 9]"),
        ({"y_test": np.arange(11, dtype=np.int64) % 10}, "one label per image"),
        ({"y_test": None}, "lacks array(s) y_test"),
    ],
)
def test_bad_cifar10_npz_is_refused_when_the_task_is_built(tmp_path, overrides, expected):
    path = _write_cifar_npz(tmp_path / "cifar10.npz", **overrides)
    _raises(["task cifar10", str(path), expected], make_cifar10_task, TaskConfig(name="cifar10", data_root=str(tmp_path)))


def test_not_an_npz_is_refused(tmp_path):
    path = tmp_path / "cifar10.npz"
    path.write_text("hello")
    _raises(["task cifar10", str(path), "cannot read"], make_cifar10_task, TaskConfig(name="cifar10", data_root=str(path)))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("text,label\nfine,1\n", "lacks column(s) split"),
        ("sentence,label,split\nfine,1,train\n", "lacks column(s) text"),
        ("text,label,split\nfine,2,train\nok,1,test\n", "label must be 0 or 1"),
        ("text,label,split\nfine,1,validation\n", "split must be one of train, dev, test"),
        ("text,label,split\nfine,1,train\n", "no rows with split 'test'"),
    ],
)
def test_bad_sst2_csv_is_refused(tmp_path, text, expected):
    path = _write_sst2_csv(tmp_path / "sst2.csv", text)
    _raises(["task sst2", str(path), expected], make_sst2_task, TaskConfig(name="sst2", data_root=str(tmp_path)))


def test_bad_fashion_mnist_files_are_refused(tmp_path, no_data_env):
    directory = _write_fashion_dir(tmp_path / "labels", gz=True, labels=np.full(20, 12))
    _raises(["task fashion_mnist", "train-labels-idx1-ubyte.gz", "[0, 9]"], make_fashion_mnist_task,
            TaskConfig(name="fashion_mnist", data_root=str(directory)))
    directory = _write_fashion_dir(tmp_path / "partial", gz=False)
    (directory / "t10k-labels-idx1-ubyte").unlink()
    _raises(["lacks t10k-labels-idx1-ubyte", str(directory)], make_fashion_mnist_task,
            TaskConfig(name="fashion_mnist", data_root=str(directory)))
    directory = _write_fashion_dir(tmp_path / "truncated", gz=False)
    path = directory / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    _raises(["truncated", str(path)], make_fashion_mnist_task, TaskConfig(name="fashion_mnist", data_root=str(directory)))


def test_task_options_and_models_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"^options: unknown option 'max_len' for task cifar10; valid: augment, test_size, train_size"):
        TaskConfig(name="cifar10", options={"max_len": 3})
    with pytest.raises(ValueError, match=r"^options: train_size for task cifar10 must be an integer >= 1"):
        TaskConfig(name="cifar10", options={"train_size": 0})
    _write_cifar_npz(tmp_path / "cifar10.npz")
    _raises(["options.train_size is 500", "only 20 train samples"], make_cifar10_task,
            TaskConfig(name="cifar10", data_root=str(tmp_path), options={"train_size": 500}))
    with pytest.raises(ValueError, match=r"^options: augment for task cifar10 must be true or false, but got 1"):
        TaskConfig(name="cifar10", options={"augment": 1})
    with pytest.raises(ValueError, match=r"^train_data: the model cannot take its batches: it got inputs float32 \(8, 3, 32, 32\) and raised RuntimeError"):
        make_task(TaskConfig(name="cifar10", data_root=str(tmp_path), model="digits_cnn"))
    with pytest.raises(ValueError, match=r"^Task.model: building the model failed: TypeError: .*'vocab_size'"):
        make_task(TaskConfig(name="cifar10", data_root=str(tmp_path), model="text_lstm"))
    with pytest.raises(ValueError, match="model_options 'depth' not taken by model 'resnet20'"):
        make_cifar10_task(TaskConfig(name="cifar10", data_root=str(tmp_path), model_options={"depth": 3}))
    task = make_cifar10_task(TaskConfig(name="cifar10", data_root=str(tmp_path), model="vgg_cifar", model_options={"hidden": 16}))
    assert task.build_model().classifier[1].out_features == 16


def test_options_enter_the_cache_key_but_empty_ones_leave_old_keys_alone():
    plain = TaskConfig(name="sst2")
    assert "options" not in plain.cache_key()
    assert plain.cache_key() != TaskConfig(name="sst2", options={"max_len": 20}).cache_key()
    assert plain.cache_key() != TaskConfig(name="sst2", model_options={"bidirectional": True}).cache_key()
    assert hash(TaskConfig(name="sst2", options={"max_len": 20})) == hash(TaskConfig(name="sst2", options={"max_len": 20}))


# ---------------------------------------------------------------- models


CNNS = {
    "fashion_cnn": (lambda: zoo.FashionCNN(width=8), (1, 28, 28)),
    "resnet20": (lambda: zoo.resnet20(width=8), (3, 16, 16)),
    "resnet56": (lambda: zoo.resnet56(width=8), (3, 16, 16)),
    "mobilenetv2_cifar": (lambda: zoo.mobilenetv2_cifar(width_mult=0.25), (3, 16, 16)),
    "vgg_cifar": (lambda: zoo.VGGCifar(layers=(8, "M", 16, 16, "M"), hidden=16), (3, 16, 16)),
    "vit_tiny": (lambda: zoo.VisionTransformer(image_size=16, patch=4, embed_dim=16, num_heads=4, ff_dim=32), (3, 16, 16)),
}


def test_every_zoo_model_is_registered():
    assert set(zoo.ZOO_MODELS) <= set(MODELS)
    assert set(CNNS) | {"text_lstm", "text_transformer"} == set(zoo.ZOO_MODELS)


@pytest.mark.parametrize("name", sorted(CNNS))
def test_cnn_prunes_at_half_and_still_trains(name):
    build, shape = CNNS[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(4, *shape)
    assert model(x).shape == (4, 10)
    params = sum(p.numel() for p in model.parameters())
    groups = pruning.discover_groups(model, x[:1])
    assert groups
    pruning.apply(Policy(criterion="l1", ratios={g.name: 0.5 for g in groups}), model, x[:1])
    model.train()
    out = model(x)
    out.sum().backward()
    assert out.shape == (4, 10)
    assert sum(p.numel() for p in model.parameters()) < 0.6 * params


def test_resnet_residual_streams_are_coupled_groups():
    names = [g.name for g in pruning.discover_groups(zoo.resnet20(width=4), torch.zeros(1, 3, 8, 8))]
    # 9 inner convs + one group per residual stream (stem for stage 1, a 1x1 shortcut for stages 2 and 3)
    assert len(names) == 12 and "stem.0" in names and "layer3.0.shortcut.0" in names
    assert not any(n.endswith("conv2") for n in names)


TEXT_MODELS = {
    "text_lstm": lambda: zoo.TextLSTM(50, embed_dim=16, hidden_size=16, head_size=16),
    "text_lstm_bidirectional": lambda: zoo.TextLSTM(50, embed_dim=16, hidden_size=16, head_size=16, bidirectional=True),
    "text_transformer": lambda: zoo.TextTransformer(50, max_len=12, embed_dim=16, ff_dim=32),
}


@pytest.mark.parametrize("name", sorted(TEXT_MODELS))
def test_text_models_prune_the_linear_groups_they_have(name):
    torch.manual_seed(0)
    model = TEXT_MODELS[name]()
    tokens = torch.randint(1, 50, (3, 12))
    tokens[0, 6:] = 0  # padding
    assert model(tokens).shape == (3, 2)
    groups = pruning.discover_groups(model, tokens[:1])
    assert groups and all(g.kind == "linear" for g in groups)
    # round to the 4 heads: a residual width not divisible by them breaks nn.MultiheadAttention
    pruning.apply(Policy(criterion="l2", ratios={g.name: 0.5 for g in groups}, round_to=4), model, tokens[:1])
    model.train()
    out = model(tokens)
    out.sum().backward()
    assert out.shape == (3, 2) and torch.isfinite(out).all()
