"""Where the tests find the real data files (the CIFAR-10 subset, SST-2): ``$SECATEURS_DATA`` (or
the default data root), else ``../shared/data`` beside the checkout, as ``.ci/run`` sets it up."""
from __future__ import annotations

from pathlib import Path

from evaluators.datasets import resolve_data_root

ROOT = Path(__file__).resolve().parents[1]
DATA_DIRS = [resolve_data_root(None).path, ROOT.parent / "shared" / "data"]


def data_root(pattern: str) -> Path | None:
    """The first of :data:`DATA_DIRS` holding a file that matches ``pattern`` (``sst2.csv``,
    ``cifar10*.npz``), or None on a machine that has none."""
    return next((d for d in DATA_DIRS if any(d.glob(pattern))), None)
