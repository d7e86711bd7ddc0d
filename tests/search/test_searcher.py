"""Constraints, baselines and the searcher that tells Optuna about constraints (no Ray needed)."""
from __future__ import annotations

import optuna
import pytest

from search.constraints import Constraint, parse_all, violations
from search.baselines import reference_points
from search.searcher import SecateursSearch
from spaces import PrunableGroup, RatioRange, Rule, SearchSpace, SpaceConfig

CHANNELS = ("channel", "structured")  # granularities of conv/linear groups, as discover_groups gives them

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
    groups = [PrunableGroup("a", "conv", 16, granularities=CHANNELS), PrunableGroup("b", "conv", 16, granularities=CHANNELS), PrunableGroup("c", "linear", 8, granularities=CHANNELS)]
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
    logged: dict[int, tuple[str, dict]] = {}

    def log_trial(index, policy, metrics, *, tags, kind, sampled):
        logged[index] = (kind, tags)
        return f"run-{index}"

    tracker = SimpleNamespace(trial_table=lambda: ([], 0, set()), log_trial=log_trial,
                              log_search_metrics=lambda metrics, step: None, log_elapsed=lambda seconds: None)
    recorder = TrialRecorder(tracker, s, 4, lambda line: None, dense=DENSE, baselines=first)
    twin = {k: v for k, v in configs[0].items() if k != ORIGIN}
    result = {"accuracy": 0.9, "latency_ms": 1.0, "size_mb": 0.1, "node_id": "n1"}
    for trial_id, config in (("t0", configs[0]), ("t9", twin)):
        recorder.on_trial_complete(0, [], SimpleNamespace(trial_id=trial_id, config=config, last_result=result))
    assert logged[1] == ("baseline", {"secateurs.ray_trial_id": "t0", "secateurs.node_id": "n1", "secateurs.baseline": "uniform 0.5"})
    assert logged[2][0] == "trial" and "secateurs.baseline" not in logged[2][1]


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


def test_a_resumed_searcher_is_told_every_recorded_trial_once_and_counts_the_fine_tunes():
    """MLflow is the record: a resumed search's searcher starts with every recorded trial in its
    study (parameters, objective values, constraint values; failures as failed), and the recorded
    fine-tuned sampled trials count towards the budget of fine-tunes."""
    from ray.tune.search import Searcher

    from search.searcher import ORIGIN, RecordedTrial, sampled_params

    s = space()
    first = reference_points(s, None, None, ["uniform"], [0.5, 0.2])
    constraints = parse_all(["latency_ms <= 1.5"])

    def make(history=(), remaining=first):
        return SecateursSearch(
            space=s, metric=["accuracy", "latency_ms", "size_mb"], mode=["max", "min", "min"],
            sampler=optuna.samplers.NSGAIISampler(seed=0, population_size=2), points_to_evaluate=[b.point for b in remaining] or None,
            origins=[b.name for b in remaining], constraints=constraints, dense=DENSE, fine_tunes=3,
            exempt=sum(b.kind == "baseline" for b in remaining), history=history,
        )

    result = {"accuracy": 0.8, "latency_ms": 1.0, "size_mb": 0.5, "fidelity": 1}
    searcher = make()
    b1, b2, t1, t2 = (searcher.suggest(t) for t in ("b1", "b2", "t1", "t2"))
    # ... killed: MLflow holds b1 and t1 (t1 fine-tuned), t2 failed; b2 was still running
    history = [RecordedTrial(sampled_params(b1), result), RecordedTrial(sampled_params(t1), {**result, "latency_ms": 2.0}, True),
               RecordedTrial(sampled_params(t2), None)]
    resumed = make(history, remaining=first[1:])
    trials = [t for t in resumed._ot_study.trials if t.state != optuna.trial.TrialState.WAITING]  # not the enqueued baseline
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.FAIL]
    assert trials[1].params == {k: v for k, v in sampled_params(t1).items() if k in trials[1].params} and trials[1].values == [0.8, 2.0, 0.5]
    assert trials[1].constraints == {"latency_ms <= 1.5": pytest.approx(0.5)}  # latency 2.0 against the bound 1.5
    assert resumed.told == 3
    again = [resumed.suggest(t) for t in ("n1", "n2", "n3")]
    assert again[0][ORIGIN] == first[1].name and ORIGIN not in again[1]  # the baseline not recorded comes first
    assert resumed.suggest("n4") is None  # t1 (recorded) + n2, n3 running could fill the budget of 3: wait
    for trial_id in ("n1", "n2", "n3"):
        resumed.on_trial_complete(trial_id, result=result)
    assert resumed.suggest("n4") == Searcher.FINISHED  # t1, n2 and n3: each fine-tune counted once
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in resumed._ot_study.trials) == 5


def test_a_recorded_trial_outside_the_space_still_counts_but_is_not_told():
    from search.searcher import RecordedTrial

    searcher = SecateursSearch(
        space=space(), metric=["accuracy", "latency_ms", "size_mb"], mode=["max", "min", "min"],
        sampler=optuna.samplers.RandomSampler(seed=0), constraints=[], dense=DENSE, fine_tunes=2,
        history=[RecordedTrial({"ratio.a": 0.9, "ratio.b": 0.1, "criterion": "l1"}, {"accuracy": 0.5, "latency_ms": 1.0, "size_mb": 0.5}, True),
                 RecordedTrial(None, None)],
    )
    assert searcher.told == 0 and searcher._fine_tuned == 1  # ratio.a 0.9 is above the range's 0.6; no sampled.json


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


def test_the_longest_trial_counts_a_running_one_with_the_seconds_it_has_run(monkeypatch):
    from types import SimpleNamespace

    import search.recorder as recorder_module
    from search.recorder import TrialRecorder

    now = [100.0]
    monkeypatch.setattr(recorder_module.time, "monotonic", lambda: now[0])
    recorder = TrialRecorder(SimpleNamespace(trial_table=lambda: ([], 0, {"old"})), None, 10, lambda line: None, dense=DENSE)
    assert recorder.longest_trial_s() is None
    trial = lambda trial_id: SimpleNamespace(trial_id=trial_id, last_result={}, error_file=None, config={})  # noqa: E731
    recorder.on_trial_start(0, [], trial("a"))
    recorder.on_trial_start(0, [], trial("b"))
    now[0] = 118.0
    recorder.on_trial_complete(0, [], trial("a"))  # 18 s, from its start to its result
    assert recorder.longest_trial_s() == 18.0
    now[0] = 146.0
    assert recorder.longest_trial_s() == 46.0  # "b" has run 46 s and has not ended: it is at least that long
    recorder.on_trial_error(0, [], trial("b"))
    now[0] = 200.0
    assert recorder.longest_trial_s() == 46.0


def test_a_searcher_whose_next_trial_would_not_end_in_time_stops_suggesting_for_good(tmp_path):
    from ray.tune.search import Searcher

    fits = [True]
    searcher = SecateursSearch(
        space=space(), metric=["accuracy", "latency_ms", "size_mb"], mode=["max", "min", "min"],
        sampler=optuna.samplers.RandomSampler(seed=0), constraints=[], dense=DENSE, fits=lambda: fits[0],
    )
    assert isinstance(searcher.suggest("t1"), dict) and not searcher.out_of_time
    fits[0] = False  # the time budget's stop comes before a trial started now would end
    assert searcher.suggest("t2") == Searcher.FINISHED and searcher.out_of_time
    fits[0] = True  # a trial that ended early does not bring the time back: the trials are over
    assert searcher.suggest("t3") == Searcher.FINISHED
    searcher.save(str(tmp_path / "searcher.pkl"))  # Ray Tune snapshots the searcher: the check of the time does not pickle
    assert searcher._fits is not None


def test_a_trial_fits_when_a_median_trial_ends_before_the_end_of_the_search_needs_the_time():
    from types import SimpleNamespace

    from search.driver import _Session

    rows = [{"time_prune_s": 1.0, "time_finetune_s": t, "time_measure_s": 1.0} for t in (8.0, 13.0, 30.0)]  # median 15 s
    session = SimpleNamespace(seconds_left=lambda: 100.0, end_s=lambda rows: 80.0)
    assert _Session.trial_fits(session, rows)  # 100 - 15 > 80: it ends 5 s before the stop
    assert not _Session.trial_fits(SimpleNamespace(seconds_left=lambda: 94.0, end_s=lambda rows: 80.0), rows)
    assert _Session.trial_fits(SimpleNamespace(seconds_left=lambda: 94.0, end_s=lambda rows: 80.0), [])  # nothing to go by yet
    assert _Session.trial_fits(SimpleNamespace(seconds_left=lambda: None, end_s=lambda rows: 80.0), rows)  # no time budget
    # the longest trial in wall seconds, when longer: a lightly pruned policy of the 5-seed benchmark's 1x
    # search took 46 s where the median took 18, and one started 24 s before the stop was cut off there
    assert not _Session.trial_fits(session, rows, longest=25.0)  # 100 - 25 < 80
    assert _Session.trial_fits(session, rows, longest=10.0)  # the median's 15 s, still
