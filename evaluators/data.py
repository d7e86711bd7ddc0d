"""Where a task's batches come from, read batch by batch.

A task's ``train_data``, ``eval_data`` and ``calibration_data`` may each be

- tensors in memory: one tensor, a tuple ``(inputs..., targets)`` or a dict of tensors of one
  length (:class:`InMemory`; batches are slices, no DataLoader, no per-example collation);
- a ``torch.utils.data.Dataset``, map-style or iterable (:class:`DatasetSource`; read through a
  ``DataLoader`` with torch's default collation, shuffled with a seeded generator for training);
- a function ``make(batch_size) -> iterable of batches``, e.g. one returning a ``DataLoader``, or a
  re-iterable such as a ``DataLoader`` itself (:class:`LoaderSource`; it decides batch size and order).

Nothing requires the data to fit in memory: a Dataset that reads its examples from files is read
batch by batch, and each Ray worker opens the data itself (the task factory runs there).
What a batch is (tensor, tuple, dict) is defined in :mod:`evaluators.batches`.

>>> source = as_source((torch.arange(5.0)[:, None], torch.zeros(5).long()), "train_data")
>>> [batch_size_of(b) for b in source.batches(2)]
[2, 2, 1]
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from evaluators.batches import LABELS, Batch, batch_size_of, concat_batches, leaves, map_tensors, slice_batch, to_device


class DataError(ValueError):
    """Data a task gave that secateurs cannot read; the message names the field and what was expected."""


class DataSource:
    """A task's data, read in batches. Subclasses implement :meth:`batches`."""

    name: str = "data"

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> Iterator[Batch]:
        """One pass over the data in batches of ``batch_size`` (on ``device`` when given)."""
        raise NotImplementedError

    def num_examples(self) -> int | None:
        """How many examples one pass holds, when known without reading the data."""
        return None

    def batches_per_epoch(self, batch_size: int) -> int | None:
        """How many batches one pass yields, when known without reading the data."""
        n = self.num_examples()
        return None if n is None else math.ceil(n / batch_size)

    def first(self, examples: int) -> Batch | None:
        """One batch of the first ``examples`` examples (fewer if the data holds fewer; None if empty)."""
        taken, seen = [], 0
        for batch in self.batches(examples):
            size = batch_size_of(batch)
            taken.append(batch if seen + size <= examples else slice_batch(batch, 0, examples - seen))
            seen += size
            if seen >= examples:
                break
        if not taken:
            return None
        return taken[0] if len(taken) == 1 else concat_batches(taken)

    def fingerprint(self) -> str:
        """A digest of the data, for the dense model's cache key (in memory: every byte; streamed:
        the kind, the number of examples and the first batch)."""
        digest = hashlib.sha256(f"{type(self).__name__}:{self.num_examples()}".encode())
        first = self.first(64)
        if first is not None:
            _update_digest(digest, first)
        return digest.hexdigest()


def _update_digest(digest: Any, value: Any) -> None:
    def add(t: torch.Tensor) -> torch.Tensor:
        digest.update(str((tuple(t.shape), t.dtype)).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        return t

    map_tensors(value, add)


class InMemory(DataSource):
    """Tensors already in memory (a tensor, a tuple or a dict of tensors of one length), sliced into
    batches: the fast path of the built-in tasks.

    >>> data = InMemory({"x": torch.zeros(6, 2), "labels": torch.zeros(6).long()})
    >>> data.num_examples(), [b["x"].shape[0] for b in data.batches(4)]
    (6, [4, 2])
    """

    def __init__(self, data: Batch, name: str = "data") -> None:
        self.name = name
        lengths = {}
        for path, leaf in leaves(data):
            if isinstance(leaf, np.ndarray):
                raise DataError(f"{name}{path}: is a numpy array; give torch tensors (torch.from_numpy(array)), "
                                "a torch Dataset or a DataLoader")
            if not isinstance(leaf, torch.Tensor):
                raise DataError(f"{name}{path}: must be a tensor, but got {type(leaf).__name__}")
            if leaf.dim() == 0:
                raise DataError(f"{name}{path}: must have a leading example dimension, but got a 0-d tensor")
            lengths[path or "[0]"] = len(leaf)
        if not lengths:
            raise DataError(f"{name}: holds no tensor")
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{name}{p} {n}" for p, n in lengths.items())
            raise DataError(f"{name}: its tensors must have one length (one row per example), but got {shown}")
        self.data = data
        self._length = next(iter(lengths.values()))

    def num_examples(self) -> int:
        return self._length

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> Iterator[Batch]:
        data = self._on(device)
        n = self._length
        if shuffle:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                index = order[start:start + batch_size]
                if device is not None:
                    index = index.to(device)
                yield map_tensors(data, lambda t: t[index])
        else:
            for start in range(0, n, batch_size):
                yield slice_batch(data, start, start + batch_size)

    def _on(self, device: torch.device | str | None) -> Batch:
        """The data on ``device``; the copy on an accelerator is kept for the next pass."""
        if device is None or torch.device(device).type == "cpu":
            return self.data if device is None else to_device(self.data, device)
        key = str(torch.device(device))
        if getattr(self, "_copy", (None,))[0] != key:
            self._copy = (key, to_device(self.data, device))
        return self._copy[1]

    def first(self, examples: int) -> Batch | None:
        return slice_batch(self.data, 0, examples) if self._length else None

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        _update_digest(digest, self.data)
        return digest.hexdigest()


class DatasetSource(DataSource):
    """A ``torch.utils.data.Dataset`` (map-style or iterable), read through a ``DataLoader`` with
    torch's default collation; training passes over a map-style one are shuffled by a seeded
    generator (an iterable one is read in its own order).

    >>> ds = torch.utils.data.TensorDataset(torch.zeros(5, 2), torch.zeros(5).long())
    >>> [len(b[0]) for b in DatasetSource(ds).batches(2, shuffle=True, generator=torch.Generator().manual_seed(0))]
    [2, 2, 1]
    """

    def __init__(self, dataset: Dataset, name: str = "data", num_workers: int = 0) -> None:
        self.dataset, self.name, self.num_workers = dataset, name, num_workers
        self.iterable = isinstance(dataset, IterableDataset)

    def num_examples(self) -> int | None:
        try:
            return len(self.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> Iterator[Batch]:
        loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=shuffle and not self.iterable,
                            generator=generator if shuffle and not self.iterable else None, num_workers=self.num_workers)
        for batch in loader:
            yield batch if device is None else to_device(batch, device)


class LoaderSource(DataSource):
    """Batches from a function ``make(batch_size)`` returning an iterable of batches (a
    ``DataLoader``), called once per pass, or from a re-iterable such as a ``DataLoader``. The
    loader decides the order; secateurs' batch size reaches only a function.

    >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(5, 2)), batch_size=4)
    >>> LoaderSource(lambda batch_size: loader).batches_per_epoch(64)
    2
    """

    def __init__(self, make: Callable[[int], Iterable[Batch]] | Iterable[Batch], name: str = "data") -> None:
        self.make, self.name = make, name
        self._counted: dict[int, int] = {}

    def _loader(self, batch_size: int) -> Iterable[Batch]:
        if not callable(self.make):
            return self.make
        loader = self.make(batch_size)
        if isinstance(loader, Iterator) or not isinstance(loader, Iterable):
            kind = "an iterator, which can be read only once" if isinstance(loader, Iterator) else type(loader).__name__
            raise DataError(f"{self.name}: the function must return a re-iterable of batches such as a DataLoader, but it "
                            f"returned {kind}")
        return loader

    def num_examples(self) -> int | None:
        dataset = getattr(self._loader(1) if callable(self.make) else self.make, "dataset", None)
        try:
            return len(dataset) if dataset is not None else None  # type: ignore[arg-type]
        except TypeError:
            return None

    def batches_per_epoch(self, batch_size: int) -> int | None:
        try:
            return len(self._loader(batch_size))  # type: ignore[arg-type]
        except TypeError:
            return None

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> Iterator[Batch]:
        for batch in self._loader(batch_size):
            yield batch if device is None else to_device(batch, device)


def _holds_arrays(value: Any) -> bool:
    """A tensor or array, or a tuple, list or dict with one among its leaves (then checked by :class:`InMemory`)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return True
    if isinstance(value, (tuple, list, dict)):
        return any(_holds_arrays(v) for v in (value.values() if isinstance(value, dict) else value))
    return False


def as_source(data: Any, name: str = "data", *, num_workers: int = 0) -> DataSource:
    """``data`` as a :class:`DataSource` (see the module docstring for what it may be); ``name``
    (e.g. ``train_data``) is the field the errors name.

    >>> type(as_source(torch.zeros(3, 2))).__name__, type(as_source(torch.utils.data.TensorDataset(torch.zeros(3)))).__name__
    ('InMemory', 'DatasetSource')
    """
    if isinstance(data, DataSource):
        return data
    if _holds_arrays(data):
        return InMemory(data, name)
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")
                                     and not isinstance(data, (str, bytes, dict, tuple, list))):
        return DatasetSource(data, name, num_workers)
    if callable(data):
        return LoaderSource(data, name)
    if isinstance(data, Iterator):
        raise DataError(f"{name}: is an iterator (a generator?), which can be read only once; give a Dataset, a "
                        "DataLoader or a function(batch_size) that returns one")
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict, tuple, list)):
        return LoaderSource(data, name)
    raise DataError(f"{name}: must be tensors (a tensor, a tuple or a dict of them), a torch Dataset, a DataLoader or a "
                    f"function(batch_size) returning one, but got {type(data).__name__}")


def endless_batches(source: DataSource, batch_size: int, *, generator: torch.Generator, device: torch.device | str | None = None,
                    transform: Callable[[Batch, torch.Generator], Batch] | None = None) -> Iterator[Batch]:
    """Training batches pass after pass, shuffled by ``generator``, each through ``transform``
    (augmentation) when given. Raises :class:`DataError` if a pass yields no batch."""
    while True:
        empty = True
        for batch in source.batches(batch_size, shuffle=True, generator=generator, device=device):
            empty = False
            yield transform(batch, generator) if transform is not None else batch
        if empty:
            raise DataError(f"{source.name}: one pass over it yielded no batch; expected at least one")


def count_batches(source: DataSource, batch_size: int) -> int:
    """Batches per pass: known from the data's length, else counted by reading one pass."""
    known = source.batches_per_epoch(batch_size)
    return known if known is not None else sum(1 for _ in source.batches(batch_size))


# ---------------------------------------------------------------- augmentation


def random_crop_flip(batch: Batch, generator: torch.Generator, *, padding: int = 4) -> Batch:
    """Standard image augmentation on a batch of NCHW image tensors, per example: a random crop of the
    image zero-padded by ``padding`` on each side, then a horizontal flip with probability 1/2. Only
    the batch's 4-d floating-point inputs change (targets are kept); runs on the batch's device.

    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> out = random_crop_flip((x, torch.zeros(1).long()), torch.Generator().manual_seed(0), padding=1)
    >>> out[0].shape, out[1].tolist()
    (torch.Size([1, 1, 4, 4]), [0])
    """
    def augment(images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or not images.is_floating_point():
            return images
        n, _, h, w = images.shape
        padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device)
        flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        rows = dy[:, None] + torch.arange(h, device=images.device)                       # (N, H)
        cols = dx[:, None] + torch.arange(w, device=images.device)                       # (N, W)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        index = torch.arange(n, device=images.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()

    if isinstance(batch, torch.Tensor):
        return augment(batch)
    if isinstance(batch, dict):
        return {k: (v if k == LABELS else augment(v)) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)([augment(v) for v in batch[:-1]] + [batch[-1]]) if len(batch) >= 2 else type(batch)(augment(v) for v in batch)
    return batch
