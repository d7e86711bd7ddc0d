"""Baseline policies: uniform, global magnitude, LAMP and ERK, as points of the search space."""
from __future__ import annotations

import copy

import pytest
import torch

from evaluators import pruning
from evaluators.models import DigitsCNN
from search.baselines import erk_allocation, global_allocation, reference_points
from search.config import ConfigError, validate
from spaces import PrunableGroup, RatioRange, Rule, SearchSpace, SpaceConfig

CHANNELS = ("channel", "structured")  # granularities of conv/linear groups, as discover_groups gives them

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXAMPLE = torch.zeros(1, 1, 8, 8)


def model() -> DigitsCNN:
    torch.manual_seed(0)
    m = DigitsCNN()
    with torch.no_grad():  # give layers different scales, as trained layers have
        for i, conv in enumerate(m.modules()):
            if isinstance(conv, (torch.nn.Conv2d, torch.nn.Linear)):
                conv.weight.mul_(1.0 + 3.0 * (i % 3))
    return m


def space_of(m: torch.nn.Module, granularity: str, **config) -> SearchSpace:
    groups = pruning.discover_groups(m, EXAMPLE, [granularity])
    return SearchSpace(SpaceConfig(granularity=[granularity], **config), groups)


def test_uniform_points_are_clipped_to_each_range_and_use_the_first_criterion():
    groups = [PrunableGroup("a", "conv", 16, granularities=CHANNELS), PrunableGroup("b", "conv", 16, granularities=CHANNELS), PrunableGroup("c", "linear", 8, granularities=CHANNELS)]
    space = SearchSpace(SpaceConfig(criteria=["l2", "l1"], ratio=RatioRange(0.0, 0.6, 0.1),
                                    rules=[Rule(match="b", high=0.3), Rule(match="c", exclude=True)]), groups)
    points = reference_points(space, None, EXAMPLE, ["uniform"], [0.25, 0.5])
    assert [b.name for b in points] == ["uniform 0.25", "uniform 0.5"]
    assert points[0].point["ratio.a"] in (0.2, 0.3) and points[0].point["ratio.b"] in (0.2, 0.3)
    assert points[1].point == {"ratio.a": 0.5, "ratio.b": 0.3, "criterion": "l2"}
    assert space.policy(points[1].point).ratios == {"a": 0.5, "b": 0.3}


def test_global_allocation_removes_the_lowest_scores_within_each_groups_bounds():
    scores = {"a": torch.tensor([0.1, 0.2, 0.3, 5.0]), "b": torch.tensor([0.15, 0.25, 4.0, 6.0]), "c": torch.tensor([9.0, 9.5])}
    sizes = {"a": 5, "b": 5, "c": 3}
    free = {n: (0.0, 0.99) for n in scores}
    # 40% of 13 units = 5: the five lowest scores are a's 0.1, 0.2, 0.3 and b's 0.15, 0.25
    assert global_allocation(scores, sizes, free, 0.4) == {"a": 3 / 5, "b": 2 / 5, "c": 0.0}
    # a may lose at most 1 unit: the rest of the budget goes to the next lowest scores elsewhere
    capped = {**free, "a": (0.0, 0.2)}
    assert global_allocation(scores, sizes, capped, 0.4) == {"a": 1 / 5, "b": 4 / 5, "c": 0.0}
    # c must lose at least a third: that comes first, even though its scores are the highest
    forced = {**free, "c": (1 / 3, 0.99)}
    out = global_allocation(scores, sizes, forced, 0.4)
    assert out["c"] == pytest.approx(1 / 3) and out["a"] * 5 + out["b"] * 5 == 4


def test_global_magnitude_point_prunes_what_one_global_ranking_prunes():
    m = model()
    space = space_of(m, "channel", criteria=["l1"], ratio=RatioRange(0.0, 0.95, None))  # continuous: no snapping
    (baseline,) = reference_points(space, m, EXAMPLE, ["global_magnitude"], [0.5])
    ratios = [v for k, v in baseline.point.items() if k.startswith("ratio.")]
    assert len(set(ratios)) > 1  # the layers' different scales give different ratios
    per_layer = pruning.apply(space.policy(baseline.point), copy.deepcopy(m), EXAMPLE)
    policy = space.policy({k: 0.5 for k in baseline.point})
    ranked = pruning.apply(type(policy)(**{**policy.to_dict(), "global_groups": list(policy.ratios)}), copy.deepcopy(m), EXAMPLE)
    assert {k: v.shape for k, v in per_layer.state_dict().items()} == {k: v.shape for k, v in ranked.state_dict().items()}
    for key, value in per_layer.state_dict().items():
        assert torch.equal(value, ranked.state_dict()[key]), key


def test_unstructured_baselines_meet_the_level_and_differ_in_allocation():
    m = model()
    space = space_of(m, "unstructured", criteria=["l1", "lamp"], ratio=RatioRange(0.0, 0.99, None))
    found = {b.name: b for b in reference_points(space, m, EXAMPLE, ["uniform", "global_magnitude", "lamp", "erk"], [0.6])}
    assert set(found) == {"uniform 0.6", "global_magnitude 0.6", "lamp 0.6", "erk 0.6"}
    assert found["lamp 0.6"].point["criterion"] == "lamp" and found["erk 0.6"].point["criterion"] == "l1"
    sizes = {g.name: g.size for g in space.groups}
    for b in found.values():
        removed = sum(b.point["ratio." + n] * sizes[n] for n in sizes)
        assert removed / sum(sizes.values()) == pytest.approx(0.6, abs=1e-3), b.name
    allocations = [tuple(round(b.point["ratio." + n], 4) for n in sizes) for b in found.values()]
    assert len(set(allocations)) == 4
    # ERK keeps relatively more of the small first conv (9 weights per filter) than of the big ones
    erk = found["erk 0.6"].point
    assert erk["ratio.features.0.weight"] < 0.6 < erk["ratio.features.3.weight"]


def test_erk_respects_bounds_and_total():
    shapes = {"first": (8, 1, 3, 3), "mid": (64, 64, 3, 3), "fc": (10, 256)}
    bounds = {"first": (0.0, 0.2), "mid": (0.0, 0.99), "fc": (0.0, 0.99)}
    ratios = erk_allocation(shapes, bounds, 0.8)
    numel = {"first": 72, "mid": 36864, "fc": 2560}
    assert ratios["first"] <= 0.2 + 1e-9
    assert sum(ratios[n] * numel[n] for n in numel) / sum(numel.values()) == pytest.approx(0.8, abs=1e-6)


def test_points_that_repeat_an_earlier_one_are_dropped():
    groups = [PrunableGroup("a", "conv", 16, granularities=CHANNELS)]
    space = SearchSpace(SpaceConfig(criteria=["l1"], ratio=RatioRange(0.0, 0.5, 0.1)), groups)
    points = reference_points(space, None, EXAMPLE, ["uniform"], [0.5, 0.7, 0.9])  # 0.7 and 0.9 clip to 0.5
    assert [b.name for b in points] == ["uniform 0.5"]


@pytest.mark.parametrize("search, space, message", [
    ({"baselines": ["lamp"]}, {}, "`search.baselines`: 'lamp' allocates single-weight sparsity and needs granularity unstructured"),
    ({"baselines": ["magnitude"]}, {}, "unknown baseline 'magnitude'; valid: uniform, global_magnitude, lamp, erk"),
    ({"baselines": ["global_magnitude"]}, {"granularity": ["nm"]}, "'global_magnitude' does not apply to granularity nm"),
    ({"num_trials": 0, "baselines": []}, {}, "is 0 and there are no baselines"),
])
def test_bad_baselines_are_refused_by_the_config(search, space, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate({"search": search, "space": space})


def test_default_baselines_follow_the_first_granularity():
    assert validate({}).baseline_kinds() == ["uniform", "global_magnitude"]
    assert validate({"space": {"granularity": ["unstructured"], "criteria": ["l1"]}}).baseline_kinds() == ["uniform", "global_magnitude", "lamp", "erk"]
    assert validate({"space": {"granularity": ["nm"], "criteria": ["l1"]}}).baseline_kinds() == ["uniform"]
    assert validate({"search": {"baselines": []}}).baseline_kinds() == []


def test_sensitivity_seeds_and_narrowing_follow_each_groups_drop_curve():
    from search.sensitivity import narrowed, seed_points

    groups = [PrunableGroup("a", "conv", 16, granularities=CHANNELS), PrunableGroup("b", "conv", 16, granularities=CHANNELS), PrunableGroup("c", "conv", 32, granularities=CHANNELS), PrunableGroup("d", "conv", 32, granularities=CHANNELS)]
    space = SearchSpace(SpaceConfig(criteria=["l1", "l2"], ratio=RatioRange(0.0, 0.8, 0.05), rules=[Rule(match="[cd]", tie="cd")]), groups)
    rows = [{"group": g, "ratio": r, "accuracy_drop": d} for g, r, d in [
        ("a", 0.4, 0.01), ("a", 0.8, 0.03),   # robust: 0.02 is reached at 0.6
        ("b", 0.4, 0.10), ("b", 0.8, 0.30),   # fragile: 0.02 is reached at 0.08
        ("c", 0.4, 0.02), ("c", 0.8, 0.02), ("d", 0.4, 0.0), ("d", 0.8, 0.0)]]
    (seed,) = seed_points(space, rows, [0.02])
    assert seed.kind == "seed" and seed.name == "sensitivity drop<=0.02"
    # b's 0.08 snaps to 0.1; the tie cd takes its members' size-weighted mean (0.8 and 0.8)
    assert seed.point == {"ratio.a": 0.6, "ratio.b": 0.1, "ratio.cd": 0.8, "criterion": "l1"}
    smaller, highs = narrowed(space, rows, 0.05)
    assert highs == {"b": 0.2}  # b reaches 0.05 at 0.4 * 0.05 / 0.10 = 0.2 (on the step grid); ties are left alone
    assert [d.range.high for d in smaller.dimensions("channel") if d.group == "b"] == [0.2]
    assert narrowed(space, rows, 0.07)[1] == {"b": 0.25}  # 0.28 rounded down to the step
    assert [d.range.high for d in smaller.dimensions("channel") if d.group == "a"] == [0.8]  # a stays within 0.05
