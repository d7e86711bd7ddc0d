"""Constraints, baselines and the searcher that tells Optuna about constraints (no Ray needed)."""
from __future__ import annotations

import optuna
import pytest

from search.constraints import Constraint, parse_all, violations
from search.baselines import reference_points
from search.searcher import SecateursSearch
from spaces import PrunableGroup, RatioRange, Rule, SearchSpace, SpaceConfig

DENSE = {"accuracy": 0.9, "accuracy_drop": 0.0, "latency_ms": 2.0, "size_mb": 1.0, "macs": 1000.0, "params": 500.0}


@pytest.mark.parametrize(
    "text, metrics, expected",
    [
        ("accuracy_drop <= 0.01", {"accuracy_drop": 0.03}, 0.02),
        ("latency_ms <= 4", {"latency_ms": 3.0}, -1.0),
        ("macs <= 0.5 * dense", {"macs": 600.0}, 100.0),
        ("accuracy >= 0.95 * dense", {"accuracy": 0.9}, 0.855 - 0.9),
        ("size_mb<=2.5e-1*dense", {"size_mb": 0.25}, 0.0),
    ],
)
def test_constraint_violation(text, metrics, expected):
    assert Constraint.parse(text).violation(metrics, DENSE) == pytest.approx(expected)


@pytest.mark.parametrize("text, message", [
    ("latency_ms < 4", "is not of the form"),
    ("flops <= 3", "unknown metric 'flops'; valid: accuracy, accuracy_drop, latency_ms, size_mb, macs, params"),
    ("macs <= dense", "is not of the form"),
])
def test_bad_constraints_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        Constraint.parse(text)


def space() -> SearchSpace:
    groups = [PrunableGroup("a", "conv", 16), PrunableGroup("b", "conv", 16), PrunableGroup("c", "linear", 8)]
    config = SpaceConfig(criteria=["l2", "l1"], ratio=RatioRange(0.0, 0.6, 0.1),
                         rules=[Rule(match="b", high=0.3), Rule(match="c", exclude=True)])
    return SearchSpace(config, groups)


def test_searcher_enqueues_baselines_and_tells_optuna_the_constraints():
    s = space()
    constraints = parse_all(["accuracy_drop <= 0.01", "macs <= 0.5 * dense"])
    searcher = SecateursSearch(
        space=s, metric=["accuracy", "latency_ms", "size_mb"], mode=["max", "min", "min"],
        sampler=optuna.samplers.NSGAIISampler(seed=0, population_size=4),
        points_to_evaluate=[b.point for b in reference_points(s, None, None, ["uniform"], [0.5])], constraints=constraints, dense=DENSE,
    )
    first = searcher.suggest("t1")
    assert first["ratio.a"] == 0.5 and first["ratio.b"] == 0.3 and first["criterion"] == "l2"
    result = {"accuracy": 0.88, "accuracy_drop": 0.02, "latency_ms": 1.0, "size_mb": 0.5, "macs": 400.0, "params": 200.0}
    searcher.on_trial_complete("t1", result=result)
    trial = searcher._ot_study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.system_attrs["constraints:accuracy_drop <= 0.01"] == pytest.approx(0.01)
    assert trial.system_attrs["constraints:macs <= 0.5 * dense"] == pytest.approx(-100.0)
    expected = violations(constraints, result, DENSE)
    assert {k.removeprefix("constraints:"): v for k, v in trial.system_attrs.items() if k.startswith("constraints:")} == pytest.approx(expected)


def test_the_enqueued_points_and_only_they_carry_their_names():
    from types import SimpleNamespace

    from search.baselines import Baseline
    from search.recorder import TrialRecorder
    from search.searcher import ORIGIN

    s = space()
    first = [Baseline(b.name, b.point) for b in reference_points(s, None, None, ["uniform"], [0.5, 0.2])]
    searcher = SecateursSearch(
        space=s, metric=["accuracy", "latency_ms", "size_mb"], mode=["max", "min", "min"],
        sampler=optuna.samplers.RandomSampler(seed=0), points_to_evaluate=[b.point for b in first],
        origins=[b.name for b in first], constraints=[], dense=DENSE,
    )
    configs = [searcher.suggest(f"t{i}") for i in range(4)]
    assert [c.get(ORIGIN) for c in configs] == ["uniform 0.5", "uniform 0.2", None, None]
    assert configs[0]["ratio.a"] == 0.5 and configs[1]["ratio.a"] == 0.2
    # the recorder labels by origin: a sampled trial whose policy equals a baseline is still a trial
    tracker = SimpleNamespace(trial_table=lambda: ([], 0, set()))
    recorder = TrialRecorder(tracker, s, 4, print, dense=DENSE, baselines=first)
    twin = {k: v for k, v in configs[0].items() if k != ORIGIN}
    assert recorder._tags(SimpleNamespace(trial_id="t0", config=configs[0]), {}) == (
        "baseline", {"secateurs.ray_trial_id": "t0", "secateurs.baseline": "uniform 0.5"})
    assert recorder._tags(SimpleNamespace(trial_id="t9", config=twin), {})[0] == "trial"


def test_a_budget_of_fine_tunes_counts_only_sampled_trials_that_were_fine_tuned():
    from ray.tune.search import Searcher

    s = space()
    first = reference_points(s, None, None, ["uniform"], [0.5])
    searcher = SecateursSearch(
        space=s, metric=["accuracy", "latency_ms", "size_mb"], mode=["max", "min", "min"],
        sampler=optuna.samplers.RandomSampler(seed=0), points_to_evaluate=[b.point for b in first],
        origins=[b.name for b in first], constraints=[], dense=DENSE, fine_tunes=2, exempt=1,
    )
    result = {"accuracy": 0.8, "latency_ms": 1.0, "size_mb": 0.5}
    baseline, t1, t2 = (searcher.suggest(t) for t in ("b", "t1", "t2"))
    assert all(isinstance(c, dict) for c in (baseline, t1, t2))
    assert searcher.suggest("t3") is None  # two running could still fill the budget of 2: wait
    searcher.on_trial_complete("b", result={**result, "fidelity": 1})  # the baseline is not counted
    assert searcher.suggest("t3") is None
    searcher.on_trial_complete("t1", result={**result, "fidelity": 0})  # screened out: not counted
    assert isinstance(searcher.suggest("t3"), dict)
    searcher.on_trial_complete("t2", result={**result, "fidelity": 1})
    searcher.on_trial_complete("t3", error=True)  # a failed trial is not a fine-tune either
    assert isinstance(searcher.suggest("t4"), dict)
    searcher.on_trial_complete("t4", result={**result, "fidelity": 1})
    assert searcher.suggest("t5") == Searcher.FINISHED  # 2 sampled trials fine-tuned: t2 and t4


def test_without_a_budget_of_fine_tunes_the_searcher_never_waits():
    s = space()
    searcher = SecateursSearch(
        space=s, metric=["accuracy", "latency_ms", "size_mb"], mode=["max", "min", "min"],
        sampler=optuna.samplers.RandomSampler(seed=0), constraints=[], dense=DENSE,
    )
    assert all(isinstance(searcher.suggest(f"t{i}"), dict) for i in range(5))


def test_a_restored_searcher_replays_the_recorded_trials_its_checkpoint_never_saw(tmp_path):
    """Ray checkpoints the searcher every so often; MLflow records every trial. On resume, the
    recorded trials the checkpoint does not know of are suggested again, with their recorded
    parameters and a replay mark, before anything new: counted once, never sampled afresh."""
    from ray.tune.search import Searcher

    from search.searcher import ORIGIN, REPLAY, RecordedTrial, sampled_params

    s = space()
    first = reference_points(s, None, None, ["uniform"], [0.5, 0.2])

    def make():
        return SecateursSearch(
            space=s, metric=["accuracy", "latency_ms", "size_mb"], mode=["max", "min", "min"],
            sampler=optuna.samplers.RandomSampler(seed=0), points_to_evaluate=[b.point for b in first],
            origins=[b.name for b in first], constraints=[], dense=DENSE, fine_tunes=3, exempt=2,
        )

    result = {"accuracy": 0.8, "latency_ms": 1.0, "size_mb": 0.5, "fidelity": 1}
    searcher = make()
    b1 = searcher.suggest("b1")
    searcher.save(str(tmp_path / "searcher.pkl"))  # Ray's last checkpoint: it knows of b1 only
    b2, t1, t2 = (searcher.suggest(t) for t in ("b2", "t1", "t2"))
    searcher.on_trial_complete("b1", result=result)
    searcher.on_trial_complete("b2", result=result)
    searcher.on_trial_complete("t1", result=result)
    # ... killed; MLflow holds b1, b2 and t1 (t2 was running)
    recorded = [RecordedTrial("b1", origin=first[0].name), RecordedTrial("b2", origin=first[1].name),
                RecordedTrial("t1", sampled=sampled_params(t1))]

    resumed = make()
    resumed.replay_recorded(recorded)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    # Ray re-runs b1 (its checkpoint had it running) under its own id; the trainable replays it
    again = [resumed.suggest(t) for t in ("n1", "n2", "n3")]
    assert again[0][ORIGIN] == first[1].name and again[0][REPLAY] == "b2"
    assert sampled_params(again[1]) == sampled_params(t1) and again[1][REPLAY] == "t1" and ORIGIN not in again[1]
    assert REPLAY not in again[2] and ORIGIN not in again[2]  # sampled afresh: t2's run was lost
    assert resumed.replayed == 2
    for trial_id in ("b1", "n1", "n2", "n3"):
        resumed.on_trial_complete(trial_id, result=result)
    # the fine-tune budget counts t1 (replayed) and n3 once each: one more to go, then finished
    assert isinstance(resumed.suggest("n4"), dict)
    resumed.on_trial_complete("n4", result=result)
    assert resumed.suggest("n5") == Searcher.FINISHED
    # the sampler was told each trial once: b1, b2 and t1 (the last two as replays), n3, n4
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in resumed._ot_study.trials) == 5


def test_a_trial_recorded_as_failed_is_replayed_as_a_failure_without_any_work():
    from search.searcher import REPLAY
    from search.trainable import ReplayedFailure, TrialContext, run_trial

    context = TrialContext(space=None, task=None, checkpoint=b"", finetune=None, measure=None, dense_accuracy=0.9,
                           dense_params=1, replay={"old-id": {"error": "CUDA out of memory"}})
    with pytest.raises(ReplayedFailure, match="recorded as failed before the resume: CUDA out of memory"):
        run_trial({REPLAY: "old-id", "ratio.a": 0.5}, context)  # no space, task or checkpoint is touched


def test_the_hypervolume_plateau_count_goes_on_across_a_resume():
    from types import SimpleNamespace

    from search.recorder import TrialRecorder

    def row(trial, accuracy, latency, **extra):
        return {"trial": trial, "kind": "trial", "accuracy": accuracy, "latency_ms": latency, "size_mb": 0.5, **extra}

    rows = [row(1, 0.80, 1.5), row(2, 0.85, 1.0),  # each grows the hypervolume
            row(3, 0.70, 1.8), row(5, 0.60, 1.9),  # dominated by trial 2; trial 4 failed
            row(6, 0.99, 0.1, fidelity=0)]  # screened out: never on the frontier
    tracker = SimpleNamespace(trial_table=lambda: (rows, 1, set()))
    recorder = TrialRecorder(tracker, None, 10, print, dense=DENSE)
    assert recorder.since_improvement == 4  # trials 3, 4 (failed), 5 and 6
    assert recorder.best_hypervolume > 0
    rows.append(row(7, 0.9, 0.5))
    assert TrialRecorder(tracker, None, 10, print, dense=DENSE).since_improvement == 0
