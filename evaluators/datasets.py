"""Data files for the built-in tasks: where they are found, how they are read, and their checks.

Files are looked up under a *data root*: the task config's ``data_root``, else ``$SECATEURS_DATA``,
else ``~/.cache/secateurs/data`` (see :func:`resolve_data_root`). A root may also be the data file
itself. Every loader checks what it reads (shapes, dtypes, label ranges, columns) and raises one
:class:`DataError` naming the task, the path and what was expected, so that bad data stops a search
when its task is built, before any trial runs.

Loaders return numpy arrays; images come back normalised, float32, NCHW.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import os
import pickle
import re
from pathlib import Path
from typing import Iterable

import numpy as np

DATA_ENV_VAR = "SECATEURS_DATA"
DEFAULT_DATA_ROOT = Path("~/.cache/secateurs/data")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist

# Channel statistics of the full training sets (0-1 scale), used whatever subset is loaded.
CIFAR10_MEAN = (125.3 / 255, 122.9 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


class DataError(ValueError):
    """Data that is missing or not what a task expects; the message names the task, the path and
    what was expected.

    >>> str(DataError("task cifar10: '/x' does not exist"))
    "task cifar10: '/x' does not exist"
    """


@dataclasses.dataclass(frozen=True)
class DataRoot:
    """Where a task looks for its files, and which setting chose that place.

    >>> DataRoot(Path("/data"), "task.data_root").describe()
    "'/data' (from task.data_root)"
    """

    path: Path
    source: str  # "task.data_root", "$SECATEURS_DATA" or "default"

    @property
    def explicit(self) -> bool:
        """True when a user named this root (config or environment), not the default."""
        return self.source != "default"

    def describe(self) -> str:
        return f"{str(self.path)!r} (from {self.source})"


def resolve_data_root(configured: str | os.PathLike | None) -> DataRoot:
    """The data root: ``configured`` (``task.data_root``), else ``$SECATEURS_DATA``, else
    ``~/.cache/secateurs/data``. The path is not checked here; the loaders check it.

    >>> resolve_data_root("/data").path
    PosixPath('/data')
    """
    if configured:
        return DataRoot(Path(configured).expanduser(), "task.data_root")
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return DataRoot(Path(env).expanduser(), f"${DATA_ENV_VAR}")
    return DataRoot(DEFAULT_DATA_ROOT.expanduser(), "default")


def _missing(task: str, root: DataRoot, expected: str) -> DataError:
    hint = f"put the data there or set task.data_root / ${DATA_ENV_VAR} to a directory or file that holds it"
    if not root.path.exists():
        return DataError(f"task {task}: data root {root.describe()} does not exist; expected {expected}; {hint}")
    return DataError(f"task {task}: no data found at {root.describe()}; expected {expected}; {hint}")


def balanced_subset(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Indices of ``size`` samples spread evenly over the classes (seeded), in their original order.

    >>> balanced_subset(np.array([0, 0, 0, 1, 1, 1]), 4, seed=0).tolist().count(3) <= 1
    True
    """
    if size is None or size >= len(labels):
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)  # position of each sample within its class, in `order`
    shuffled = labels[order]
    for value in np.unique(labels):
        members = order[shuffled == value]
        rank[members] = np.arange(len(members))
    position = np.empty(len(labels), dtype=np.int64)
    position[order] = np.arange(len(labels))
    chosen = np.lexsort((position, rank))[:size]
    return np.sort(chosen)


def _check_labels(task: str, path: Path, name: str, labels: np.ndarray, num_classes: int) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:  # Keras-style (N, 1)
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"task {task}: {name} in {str(path)!r} must be a 1-D integer array of class ids, "
            f"but got shape {labels.shape} and dtype {labels.dtype}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"task {task}: {name} in {str(path)!r} must lie in [0, {num_classes - 1}], "
            f"but got values from {labels.min()} to {labels.max()}"
        )
    return labels.astype(np.int64)


def _normalise_images(images_nhwc: np.ndarray, mean: Iterable[float], std: Iterable[float]) -> np.ndarray:
    x = images_nhwc.astype(np.float32) / 255.0
    x -= np.asarray(mean, dtype=np.float32)
    x /= np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a classification dataset: inputs and int64 labels."""

    x: np.ndarray
    y: np.ndarray


# ---------------------------------------------------------------- CIFAR-10

CIFAR10_EXPECTED = (
    "a cifar10*.npz with x_train/y_train/x_test/y_test (uint8 images NHWC (N, 32, 32, 3), labels 0-9), "
    "or the official cifar-10-batches-py/ directory"
)


def find_cifar10(root: DataRoot, task: str = "cifar10") -> Path:
    """The CIFAR-10 source under ``root``: the root itself if it is a file or a batches directory,
    else ``cifar-10-batches-py/``, else ``cifar10.npz``, else the first ``cifar10*.npz`` by name."""
    path = root.path
    if path.is_file() or (path / "data_batch_1").is_file():
        return path
    if path.is_dir():
        if (path / "cifar-10-batches-py").is_dir():
            return path / "cifar-10-batches-py"
        if (path / "cifar10.npz").is_file():
            return path / "cifar10.npz"
        found = sorted(path.glob("cifar10*.npz"))
        if found:
            return found[0]
    raise _missing(task, root, CIFAR10_EXPECTED)


def _check_images(task: str, path: Path, name: str, images: np.ndarray, shape: tuple[int, ...]) -> None:
    if images.dtype != np.uint8 or images.ndim != len(shape) + 1 or images.shape[1:] != shape:
        raise DataError(
            f"task {task}: {name} in {str(path)!r} must be uint8 images of shape (N, {', '.join(map(str, shape))}), "
            f"but got shape {images.shape} and dtype {images.dtype}"
        )


def _read_cifar10_npz(path: Path, task: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in archive.files]
            if missing:
                raise DataError(
                    f"task {task}: {str(path)!r} lacks array(s) {', '.join(missing)}; "
                    f"expected {CIFAR10_EXPECTED}; it holds: {', '.join(archive.files) or 'nothing'}"
                )
            return {k: archive[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except DataError:
        raise
    except Exception as exc:  # zipfile/pickle/IO errors all mean: not a readable npz
        raise DataError(f"task {task}: cannot read {str(path)!r} as an .npz archive ({exc}); expected {CIFAR10_EXPECTED}") from None


def _read_cifar10_batches(directory: Path, task: str) -> dict[str, np.ndarray]:
    """The official python-pickled batches. pickle is used for these data files only (it is the
    dataset's own distribution format); weights are never loaded with pickle."""
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    arrays: dict[str, np.ndarray] = {}
    for split, files in names.items():
        xs, ys = [], []
        for name in files:
            path = directory / name
            if not path.is_file():
                raise DataError(f"task {task}: {str(directory)!r} lacks {name}; expected the official cifar-10-batches-py files "
                                f"{', '.join(names['train'] + names['test'])}")
            try:
                with open(path, "rb") as handle:
                    batch = pickle.load(handle, encoding="bytes")
                data = np.asarray(batch[b"data"], dtype=np.uint8)
                labels = np.asarray(batch[b"labels"])
            except Exception as exc:
                raise DataError(f"task {task}: cannot read CIFAR-10 batch {str(path)!r} ({exc}); "
                                "expected a pickled dict with b'data' (N, 3072) uint8 and b'labels'") from None
            if data.ndim != 2 or data.shape[1] != 3072:
                raise DataError(f"task {task}: b'data' in {str(path)!r} must have shape (N, 3072), but got {data.shape}")
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(labels)
        arrays[f"x_{split}"] = np.concatenate(xs)
        arrays[f"y_{split}"] = np.concatenate(ys)
    return arrays


def load_cifar10(
    root: DataRoot, *, train_size: int | None = None, test_size: int | None = None, seed: int = 0, task: str = "cifar10"
) -> tuple[Split, Split, Path]:
    """CIFAR-10 normalised by channel (NCHW float32) with int64 labels, and the path it came from.

    ``train_size`` / ``test_size`` take a class-balanced seeded subset (None = all).
    """
    path = find_cifar10(root, task)
    arrays = _read_cifar10_batches(path, task) if path.is_dir() else _read_cifar10_npz(path, task)
    splits = []
    for split, size in (("train", train_size), ("test", test_size)):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        _check_images(task, path, f"x_{split}", images, (32, 32, 3))
        labels = _check_labels(task, path, f"y_{split}", labels, 10)
        if len(labels) != len(images):
            raise DataError(f"task {task}: {str(path)!r} has {len(images)} x_{split} images but {len(labels)} y_{split} labels; "
                            "expected one label per image")
        _check_size(task, path, split, size, len(labels))
        keep = balanced_subset(labels, size, seed)
        splits.append(Split(_normalise_images(images[keep], CIFAR10_MEAN, CIFAR10_STD), labels[keep]))
    return splits[0], splits[1], path


def _check_size(task: str, path: Path, split: str, size: int | None, available: int) -> None:
    if available == 0:
        raise DataError(f"task {task}: the {split} split in {str(path)!r} is empty; expected at least one sample")
    if size is not None and size > available:
        raise DataError(f"task {task}: options.{split}_size is {size}, but {str(path)!r} has only {available} {split} samples")


# ---------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_EXPECTED = (
    "a directory holding the Fashion-MNIST IDX files "
    f"{', '.join(FASHION_MNIST_FILES.values())} (each optionally .gz), as Debian's dataset-fashion-mnist "
    f"installs them under {FASHION_MNIST_SYSTEM_DIR}"
)


def _idx_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_fashion_mnist(root: DataRoot, task: str = "fashion_mnist") -> Path:
    """The directory holding the four IDX files: the root itself, ``fashion-mnist/`` or
    ``fashion_mnist/`` under it, or (when the root is not ``task.data_root``) Debian's
    ``/usr/share/datasets/fashion-mnist``."""
    path = root.path
    if path.is_file():
        raise DataError(f"task {task}: {root.describe()} is a file; expected {FASHION_MNIST_EXPECTED}")
    candidates = [path, path / "fashion-mnist", path / "fashion_mnist"]
    if root.source != "task.data_root":
        candidates.append(FASHION_MNIST_SYSTEM_DIR)
    for directory in candidates:
        if all(_idx_file(directory, name) for name in FASHION_MNIST_FILES.values()):
            return directory
    for directory in candidates[:3]:
        present = [n for n in FASHION_MNIST_FILES.values() if _idx_file(directory, n)]
        if present:
            absent = [n for n in FASHION_MNIST_FILES.values() if n not in present]
            raise DataError(f"task {task}: {str(directory)!r} lacks {', '.join(absent)}; expected {FASHION_MNIST_EXPECTED}")
    raise _missing(task, root, FASHION_MNIST_EXPECTED)


def read_idx(path: Path, task: str = "fashion_mnist") -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed if its name ends in .gz) as a uint8 array.

    Format: two zero bytes, type code 0x08 (ubyte), the number of dimensions, then each dimension
    as a big-endian uint32, then the data.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"task {task}: cannot read {str(path)!r} ({exc}); expected an IDX file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise DataError(f"task {task}: {str(path)!r} is not an unsigned-byte IDX file "
                        f"(expected a header 00 00 08 <ndim>, got {raw[:4].hex(' ') or 'nothing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4")) if len(raw) >= header else ()
    if len(shape) != ndim or len(raw) - header != int(np.prod(shape)):
        raise DataError(f"task {task}: {str(path)!r} is truncated or malformed: its header says shape {shape}, "
                        f"so {int(np.prod(shape)) if shape else '?'} data bytes, but it has {max(len(raw) - header, 0)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(
    root: DataRoot, *, train_size: int | None = None, test_size: int | None = None, seed: int = 0, task: str = "fashion_mnist"
) -> tuple[Split, Split, Path]:
    """Fashion-MNIST normalised (N, 1, 28, 28) float32 with int64 labels, and the directory read."""
    directory = find_fashion_mnist(root, task)
    splits = []
    for split, size in (("train", train_size), ("test", test_size)):
        images_path = _idx_file(directory, FASHION_MNIST_FILES[f"x_{split}"])
        labels_path = _idx_file(directory, FASHION_MNIST_FILES[f"y_{split}"])
        images, labels = read_idx(images_path, task), read_idx(labels_path, task)
        _check_images(task, images_path, "images", images, (28, 28))
        labels = _check_labels(task, labels_path, "labels", labels, 10)
        if len(labels) != len(images):
            raise DataError(f"task {task}: {str(images_path)!r} has {len(images)} images but {str(labels_path)!r} "
                            f"has {len(labels)} labels; expected one label per image")
        _check_size(task, directory, split, size, len(labels))
        keep = balanced_subset(labels, size, seed)
        x = _normalise_images(images[keep][..., None], (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,))
        splits.append(Split(x, labels[keep]))
    return splits[0], splits[1], directory


# ---------------------------------------------------------------- SST-2

SST2_COLUMNS = ("text", "label", "split")
SST2_SPLITS = ("train", "dev", "test")
PAD, UNK = "<pad>", "<unk>"
_TOKEN = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|'[a-z]+|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lowercase words, contractions kept together, punctuation marks as tokens.

    >>> tokenize("It 's a well-made, charming film!")
    ['it', "'s", 'a', 'well-made', ',', 'charming', 'film', '!']
    """
    return _TOKEN.findall(text.lower())


def build_vocab(texts: Iterable[str], *, min_count: int = 1, max_size: int = 20000) -> dict[str, int]:
    """Token -> id, with ``<pad>`` = 0 and ``<unk>`` = 1, then the tokens seen at least ``min_count``
    times, most frequent first (ties by token), ``max_size`` entries in all.

    >>> build_vocab(["a b b", "b c"], min_count=2)
    {'<pad>': 0, '<unk>': 1, 'b': 2}
    """
    counts = collections.Counter(token for text in texts for token in tokenize(text))
    ranked = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    vocab = {PAD: 0, UNK: 1}
    for token in ranked[: max(max_size - len(vocab), 0)]:
        vocab[token] = len(vocab)
    return vocab


def encode(texts: Iterable[str], vocab: dict[str, int], max_len: int) -> np.ndarray:
    """Token ids, truncated to ``max_len`` and padded at the end with ``<pad>`` (0): int64 (N, max_len).

    >>> encode(["b a z"], {"<pad>": 0, "<unk>": 1, "a": 2, "b": 3}, 4).tolist()
    [[3, 2, 1, 0]]
    """
    texts = list(texts)
    ids = np.zeros((len(texts), max_len), dtype=np.int64)
    unk = vocab[UNK]
    for row, text in enumerate(texts):
        tokens = [vocab.get(t, unk) for t in tokenize(text)[:max_len]]
        ids[row, : len(tokens)] = tokens
    return ids


def find_sst2(root: DataRoot, task: str = "sst2") -> Path:
    """``sst2.csv`` under the root, or the root itself if it is a file."""
    if root.path.is_file():
        return root.path
    if (root.path / "sst2.csv").is_file():
        return root.path / "sst2.csv"
    raise _missing(task, root, "sst2.csv with columns text,label,split (label 0/1; split train/dev/test)")


def read_sst2_csv(path: Path, task: str = "sst2") -> dict[str, tuple[list[str], np.ndarray]]:
    """The CSV's rows by split: ``{"train": (texts, labels), "dev": ..., "test": ...}``."""
    rows: dict[str, tuple[list[str], list[int]]] = {s: ([], []) for s in SST2_SPLITS}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [c for c in SST2_COLUMNS if c not in columns]
            if missing:
                raise DataError(f"task {task}: {str(path)!r} lacks column(s) {', '.join(missing)}; "
                                f"expected a CSV header with {','.join(SST2_COLUMNS)}, but got {','.join(columns) or 'no header'}")
            for line, row in enumerate(reader, start=2):
                label, split = (row["label"] or "").strip(), (row["split"] or "").strip()
                if label not in ("0", "1"):
                    raise DataError(f"task {task}: {str(path)!r} line {line}: label must be 0 or 1, but got {label!r}")
                if split not in rows:
                    raise DataError(f"task {task}: {str(path)!r} line {line}: split must be one of "
                                    f"{', '.join(SST2_SPLITS)}, but got {split!r}")
                rows[split][0].append(row["text"] or "")
                rows[split][1].append(int(label))
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"task {task}: cannot read {str(path)!r} as a UTF-8 CSV ({exc}); "
                        f"expected columns {','.join(SST2_COLUMNS)}") from None
    for split in ("train", "test"):
        if not rows[split][0]:
            raise DataError(f"task {task}: {str(path)!r} has no rows with split {split!r}; expected train and test rows")
    return {s: (texts, np.asarray(labels, dtype=np.int64)) for s, (texts, labels) in rows.items()}


def load_sst2(
    root: DataRoot, *, max_len: int = 50, min_count: int = 1, max_vocab: int = 20000, task: str = "sst2"
) -> tuple[Split, Split, dict[str, int], Path]:
    """SST-2 as padded token ids (int64 (N, max_len)) and labels: train split for training, test split
    for test (dev is not used). The vocabulary is built from the train split only."""
    path = find_sst2(root, task)
    rows = read_sst2_csv(path, task)
    vocab = build_vocab(rows["train"][0], min_count=min_count, max_size=max_vocab)
    train, test = (Split(encode(rows[s][0], vocab, max_len), rows[s][1]) for s in ("train", "test"))
    return train, test, vocab, path
