"""Fine-tuning options: optimizer choice, knowledge distillation, BatchNorm re-calibration."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evaluators.train import FinetuneConfig, make_optimizer, recalibrate_batchnorm, train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def test_batchnorm_recalibration_equals_the_data_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(200, 8) * 3 + 1
    weights = [p.detach().clone() for p in model.parameters()]
    used = recalibrate_batchnorm(model, x, batches=4, batch_size=50)
    assert used == 4 and not model.training
    features = model[0](x).detach()
    bn = model[1]
    # a cumulative average of 4 equal batches' means is the mean over all 200 rows
    assert torch.allclose(bn.running_mean, features.mean(0), atol=1e-5)
    unbiased_per_batch = torch.stack([features[i:i + 50].var(0, unbiased=True) for i in range(0, 200, 50)]).mean(0)
    assert torch.allclose(bn.running_var, unbiased_per_batch, atol=1e-4)
    assert bn.momentum == 0.1  # restored
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # no gradient step


def test_recalibration_without_batchnorm_does_nothing():
    assert recalibrate_batchnorm(nn.Linear(8, 2), torch.randn(10, 8), batches=3) == 0


def test_distillation_pulls_the_student_towards_the_teacher():
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    student = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    x, y = toy()
    y_random = torch.randint(0, 2, y.shape, generator=torch.Generator().manual_seed(5))

    def gap() -> float:
        with torch.no_grad():
            return F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(teacher(x), 1), reduction="batchmean", log_target=True).item()

    before = gap()
    # alpha = 1: the labels (random here) do not matter, only the teacher does
    train(student, (x, y_random), FinetuneConfig(epochs=20, lr=0.05, batch_size=32, distill_alpha=1.0, distill_temperature=1.0), teacher=teacher)
    assert gap() < 0.25 * before


def test_adamw_trains_and_unknown_optimizer_is_named():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x, y = toy()
    loss_before = F.cross_entropy(model(x), y).item()
    assert train(model, (x, y), FinetuneConfig(epochs=5, lr=0.01, optimizer="adamw")) > 0
    assert F.cross_entropy(model(x), y).item() < loss_before
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; valid: sgd, adamw"):
        make_optimizer(model, "lion", lr=0.01, momentum=0.9, weight_decay=0.0)


@pytest.mark.parametrize("kwargs, field", [
    ({"optimizer": "lion"}, "optimizer"),
    ({"distill_alpha": 1.5}, "distill_alpha"),
    ({"distill_temperature": 0}, "distill_temperature"),
    ({"bn_recalibration_batches": -1}, "bn_recalibration_batches"),
])
def test_finetune_config_names_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FinetuneConfig(**kwargs)


def test_policy_fine_tune_knobs_override_the_config():
    import io

    import evaluators.trial as trial_mod
    from evaluators.models import DigitsCNN
    from evaluators.tasks import Task
    from spaces import Policy

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    calls = []  # what the fine-tune received: the task's own hook sees every knob

    def finetune(run):
        calls.append({"lr": run.lr, **run.settings})
        return 0

    task = Task(model=lambda: DigitsCNN(width=4), train_data=(x, y), eval_data=(x, y), num_classes=10, finetune=finetune)
    buffer = io.BytesIO()
    torch.save(task.build_model().state_dict(), buffer)
    config = FinetuneConfig(epochs=1, lr=0.01, optimizer="sgd")
    trial_mod.prune_and_finetune(Policy("l1", {}, finetune={"lr": 0.002, "optimizer": "adamw"}), task, buffer.getvalue(), config)
    trial_mod.prune_and_finetune(Policy("l1", {}), task, buffer.getvalue(), config)
    assert (calls[0]["lr"], calls[0]["optimizer"]) == (0.002, "adamw")
    assert (calls[1]["lr"], calls[1]["optimizer"]) == (0.01, "sgd")
