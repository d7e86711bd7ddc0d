"""The screening scheduler's decisions, and the history a resumed search gives it back."""
from __future__ import annotations

import types

import pandas as pd
from ray.tune.schedulers import TrialScheduler

from search.constraints import Constraint
from search.screening import ScreeningScheduler, recorded_screening
from search.searcher import ORIGIN


def trial(trial_id: str, origin: str | None = None):
    return types.SimpleNamespace(trial_id=trial_id, config={ORIGIN: origin} if origin else {})


def screening(accuracy: float, latency: float, size: float = 1.0) -> dict:
    return {"fidelity": 0, "accuracy": accuracy, "latency_ms": latency, "size_mb": size}


GOOD, WORSE = screening(0.9, 1.0), screening(0.5, 2.0)


def test_dominated_trials_are_stopped_after_the_warmup_and_references_never():
    scheduler = ScreeningScheduler(warmup=2, references=["uniform 0.5"])
    assert scheduler.on_trial_result(None, trial("a"), GOOD) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, trial("b"), WORSE) == TrialScheduler.CONTINUE  # still warming up
    assert scheduler.on_trial_result(None, trial("c"), WORSE) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, trial("d", "uniform 0.5"), WORSE) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, trial("e"), screening(0.95, 3.0)) == TrialScheduler.CONTINUE  # not dominated
    assert scheduler.on_trial_result(None, trial("c"), {**WORSE, "fidelity": 1}) == TrialScheduler.CONTINUE  # full fidelity: not judged
    assert scheduler.stopped == {"c"}


def test_a_restored_history_counts_towards_the_warmup_and_dominates():
    history = recorded_screening(pd.DataFrame([
        {"trial": 1, "fidelity": 1.0, "accuracy": 0.95, "screening_accuracy": 0.9, "latency_ms": 0.8,
         "latency_ms_in_search": 1.0, "size_mb": 1.0},
        {"trial": 2, "fidelity": 0.0, "accuracy": 0.4, "latency_ms": 5.0, "latency_ms_in_search": float("nan"), "size_mb": 1.0},
        {"trial": 3, "fidelity": float("nan"), "accuracy": 0.99, "latency_ms": 0.1, "size_mb": 0.1},  # recorded without screening
    ]).to_dict("records"))
    assert history == [(0.9, 1.0, 1.0), (0.4, 5.0, 1.0)]
    resumed = ScreeningScheduler(warmup=2, history=history)
    assert resumed.on_trial_result(None, trial("x"), WORSE) == TrialScheduler.STOP  # dominated by trial 1's screening
    fresh = ScreeningScheduler(warmup=2)
    assert fresh.on_trial_result(None, trial("x"), WORSE) == TrialScheduler.CONTINUE


def test_a_trial_that_breaks_a_cost_constraint_is_stopped_at_screening_even_in_the_warmup():
    band = [Constraint.parse("macs <= 0.5 * dense"), Constraint.parse("macs >= 0.45 * dense"),
            Constraint.parse("accuracy_drop <= 0.01")]  # not known at screening: not judged there
    scheduler = ScreeningScheduler(warmup=10, references=["uniform 0.3"], constraints=band, dense={"macs": 100.0})
    assert scheduler.on_trial_result(None, trial("over"), {**GOOD, "macs": 60.0}) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, trial("under"), {**GOOD, "macs": 40.0}) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, trial("in"), {**WORSE, "macs": 48.0, "accuracy_drop": 0.4}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, trial("base", "uniform 0.3"), {**GOOD, "macs": 53.0}) == TrialScheduler.CONTINUE
    assert scheduler.stopped == {"over", "under"}
    assert len(scheduler.screened) == 1  # only the trial within the bounds judges the others


def test_a_policy_the_constraints_rule_out_does_not_push_out_one_they_allow():
    # the more pruned policy is faster and looks as accurate at screening, but breaks macs >= 0.45 * dense
    scheduler = ScreeningScheduler(warmup=0, constraints=[Constraint.parse("macs >= 0.45 * dense")], dense={"macs": 100.0})
    assert scheduler.on_trial_result(None, trial("too small"), {**screening(0.9, 1.0), "macs": 30.0}) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, trial("allowed"), {**screening(0.8, 2.0), "macs": 50.0}) == TrialScheduler.CONTINUE
    unconstrained = ScreeningScheduler(warmup=0)
    unconstrained.on_trial_result(None, trial("too small"), {**screening(0.9, 1.0), "macs": 30.0})
    assert unconstrained.on_trial_result(None, trial("allowed"), {**screening(0.8, 2.0), "macs": 50.0}) == TrialScheduler.STOP


def test_a_resumed_search_restores_only_the_screening_results_within_the_cost_constraints():
    rows = [{"trial": 1, "fidelity": 0.0, "accuracy": 0.9, "latency_ms": 1.0, "size_mb": 1.0, "macs": 30.0},
            {"trial": 2, "fidelity": 0.0, "accuracy": 0.5, "latency_ms": 2.0, "size_mb": 1.0, "macs": 50.0}]
    kept = recorded_screening(rows, constraints=[Constraint.parse("macs >= 0.45 * dense")], dense={"macs": 100.0})
    assert kept == [(0.5, 2.0, 1.0)]
    assert len(recorded_screening(rows)) == 2
