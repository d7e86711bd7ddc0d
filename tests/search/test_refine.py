"""``search.refine.share``: the refinement's part of the time budget, and the epochs that fill it."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pandas as pd
import pytest

from search.config import ConfigError, validate
from search.driver import _refine_plan, _Session
from search.objectives import DEFAULT
from search.refine import CANDIDATES_TAG, EPOCHS_TAG, epochs_that_fit, makespan, rungs_makespan, survivors

# three fine-tuned trials (0.5 epochs of fine-tuning in 10 s: 20 s an epoch) and one screened out
ROWS = [{"run_id": f"r{i}", "accuracy": 0.9 - 0.1 * i, "latency_ms": 1.0 + i, "size_mb": 1.0 + i, "fidelity": 1.0,
         "time_prune_s": 1.0, "time_finetune_s": 10.0, "time_measure_s": 2.0} for i in range(3)]
ROWS.append({"run_id": "r3", "accuracy": 0.5, "latency_ms": 0.5, "size_mb": 0.5, "fidelity": 0.0,
             "time_prune_s": 1.0, "time_finetune_s": 0.0, "time_measure_s": 2.0})


def config(**refine):
    return validate({"finetune": {"epochs": 0.5}, "measure": {"warmup": 1, "repeats": 2},
                     "search": {"time_budget_s": 200, "max_concurrent": 2, "refine": {"epochs": 0.5, "candidates": 2, **refine}}})


def session(cfg, left: float | None):
    task = SimpleNamespace(train_source=SimpleNamespace(batches_per_epoch=lambda batch_size: 100))
    return SimpleNamespace(config=cfg, objectives=DEFAULT, seconds_left=lambda: left, prepared=SimpleNamespace(task=task))


def test_epochs_that_fit_grow_with_the_time_and_never_go_below_the_least():
    costs = [(3.0, 20.0)] * 4
    fits = [epochs_that_fit(s, costs, concurrency=2, least=0.5) for s in (0, 10, 60, 120, 400)]
    assert fits == sorted(fits) and fits[0] == 0.5 and fits[-1] > 9
    # two rounds of two: each candidate gets half the time, less its prune and timing
    assert epochs_that_fit(120, costs, concurrency=2, least=0.5) == pytest.approx((120 / 2 - 3) / 20, abs=0.1)
    assert epochs_that_fit(120, costs, concurrency=4, least=0.5) == pytest.approx((120 - 3) / 20, abs=0.1)


def test_the_slowest_candidate_bounds_the_epochs():
    # a candidate that fine-tunes 3x slower (a less pruned model) gets a slot to itself and sets the pace
    fast, slow = (3.0, 20.0), (3.0, 60.0)
    both = epochs_that_fit(120, [fast, fast, fast, slow], concurrency=2, least=0.1)
    assert both < epochs_that_fit(120, [fast] * 4, concurrency=2, least=0.1)
    assert makespan([fast, fast, fast, slow], both, 2) <= 120 < makespan([fast, fast, fast, slow], both + 0.1, 2)


def test_without_share_the_refinement_has_its_fixed_epochs():
    cfg = config()
    assert _refine_plan(session(cfg, 100.0), ROWS, pd.DataFrame(ROWS[:2]), {}) == (0.5, 2)
    assert _refine_plan(session(cfg, None), ROWS, pd.DataFrame(ROWS[:2]), {}) == (0.5, 2)  # no time budget


def epochs_of(*args) -> float:
    epochs, count = _refine_plan(*args)
    assert count == 2
    return epochs


def test_with_share_the_epochs_fill_the_time_left_after_the_retiming():
    cfg = config(share=0.4)
    short = epochs_of(session(cfg, 60.0), ROWS, pd.DataFrame(ROWS[:2]), {})
    long = epochs_of(session(cfg, 120.0), ROWS, pd.DataFrame(ROWS[:2]), {})
    # each candidate's own trial: 3 s to prune and time, 20 s an epoch; one round of the 2 candidates,
    # in 0.9 of the time left after the re-timing
    assert 0.5 < short < long <= 0.9 * (120 - 3) / 20
    assert long - short == pytest.approx(0.9 * 60 / 20, abs=0.15)
    # a candidate whose trial fine-tuned 3x slower sets the pace
    slow = pd.DataFrame([ROWS[0], {**ROWS[1], "time_finetune_s": 30.0}])
    assert epochs_of(session(cfg, 120.0), ROWS, slow, {}) == pytest.approx(long / 3, abs=0.15)


def test_a_resumed_refinement_keeps_the_epochs_chosen_first():
    cfg = config(share=0.4)
    tags = {CANDIDATES_TAG: "r0,r1", EPOCHS_TAG: "3.7"}
    assert _refine_plan(session(cfg, 5.0), ROWS, pd.DataFrame(ROWS[:2]), tags) == (3.7, 2)


@pytest.mark.parametrize("share", [None, 0.4])
def test_the_time_budget_wins_over_refine_epochs_fewer_candidates_or_none(share):
    # refine.epochs 2: 43 s for one candidate (3 s, then 20 s an epoch), two run side by side, and the
    # third after them; the candidates that do not fit in 0.9 of the time left are not refined
    cfg = config(epochs=2.0, candidates=3, share=share)
    front = pd.DataFrame(ROWS[:3])
    assert _refine_plan(session(cfg, 200.0), ROWS, front, {})[1] == 3
    epochs, count = _refine_plan(session(cfg, 80.0), ROWS, front, {})  # 86 s for three, 43 s for two
    assert count == 2 and (epochs == 2.0 if share is None else epochs > 2.0)  # with share, the two get the time
    assert _refine_plan(session(cfg, 30.0), ROWS, front, {}) == (2.0, 0)   # not one fits: no refinement


def test_the_trials_leave_the_share_of_the_budget_to_the_end():
    rows = ROWS[:3]
    plain = _Session.end_s(SimpleNamespace(config=config(), objectives=DEFAULT), rows)
    shared = _Session.end_s(SimpleNamespace(config=config(share=0.4), objectives=DEFAULT), rows)
    assert plain < 0.4 * 200 < shared
    # a share smaller than what refine.epochs needs leaves what epochs needs
    tiny = _Session.end_s(SimpleNamespace(config=config(share=0.01, epochs=5.0), objectives=DEFAULT), rows)
    assert tiny == _Session.end_s(SimpleNamespace(config=config(epochs=5.0), objectives=DEFAULT), rows) > 0.01 * 200


# search.refine.rungs: successive halving

def test_each_rung_of_successive_halving_has_the_compute_of_the_last():
    plan = config(epochs=2.0, candidates=2, rungs=3, reduction_factor=2).search.refine.plan(2.0, 2)
    assert plan == [(8, 0.5), (4, 1.0), (2, 2.0)]
    assert {n * e for n, e in plan} == {4.0}
    assert config(rungs=2, reduction_factor=3).search.refine.plan(0.6, 1) == [(3, 0.2), (1, 0.6)]  # epochs a metric can show
    assert config().search.refine.plan(0.5, 2) == [(2, 0.5)]  # one rung: the plain refinement


@pytest.mark.parametrize("field, value", [("rungs", 0), ("rungs", 7), ("rungs", 1.5), ("reduction_factor", 1)])
def test_bad_rungs_or_reduction_factor_name_the_field_and_what_is_valid(field, value):
    with pytest.raises(ConfigError) as caught:
        config(**{field: value})
    assert str(caught.value).startswith(f"`search.refine.{field}`: ")
    assert f"got {value!r}" in str(caught.value)


def test_a_rung_keeps_the_non_dominated_first_and_spreads_the_rest_of_a_front_over_its_latencies():
    senses = {"accuracy": "max", "latency_ms": "min"}
    rows = pd.DataFrame({"run_id": list("abcdef"), "accuracy": [0.9, 0.8, 0.7, 0.6, 0.5, 0.85],
                         "latency_ms": [5.0, 4.0, 3.0, 2.0, 1.0, 6.0]})  # f is dominated by a
    assert survivors(rows, 5, senses) == ["a", "b", "c", "d", "e"]
    assert survivors(rows, 6, senses)[-1] == "f"  # the second front after the first
    assert survivors(rows, 3, senses) == ["e", "c", "a"]  # of one front of five, three spread over it
    # the rung's own scores decide: a policy that lost most in the longer fine-tune goes first
    assert "b" not in survivors(rows.assign(accuracy=[0.9, 0.6, 0.7, 0.6, 0.5, 0.85]), 4, senses)


def test_with_rungs_the_epochs_that_fit_are_the_last_rungs_and_all_rungs_fit():
    settings = config(rungs=2).search.refine
    costs = [(3.0, 20.0)] * 4  # 4 policies in the first rung, 2 in the last, 2 side by side
    epochs = epochs_that_fit(120, costs, concurrency=2, least=0.1, settings=settings)
    assert rungs_makespan(costs, settings.plan(epochs, 2), 2) <= 120 < rungs_makespan(costs, settings.plan(epochs + 0.1, 2), 2)
    # the first rung: two rounds of two at half the epochs; the last: one round at the epochs
    assert epochs == pytest.approx((120 - 3 * 3) / (2 * 20), abs=0.1)


def test_a_plan_with_rungs_counts_every_rung_against_the_time_left():
    front = pd.DataFrame(ROWS[:3])
    plain, halving = config(epochs=2.0, candidates=2), config(epochs=2.0, candidates=1, rungs=2)
    # one rung: 2 candidates side by side, 43 s; two rungs: 2 at 1 epoch (23 s), then 1 at 2 epochs (43 s)
    assert _refine_plan(session(plain, 60.0), ROWS, front, {})[1] == 2
    assert _refine_plan(session(halving, 60.0), ROWS, front, {}) == (2.0, 0)
    assert _refine_plan(session(halving, 90.0), ROWS, front, {}) == (2.0, 1)
    # a resume: the tag holds the first rung's candidates, the plan counts the last rung's
    assert _refine_plan(session(halving, 5.0), ROWS, front, {CANDIDATES_TAG: "r0,r1", EPOCHS_TAG: "2"}) == (2.0, 1)
    assert _Session.end_s(SimpleNamespace(config=halving, objectives=DEFAULT), ROWS) > _Session.end_s(
        SimpleNamespace(config=config(epochs=2.0, candidates=1), objectives=DEFAULT), ROWS)


# The first rung's picks, one at a time: a fake Ray that runs each fine-tune when it is started and
# hands results back in the order they were started, and a fake tracker that keeps what is recorded.
class _Future:
    def __init__(self, value, slow=False):
        self.value, self.slow = value, slow


class _Ray:
    def __init__(self, slow=()):
        self.slow, self.cancelled = set(slow), []  # "slow" fine-tunes never end before a deadline

    def remote(self, **resources):
        return lambda fn: SimpleNamespace(remote=lambda policy, *args: _Future(fn(policy, *args), slow=policy in self.slow))

    def put(self, value):
        return value

    def wait(self, futures, num_returns, timeout=None):
        ready = [f for f in futures if not f.slow] if timeout is not None else futures
        return ready[:num_returns], [f for f in futures if f not in ready[:num_returns]]

    def cancel(self, future, force):
        assert force  # a fine-tune is stopped by killing its worker
        self.cancelled.append(future)

    def get(self, future):
        return future.value


class _Tracker:
    def __init__(self):
        self.tags, self.metrics, self.started = [], {}, []

    def set_tags(self, tags):
        self.tags.append(dict(tags))

    def policies(self, run_ids):
        self.started += run_ids
        return {r: r for r in run_ids}  # the fake fine-tune below takes the run id for the policy

    def update_metrics(self, run_id, metrics, step):
        self.metrics[run_id] = dict(metrics)

    def set_tags_on(self, run_ids, tags):
        self.refined = list(run_ids)


# five fine-tuned policies on the search's frontier; "b" (0.64 in the search, faster) and "c" (0.63,
# slower) are the seed-3 case of the 5-seed benchmark: refined, both gain about 6 points, but a plain
# refinement that measured "c" and not "b" ranked "b" by its estimate, pushed "c" off the frontier,
# and reported no measured accuracy there.
FRONT = pd.DataFrame({"run_id": list("abcde"), "accuracy": [0.30, 0.64, 0.635, 0.74, 0.78],
                      "latency_ms": [1.0, 2.0, 2.1, 3.0, 4.0], "fidelity": 1.0})
AFTER = {"a": 0.50, "b": 0.705, "c": 0.701, "d": 0.77, "e": 0.79}  # each policy's accuracy after the refinement


def refine(monkeypatch, count, concurrency=1, chosen=(), seconds=None, costs=None, table=FRONT, slow=(), deadline=None, rungs=1,
           fine_tune=None):
    import search.refine as refine_module

    monkeypatch.setattr(refine_module, "ray", fake := _Ray(slow))
    monkeypatch.setattr(refine_module, "_refine_one", fine_tune or (lambda policy, *rest: {"accuracy": AFTER[policy], "time_refine_s": 1.0}))
    tracker, lines = _Tracker(), []
    from search.refine import RefineSettings, refine_frontier

    tracker.ray = fake
    done = refine_frontier(tracker, table, RefineSettings(epochs=1.0, candidates=count, rungs=rungs), task=None, checkpoint=b"",
                           finetune=config().finetune, measure=None, dense={"accuracy": 0.8}, resources={"cpu": 1, "gpu": 0},
                           out=lines.append, senses={"accuracy": "max", "latency_ms": "min"}, chosen=list(chosen),
                           concurrency=concurrency, seconds=seconds, costs=costs, deadline=deadline)
    return done, tracker, lines


def test_next_in_line_measures_an_estimate_that_pushed_a_measured_policy_off_the_frontier():
    from search.refine import next_in_line

    # "a", "c" and "e" refined; "b" is ranked by the gain their pairs predict and now dominates "c"
    table = FRONT.assign(accuracy=[AFTER[r] if r in "ace" else a for r, a in zip(FRONT["run_id"], FRONT["accuracy"])],
                         accuracy_in_search=[a if r in "ace" else None for r, a in zip(FRONT["run_id"], FRONT["accuracy"])],
                         refine_epochs=[1.0 if r in "ace" else None for r in FRONT["run_id"]])
    line = next_in_line(table, {"a", "c", "e"}, {"accuracy": "max", "latency_ms": "min"})
    assert line[0] == "b"  # its stretch of the frontier holds no measured policy: "c" fell off it
    assert next_in_line(table, {"a", "b", "c", "e"}, {"accuracy": "max", "latency_ms": "min"}) == ["d"]


def test_the_refinement_chooses_each_next_policy_on_the_frontier_as_ranked_with_the_results_so_far(monkeypatch):
    from search.frontier import feasible_frontier

    done, tracker, lines = refine(monkeypatch, count=4)
    # the ends first, then the widest unmeasured stretch of the frontier as ranked after each result
    assert done == ["a", "e", "b", "d"] and tracker.started == done
    assert [t["secateurs.refine_candidates"] for t in tracker.tags] == ["a", "a,e", "a,e,b", "a,e,b,d"]
    assert all(t["secateurs.refine_count"] == "4" and t["secateurs.refine_epochs"] == "1" for t in tracker.tags)
    assert {r: m["accuracy"] for r, m in tracker.metrics.items()} == {r: AFTER[r] for r in done}
    assert tracker.metrics["b"]["accuracy_in_search"] == 0.64 and tracker.metrics["b"]["refine_epochs"] == 1.0
    assert lines[0].startswith("refining up to 4 frontier policies: 1 epochs")
    # what the user is shown: every policy on the frontier, ranked at the refinement's fidelity, was
    # measured there; "c", never refined, is ranked by its estimate (0.702) below the measured "b"
    after = pd.DataFrame([{**row, **tracker.metrics.get(row["run_id"], {})} for row in FRONT.to_dict("records")])
    on_front = after[feasible_frontier(after, {"accuracy": "max", "latency_ms": "min"})]
    assert sorted(on_front["run_id"]) == sorted(done) and on_front["refine_epochs"].notna().all()


def test_the_refinement_stops_when_the_frontier_is_measured_and_starts_only_what_fits(monkeypatch):
    small = FRONT[FRONT["run_id"].isin(["a", "e"])]
    done, _, lines = refine(monkeypatch, count=4, table=small)
    assert done == ["a", "e"] and any(line.startswith("  2 refined: the frontier as ranked has no other policy") for line in lines)
    # 10 s for the first rung; "a" and "e" fine-tune in 4 s and 12 s (fixed + an epoch): "e" never starts
    costs = {r: (1.0, 3.0 if r != "e" else 11.0) for r in "abcde"}
    done, _, lines = refine(monkeypatch, count=3, concurrency=2, seconds=10.0, costs=costs)
    assert "e" not in done and len(done) == 3


def test_each_next_start_is_judged_on_the_pace_the_fine_tunes_so_far_kept(monkeypatch):
    # The 1x search of the benchmark (seed 0, 2026-12-02) planned 3 refinements in 70.6 s; the first took
    # 15% longer than its trial had said, the third then no longer fit as planned, and a slot stood idle
    # for 36 s. Each fine-tune here is planned at 0.1 s and takes 0.4 s: after two, a third would end
    # at 1.2 s of the 1.0 s window, though its plan alone (0.8 + 0.1 s) fits.
    def slow(policy, *rest):
        time.sleep(0.4)
        return {"accuracy": AFTER[policy], "time_refine_s": 0.4}

    costs = {r: (0.0, 0.1) for r in "abcde"}
    done, _, lines = refine(monkeypatch, count=4, concurrency=1, seconds=1.0, costs=costs, fine_tune=slow)
    assert len(done) == 2, (done, lines)
    assert any(line.startswith("  2 refined: the frontier as ranked has no other policy to measure that fits") for line in lines)


def test_a_resumed_refinement_finishes_the_earlier_picks_first_and_goes_on_to_the_count(monkeypatch):
    # an earlier session picked "a" and "e", and recorded "a" before it was killed
    table = FRONT.assign(accuracy=[0.50, 0.64, 0.635, 0.74, 0.78], accuracy_in_search=[0.30, None, None, None, None],
                         refine_epochs=[1.0, None, None, None, None], accuracy_rung0=[0.50, None, None, None, None])
    done, tracker, _ = refine(monkeypatch, count=3, chosen=["a", "e"], table=table)
    assert tracker.started == ["e", "b"] and done == ["a", "e", "b"]  # "a" is not fine-tuned again


def test_a_fine_tune_still_running_at_the_time_budget_is_stopped_and_keeps_the_search_values(monkeypatch):
    # "e" fine-tunes past the point where the re-timing must start (a machine slower than planned):
    # it is stopped (its worker killed), recorded nowhere and not tagged refined; the others are kept
    done, tracker, lines = refine(monkeypatch, count=3, concurrency=2, slow={"e"}, deadline=time.perf_counter() + 60)
    assert done == ["a", "b"] and tracker.refined == done and set(tracker.metrics) == {"a", "b"}
    assert len(tracker.ray.cancelled) == 1 and tracker.ray.cancelled[0].slow
    assert any(line.startswith("  e: stopped at the time budget before its 1 epochs ended; it keeps the search's accuracy")
               for line in lines), lines
    assert not any("no other policy to measure" in line for line in lines)
    # past the deadline nothing more starts, a resumed pick included
    done, tracker, lines = refine(monkeypatch, count=3, chosen=["a", "e"], deadline=time.perf_counter() - 1)
    assert done == [] and tracker.started == [] and tracker.metrics == {}
    # successive halving: a stop ends the rungs; what the first rung measured is kept
    done, tracker, lines = refine(monkeypatch, count=1, concurrency=2, rungs=2, slow={"e"}, deadline=time.perf_counter() + 60)
    assert done == ["a"] and any(line == "  not going on to rung 1: the time budget is spent" for line in lines), lines


def test_a_resumed_halving_keeps_the_policy_an_earlier_session_refined_at_a_rung_and_refines_no_other(monkeypatch):
    # an earlier session measured "b" and "d" at the first rung (0.5 epochs), kept "b" and refined it at
    # the second (1 epoch), then was killed while re-timing the frontier: "d" was re-timed faster and
    # now dominates "b" on the first rung's results. The choice made stands; nothing is refined again.
    table = FRONT.assign(latency_ms=[1.0, 2.0, 2.1, 1.5, 4.0], accuracy=[0.30, 0.70, 0.635, 0.76, 0.78],
                         accuracy_in_search=[None, 0.64, None, 0.74, None], refine_epochs=[None, 1.0, None, 0.5, None],
                         accuracy_rung0=[None, 0.66, None, 0.76, None], accuracy_rung1=[None, 0.70, None, None, None])
    done, tracker, lines = refine(monkeypatch, count=1, chosen=["b", "d"], table=table, rungs=2)
    assert tracker.started == [] and tracker.metrics == {}, (tracker.started, lines)
    assert done == ["b", "d"] and "  rung 1: kept 1 of 2 on accuracy, latency_ms after 0.5 epochs" in lines
    # without the earlier session's second rung, the choice is made now, on the results as they are
    fresh = table.assign(accuracy=[0.30, 0.66, 0.635, 0.76, 0.78], refine_epochs=[None, 0.5, None, 0.5, None],
                         accuracy_rung1=None)
    done, tracker, lines = refine(monkeypatch, count=1, chosen=["b", "d"], table=fresh, rungs=2)
    assert tracker.started == ["d"] and set(tracker.metrics) == {"d"}
