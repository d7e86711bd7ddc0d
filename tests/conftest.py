from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Every local Ray the tests start (in this process, in the drivers they spawn, in `ray start`) keeps
# its session logs under $RAY_TMPDIR/ray, /tmp/ray by default, and nothing removes them: a week of
# test runs left 60 GB there. The suite's Rays get a folder of their own (one per pytest-xdist
# worker), removed when it ends; it is under $TMPDIR or /tmp as Ray's own is, since Ray's unix
# sockets live there and their paths must stay short. A $RAY_TMPDIR the developer set is kept.
_RAY_TMPDIR = None
if "RAY_TMPDIR" not in os.environ:
    _RAY_TMPDIR = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="secateurs-ray-")


def pytest_sessionfinish(session, exitstatus):
    if _RAY_TMPDIR is not None:
        shutil.rmtree(_RAY_TMPDIR, ignore_errors=True)


@pytest.fixture(scope="session")
def digits_task():
    """The built-in digits task (scikit-learn's bundled 8x8 digits, DigitsCNN model)."""
    from evaluators.tasks import TaskConfig, make_task

    return make_task(TaskConfig(name="digits", dense_epochs=1))


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory, digits_task):
    """A DigitsCNN trained for one epoch on digits, saved as a plain state dict (its path)."""
    import torch

    from evaluators.train import FinetuneConfig, train

    torch.manual_seed(0)
    model = digits_task.build_model()
    train(model, digits_task.train_data, FinetuneConfig(epochs=1, lr=0.05), seed=0)
    path = tmp_path_factory.mktemp("dense") / "digits_cnn.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box they spin-wait.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# The longest tests (the kill loops and fault tests, the shared compress search, the Hugging Face
# searches: nearly half of the suite's time) go first: pytest-xdist hands tests to its workers in
# collection order, and a long one handed out last would leave the other worker idle at the end.
FIRST = ("test_kill_loop.py", "test_faults.py", "test_compress_e2e.py", "test_hf_search.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in FIRST)  # stable: the order within each part is kept
