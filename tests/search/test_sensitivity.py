"""Per-group sensitivity analysis: proxy accuracies, MACs, determinism, safe ratios, table and plot."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from evaluators import measure, pruning
from evaluators import sensitivity
from evaluators.checkpoint import load_dense
from evaluators.sensitivity import COLUMNS, analyse, safe_ratios
from search.sensitivity import plot, to_frame
from evaluators.tasks import Task
from evaluators.train import accuracy, recalibrate_batchnorm
from spaces import Policy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

L1 = Policy(criterion="l1", ratios={})


@pytest.fixture(scope="module")
def dense_path(digits_checkpoint):
    return digits_checkpoint


def _without_time(rows):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


# --------------------------------------------------------------------------- analyse


def test_rows_come_in_the_order_given_skip_zero_and_have_the_columns(digits_task, dense_path):
    rows = analyse(digits_task, dense_path, L1, {"features.3": [0.5, 0.0, 0.25], "classifier.1": np.array([0.5])},
                    samples=100)
    assert [(r["group"], r["ratio"]) for r in rows] == [("features.3", 0.5), ("features.3", 0.25), ("classifier.1", 0.5)]
    assert all(list(r) == list(COLUMNS) for r in rows)
    assert all(r["time_s"] >= 0 for r in rows)
    assert type(rows[-1]["ratio"]) is float


def test_harder_pruning_of_a_group_removes_at_least_as_many_macs(digits_task, dense_path):
    rows = analyse(digits_task, dense_path, L1, {"features.3": [0.25, 0.5, 0.75]}, samples=50, bn_batches=2)
    dense_macs, dense_params = pruning.effective_macs_and_params(load_dense(digits_task, dense_path),
                                                                 digits_task.example())
    macs = [r["macs"] for r in rows]
    params = [r["params"] for r in rows]
    assert dense_macs > macs[0] >= macs[1] >= macs[2]
    assert macs[0] > macs[2]
    assert dense_params > params[0] >= params[1] >= params[2]


def test_proxy_is_accuracy_after_bn_recalibration_of_that_group_alone(digits_task, dense_path):
    samples, bn_batches, batch_size = 150, 3, 32
    rows = analyse(digits_task, dense_path, L1, {"features.7": [0.5], "classifier.1": [0.25]},
                   bn_batches=bn_batches, batch_size=batch_size, samples=samples)
    x_test, y_test = digits_task.eval_data
    subset = (x_test[:samples], y_test[:samples])
    dense = accuracy(load_dense(digits_task, dense_path), subset)
    for row in rows:
        assert row["dense_proxy_accuracy"] == dense
        assert row["accuracy_drop"] == pytest.approx(row["dense_proxy_accuracy"] - row["proxy_accuracy"])
    # by hand: prune only that group, re-estimate BatchNorm, score on the same examples
    by_hand = pruning.apply(Policy(criterion="l1", ratios={"features.7": 0.5}), load_dense(digits_task, dense_path),
                            x_test[:1])
    recalibrate_batchnorm(by_hand, digits_task.train_data[0], batches=bn_batches, batch_size=batch_size)
    assert rows[0]["proxy_accuracy"] == accuracy(by_hand, subset)
    assert rows[0]["params"] == sum(p.numel() for p in by_hand.parameters())
    # with bn_batches=0 the proxy is the pruned model's accuracy as it is, and that differs
    unrecalibrated = pruning.apply(Policy(criterion="l1", ratios={"features.7": 0.5}), load_dense(digits_task, dense_path),
                                   x_test[:1])
    plain = analyse(digits_task, dense_path, L1, {"features.7": [0.5]}, bn_batches=0, samples=samples)
    assert plain[0]["proxy_accuracy"] == accuracy(unrecalibrated, subset) != rows[0]["proxy_accuracy"]


def test_samples_none_scores_the_whole_test_set(digits_task, dense_path):
    rows = analyse(digits_task, dense_path, L1, {"classifier.1": [0.5]}, samples=None, bn_batches=1)
    assert rows[0]["dense_proxy_accuracy"] == accuracy(load_dense(digits_task, dense_path), digits_task.eval_data)


def test_analyse_is_deterministic_and_takes_checkpoint_bytes(digits_task, dense_path):
    template = Policy(criterion="random", ratios={"features.0": 0.9}, seed=3)  # its ratios are ignored
    ratios = {"features.0": [0.5], "features.3": [0.5]}
    a = analyse(digits_task, dense_path, template, ratios, samples=200, bn_batches=2)
    b = analyse(digits_task, dense_path.read_bytes(), template, ratios, samples=200, bn_batches=2)
    assert _without_time(a) == _without_time(b)
    assert [r["group"] for r in a] == ["features.0", "features.3"]


def test_recalibration_is_seeded_by_the_template(digits_task):
    """Dropout is active while BatchNorm statistics are re-estimated: the seed must fix it."""
    def model():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.5), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))

    task = Task(model=model, train_data=digits_task.train_data, eval_data=digits_task.eval_data, num_classes=10, name="dropout")
    torch.manual_seed(0)
    checkpoint = measure.state_dict_bytes(model())
    ratios = {"1": [0.25, 0.5]}
    runs = []
    for seed, noise in ((7, 1), (7, 2), (8, 1)):
        torch.manual_seed(noise)  # whatever the global generator holds beforehand
        runs.append(_without_time(analyse(task, checkpoint, Policy(criterion="l1", ratios={}, seed=seed), ratios,
                                          bn_batches=4, samples=None)))
    assert runs[0] == runs[1]
    assert [r["proxy_accuracy"] for r in runs[0]] != [r["proxy_accuracy"] for r in runs[2]]


def test_unstructured_template_prunes_weights(digits_task, dense_path):
    template = Policy(criterion="l1", ratios={}, granularity="unstructured")
    rows = analyse(digits_task, dense_path, template, {"features.3.weight": [0.5]}, samples=50, bn_batches=1)
    dense_params = sum(p.numel() for p in load_dense(digits_task, dense_path).parameters())
    weights = load_dense(digits_task, dense_path).features[3].weight.numel()
    assert rows[0]["params"] == dense_params - weights // 2


def test_unknown_group_is_refused_by_name_before_any_work(digits_task, dense_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("no checkpoint should be read and nothing pruned before the input is checked")

    monkeypatch.setattr(sensitivity, "load_dense", forbidden)
    monkeypatch.setattr(sensitivity.pruning, "apply", forbidden)
    with pytest.raises(ValueError, match=r"ratios: unknown group 'nope' for granularity 'channel'; valid: features\.0"):
        analyse(digits_task, dense_path, L1, {"features.3": [0.5], "nope": [0.5]})
    # the output layer is no channel group
    with pytest.raises(ValueError, match="unknown group 'classifier.3'"):
        analyse(digits_task, dense_path, L1, {"classifier.3": [0.5]})


@pytest.mark.parametrize("value, shown", [(1.0, "1.0"), (-0.1, "-0.1"), (math.nan, "nan"), ("0.5", "'0.5'"), (True, "True")])
def test_bad_ratio_is_refused_with_field_and_value(digits_task, dense_path, monkeypatch, value, shown):
    monkeypatch.setattr(sensitivity, "load_dense", lambda *a, **k: pytest.fail("checkpoint read before checking"))
    with pytest.raises(ValueError, match=rf"ratios\['features\.3'\]: .*0 <= ratio < 1, but got {shown}"):
        analyse(digits_task, dense_path, L1, {"features.3": [0.25, value]})


@pytest.mark.parametrize("kwargs, field", [({"samples": 0}, "samples"), ({"bn_batches": -1}, "bn_batches"),
                                           ({"batch_size": 0}, "batch_size")])
def test_bad_options_are_refused(digits_task, dense_path, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        analyse(digits_task, dense_path, L1, {"features.3": [0.5]}, **kwargs)


def test_a_scalar_instead_of_a_list_is_refused(digits_task, dense_path):
    with pytest.raises(ValueError, match=r"ratios\['features\.3'\]: must be a list of ratios, but got 0.5"):
        analyse(digits_task, dense_path, L1, {"features.3": 0.5})


# --------------------------------------------------------------------------- safe_ratios


def _rows(group, points):
    return [{"group": group, "ratio": r, "accuracy_drop": d} for r, d in points]


def test_safe_ratio_interpolates_between_the_tested_ratios():
    rows = _rows("a", [(0.25, 0.01), (0.5, 0.03), (0.75, 0.2)])
    assert safe_ratios(rows, 0.02) == {"a": pytest.approx(0.375)}
    assert safe_ratios(rows, 0.03) == {"a": pytest.approx(0.5)}  # exactly at a tested ratio
    assert safe_ratios(rows, 0.115) == {"a": pytest.approx(0.625)}


def test_safe_ratio_uses_the_running_maximum_of_non_monotone_drops():
    # the dip at 0.75 does not make 0.75 safe: the curve is 0.01, 0.05, 0.05
    rows = _rows("a", [(0.75, 0.02), (0.25, 0.01), (0.5, 0.05)])  # unsorted on purpose
    assert safe_ratios(rows, 0.03) == {"a": pytest.approx(0.375)}
    # an early bad ratio caps everything after it
    assert safe_ratios(_rows("b", [(0.25, 0.05), (0.5, 0.02), (0.75, 0.1)]), 0.03) == {"b": pytest.approx(0.15)}
    # a dip before the crossing: interpolate from the running maximum 0.02 at 0.5, not from 0.01
    assert safe_ratios(_rows("c", [(0.25, 0.02), (0.5, 0.01), (0.75, 0.1)]), 0.03) == {"c": pytest.approx(0.53125)}
    # a negative drop (pruned beat dense) counts as 0
    assert safe_ratios(_rows("d", [(0.4, -0.05), (0.8, 0.05)]), 0.02) == {"d": pytest.approx(0.56)}


def test_safe_ratio_when_all_ratios_are_safe_is_the_largest_tested():
    rows = _rows("a", [(0.2, 0.0), (0.6, 0.01), (0.4, -0.01)])
    assert safe_ratios(rows, 0.05) == {"a": 0.6}


def test_safe_ratio_when_none_is_safe_interpolates_from_zero():
    rows = _rows("a", [(0.5, 0.1), (0.8, 0.3)])
    assert safe_ratios(rows, 0.02) == {"a": pytest.approx(0.1)}
    assert safe_ratios(rows, 0.0) == {"a": 0.0}


def test_safe_ratios_keep_groups_apart_ignore_ratio_zero_and_check_input():
    rows = _rows("x", [(0.0, 0.5), (0.5, 0.02)]) + _rows("y", [(0.5, 0.5)])
    assert safe_ratios(rows, 0.02) == {"x": 0.5, "y": pytest.approx(0.02)}
    with pytest.raises(ValueError, match="max_drop: .* but got -0.1"):
        safe_ratios(rows, -0.1)
    with pytest.raises(ValueError, match=r"rows\[1\]: missing key\(s\) \['accuracy_drop'\]"):
        safe_ratios([rows[0], {"group": "x", "ratio": 0.5}], 0.1)


def test_safe_ratios_of_real_rows_lie_within_the_tested_range(digits_task, dense_path):
    rows = analyse(digits_task, dense_path, L1, {"features.0": [0.25, 0.75], "classifier.1": [0.5, 0.9]},
                   samples=100, bn_batches=2)
    safe = safe_ratios(rows, 0.01)
    assert list(safe) == ["features.0", "classifier.1"]
    assert all(0.0 <= v <= 0.9 for v in safe.values())


# --------------------------------------------------------------------------- table and plot


def test_to_frame_has_the_fixed_columns_first():
    rows = [{"time_s": 1.0, "extra": 1, **{c: 0 for c in COLUMNS}}, {"group": "g", "ratio": 0.5}]
    frame = to_frame(rows)
    assert list(frame.columns) == [*COLUMNS, "extra"]
    assert len(frame) == 2 and math.isnan(frame.loc[1, "accuracy_drop"])


@pytest.mark.parametrize("groups", [2, 12])
def test_plot_writes_a_png(tmp_path, groups):
    rows = [{"group": f"layer{g}", "ratio": r, "accuracy_drop": r * g / 10} for g in range(groups) for r in (0.5, 0.25)]
    out = plot(rows, tmp_path / "sub" / "sensitivity.png", title="digits")
    data = out.read_bytes()
    assert out == tmp_path / "sub" / "sensitivity.png"
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_refuses_no_rows(tmp_path):
    with pytest.raises(ValueError, match="rows: nothing to plot"):
        plot([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_module_doctests_pass():
    import doctest

    import search.sensitivity

    result = doctest.testmod(sensitivity)
    assert result.attempted >= 2 and result.failed == 0
    result = doctest.testmod(search.sensitivity)  # to_frame; mac_targets: seed_macs, else the MAC constraints' bounds
    assert result.attempted >= 3 and result.failed == 0


# --------------------------------------------------------------------------- allocation_path


def _path_rows(table):
    return [{"group": g, "ratio": r, "accuracy_drop": d, "latency_ms": t} for g, r, d, t in table]


def test_allocation_path_prunes_where_drop_per_saving_is_least_first():
    # a: 0.02 drop per ms saved; b: 0.002 per ms; c: saves nothing at all
    rows = _path_rows([("a", 0.5, 0.04, 8.0), ("b", 0.5, 0.004, 8.0), ("c", 0.5, 0.0, 10.0)])
    bounds = {"a": (0.0, 0.5), "b": (0.0, 0.5), "c": (0.0, 0.5)}
    path = sensitivity.allocation_path(rows, 10.0, bounds, 0.1)
    assert [max(p, key=lambda g: p[g] - (path[i - 1][g] if i else 0.0)) for i, p in enumerate(path)] == ["b"] * 5 + ["a"] * 5
    assert path[-1] == {"a": 0.5, "b": 0.5, "c": 0.0}  # c never moves: no move of it saves anything
    for before, after in zip(path, path[1:]):  # each move raises one group, never lowers any
        assert sum(after[g] > before[g] for g in bounds) == 1 and all(after[g] >= before[g] for g in bounds)


def test_allocation_path_jumps_past_a_step_that_saves_nothing_and_stops_at_the_last_tested_ratio():
    # a's first half saves nothing (a kernel that wants aligned widths), its second saves 4 ms;
    # b saves steadily but at a higher price than a's jump on average
    rows = _path_rows([("a", 0.25, 0.0, 10.0), ("a", 0.5, 0.02, 6.0), ("b", 0.25, 0.02, 9.0), ("b", 0.5, 0.04, 8.0)])
    path = sensitivity.allocation_path(rows, 10.0, {"a": (0.0, 0.7), "b": (0.0, 0.25)}, 0.05)
    # one move over the flat part, to the first step that saves: 0.005 per ms beats b's 0.02
    assert path[0] == {"a": 0.3, "b": 0.0}
    assert [p["a"] for p in path[:5]] == [0.3, 0.35, 0.4, 0.45, 0.5] and all(p["b"] == 0.0 for p in path[:5])
    assert path[-1] == {"a": 0.5, "b": 0.25}  # a stops at 0.5 (not tested beyond; range to 0.7), b at its high
    assert len(path) == 10


def test_allocation_path_starts_from_each_groups_low_and_honours_the_drop_running_maximum():
    rows = _path_rows([("a", 0.2, 0.05, 9.0), ("a", 0.4, 0.01, 8.0), ("b", 0.4, 0.03, 8.0)])
    path = sensitivity.allocation_path(rows, 10.0, {"a": (0.2, 0.4), "b": (0.0, 0.4), "gone": (0.1, 0.5)}, 0.2)
    # a starts at its low 0.2; its lucky 0.01 at 0.4 counts as 0.05 (the running maximum), so
    # raising it to 0.4 costs no drop and comes first; "gone" has no rows and stays at its low
    assert path == [{"a": 0.4, "b": 0.0, "gone": 0.1}, {"a": 0.4, "b": 0.2, "gone": 0.1}, {"a": 0.4, "b": 0.4, "gone": 0.1}]


def test_allocation_path_checks_its_input():
    with pytest.raises(ValueError, match=r"rows\[0\]: missing key\(s\) \['latency_ms'\]"):
        sensitivity.allocation_path([{"group": "a", "ratio": 0.5, "accuracy_drop": 0.1}], 10.0, {"a": (0, 1)}, 0.1)
    with pytest.raises(ValueError, match="step: must be > 0, but got 0"):
        sensitivity.allocation_path([], 10.0, {}, 0)
    assert sensitivity.allocation_path(_path_rows([("a", 0.5, 0.1, 8.0)]), 10.0, {"a": (0.0, 0.5)}, 0.25, cost="latency_ms")


# --------------------------------------------------------------------------- MAC-target seeds


def test_mac_seeds_are_the_least_pruned_points_of_the_path_within_each_target(digits_task, dense_path):
    from evaluators.trial import prune_model
    from search.sensitivity import allocation_points, mac_seed_points
    from spaces import RatioRange, SearchSpace, SpaceConfig

    groups = pruning.discover_groups(digits_task.build_model().eval(), digits_task.example(), ("channel",))
    space = SearchSpace(SpaceConfig(criteria=["l1"], ratio=RatioRange(0.0, 0.75, 0.05)), groups)
    checkpoint = dense_path.read_bytes()
    rows = analyse(digits_task, checkpoint, L1, {g.name: [0.25, 0.5, 0.75] for g in space.groups}, samples=100, bn_batches=2)
    example = digits_task.example()
    dense_macs = pruning.effective_macs_and_params(load_dense(digits_task, checkpoint), example)[0]

    def counted(point):
        model, _ = prune_model(space.policy(point), digits_task, checkpoint)
        return pruning.effective_macs_and_params(model, example)[0] / dense_macs

    path = allocation_points(space, rows, dense_macs, "macs")
    fractions = [counted(p) for p in path]
    assert all(a >= b for a, b in zip(fractions, fractions[1:]))  # MACs only fall along the path
    lines: list[str] = []
    seeds = mac_seed_points(space, rows, [0.8, 0.5, 0.01], digits_task, checkpoint, lines.append)
    assert [s.name for s in seeds] == ["sensitivity macs<=0.8x dense", "sensitivity macs<=0.5x dense"]
    for seed, target in zip(seeds, (0.8, 0.5)):
        i = path.index(seed.point)
        assert seed.kind == "seed" and fractions[i] <= target  # within the target, counted on the pruned model
        assert i == 0 or fractions[i - 1] > target  # and the least pruned such point
    assert fractions[-1] > 0.01
    assert any(line.startswith("sensitivity: no MAC seed at 0.01x the dense MACs") for line in lines)
    assert any(line.startswith("sensitivity: MAC seeds at") for line in lines)


def test_seeds_that_break_a_mac_or_parameter_constraint_are_left_out_before_any_trial(digits_task, dense_path):
    from search.baselines import Baseline
    from search.constraints import Constraint
    from search.sensitivity import counted_cost, within_counted_constraints
    from spaces import RatioRange, SearchSpace, SpaceConfig

    groups = pruning.discover_groups(digits_task.build_model().eval(), digits_task.example(), ("channel",))
    space = SearchSpace(SpaceConfig(criteria=["l1"], ratio=RatioRange(0.0, 0.75, 0.05)), groups)
    checkpoint = dense_path.read_bytes()
    example = digits_task.example()
    light = Baseline("light", {f"ratio.{g.name}": 0.05 for g in space.groups}, kind="seed")
    heavy = Baseline("heavy", {f"ratio.{g.name}": 0.75 for g in space.groups}, kind="seed")
    dense_macs, dense_params = pruning.effective_macs_and_params(load_dense(digits_task, checkpoint), example)
    dense = {"macs": dense_macs, "params": dense_params}
    light_macs, _ = counted_cost(space, light.point, digits_task, checkpoint, example)
    heavy_macs, heavy_params = counted_cost(space, heavy.point, digits_task, checkpoint, example)
    between = (heavy_macs + light_macs) / 2 / dense_macs  # a MAC budget the heavy seed meets and the light one breaks
    assert heavy_macs / dense_macs < between < light_macs / dense_macs
    lines: list[str] = []
    kept = within_counted_constraints([light, heavy], space, digits_task, checkpoint,
                                      [Constraint.parse(f"macs <= {between} * dense"), Constraint.parse("accuracy_drop <= 0.01")], dense, lines.append)
    assert kept == [heavy]
    assert len(lines) == 1 and lines[0].startswith(f"sensitivity: seed 'light' left out: its pruned model breaks macs <= {between:g} * dense")
    # an absolute bound on parameters, and a floor: the heavy seed keeps too few
    kept = within_counted_constraints([light, heavy], space, digits_task, checkpoint,
                                      [Constraint.parse(f"params >= {heavy_params + 1}")], dense, lambda line: None)
    assert kept == [light]
    # constraints on what only a trial measures leave every seed in
    assert within_counted_constraints([light, heavy], space, digits_task, checkpoint,
                                      [Constraint.parse("latency_ms <= 0.5 * dense")], dense, lines.append) == [light, heavy]
