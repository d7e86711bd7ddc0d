from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def digits_task():
    """The built-in digits task (scikit-learn's bundled 8x8 digits, DigitsCNN model)."""
    from evaluators.tasks import TaskConfig, make_task

    return make_task(TaskConfig(name="digits", dense_epochs=1))
