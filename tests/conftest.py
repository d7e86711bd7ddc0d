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
