"""Unit tests for spaces/: policies, ratio ranges, rules and the resolved search space."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spaces import Policy, PrunableGroup, RatioRange, Rule, SearchSpace, SpaceConfig, SpaceError
from spaces.space import RATIO_PREFIX

CHANNELS = ("channel", "structured")  # granularities of conv/linear groups, as discover_groups gives them
HEADS = ("structured",)  # granularities of attention-head and recurrent groups

optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO_ROOT = Path(__file__).resolve().parents[2]

GROUPS = [
    PrunableGroup("features.0", "conv", 32, granularities=CHANNELS),
    PrunableGroup("features.3", "conv", 64, granularities=CHANNELS),
    PrunableGroup("features.7", "conv", 64, granularities=CHANNELS),
    PrunableGroup("classifier.1", "linear", 128, granularities=CHANNELS),
]


def _ask(space: SearchSpace, study: optuna.Study) -> tuple[dict, dict]:
    trial = study.ask()
    constants = space(trial)
    return dict(trial.params), constants


def _study(seed: int = 0) -> optuna.Study:
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))


# --------------------------------------------------------------------------- Policy


def test_policy_json_round_trip_keeps_every_field():
    p = Policy(criterion="l2", ratios={"b": 0.5, "a": 0.125}, round_to=8, min_channels=4, seed=7, group_min_channels={"b": 6})
    text = p.to_json()
    data = json.loads(text)
    assert data == {
        "criterion": "l2",
        "ratios": {"a": 0.125, "b": 0.5},
        "granularity": "channel",
        "round_to": 8,
        "group_min_channels": {"b": 6},
        "min_channels": 4,
        "seed": 7,
        "global_groups": [],
        "nm_block": 4,
        "finetune": {},
        "drop_blocks": [],
        "quantization": "none",
        "gqa": "kv_groups",
    }
    back = Policy.from_json(text)
    assert back == p
    assert back.to_json() == text


def test_policy_normalises_ratios_to_sorted_float_dict():
    p = Policy(criterion="l1", ratios={"z": 0, "a": 0.5})
    assert list(p.ratios) == ["a", "z"]
    assert all(type(v) is float for v in p.ratios.values())


@settings(max_examples=60, deadline=None)
@given(
    ratios=st.dictionaries(
        st.text(min_size=1, max_size=12),
        st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False),
        max_size=8,
    ),
    criterion=st.sampled_from(["l1", "l2", "random"]),
    round_to=st.integers(1, 16),
    min_channels=st.integers(1, 16),
    seed=st.integers(0, 2**31 - 1),
)
def test_policy_json_round_trip_property(ratios, criterion, round_to, min_channels, seed):
    p = Policy(criterion=criterion, ratios=ratios, round_to=round_to, min_channels=min_channels, seed=seed)
    back = Policy.from_json(p.to_json())
    assert back == p
    assert back.ratios == {k: float(v) for k, v in ratios.items()}
    assert Policy.from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    "ratio, shown",
    [(1.0, "1.0"), (-0.1, "-0.1"), (float("nan"), "nan"), (float("inf"), "inf"), (1.5, "1.5")],
)
def test_policy_rejects_out_of_range_ratio_naming_value_and_group(ratio, shown):
    with pytest.raises(ValueError) as info:
        Policy(criterion="l1", ratios={"features.0": ratio})
    assert shown in str(info.value)
    assert "features.0" in str(info.value)


def test_policy_rejects_non_numeric_ratio():
    with pytest.raises(ValueError, match="'half'"):
        Policy(criterion="l1", ratios={"g": "half"})


def test_policy_rejects_unknown_granularity_naming_it():
    with pytest.raises(ValueError, match="'filter'") as info:
        Policy(criterion="l1", ratios={}, granularity="filter")
    assert "channel" in str(info.value)  # lists the valid ones


@pytest.mark.parametrize(
    "kwargs, field, shown",
    [
        ({"criterion": ""}, "criterion", "''"),
        ({"round_to": 0}, "round_to", "0"),
        ({"min_channels": 0}, "min_channels", "0"),
    ],
)
def test_policy_rejects_bad_scalars(kwargs, field, shown):
    base = {"criterion": "l1", "ratios": {}}
    with pytest.raises(ValueError) as info:
        Policy(**{**base, **kwargs})
    assert field in str(info.value)
    assert shown in str(info.value)


def test_policy_from_dict_rejects_unknown_field_naming_it():
    data = Policy(criterion="l1", ratios={"a": 0.5}).to_dict()
    data["bogus_field"] = 3
    with pytest.raises(ValueError, match="bogus_field") as info:
        Policy.from_dict(data)
    assert "ratios" in str(info.value)  # lists the valid fields


def test_policy_from_json_validates_ratios():
    text = json.dumps({"criterion": "l1", "ratios": {"a": 1.0}})
    with pytest.raises(ValueError, match="1.0"):
        Policy.from_json(text)


# --------------------------------------------------------------------------- PrunableGroup


def test_prunable_group_defaults_modules_and_validates():
    g = PrunableGroup("conv1", "conv", 16, granularities=CHANNELS)
    assert g.modules == ("conv1",)
    assert PrunableGroup.from_dict(g.to_dict()) == g
    # which kinds exist is evaluators' business (tests/evaluators: check_space refuses unknown kinds)
    assert PrunableGroup("x", "a-kind-registered-later", 4, granularities=HEADS).kind == "a-kind-registered-later"
    with pytest.raises(ValueError, match="granularities"):  # no kind implies them here: a group says what prunes it
        PrunableGroup("x", "conv", 4)
    with pytest.raises(ValueError, match="kind"):
        PrunableGroup("x", "", 4, granularities=CHANNELS)
    with pytest.raises(ValueError, match="0"):
        PrunableGroup("x", "conv", 0, granularities=CHANNELS)
    with pytest.raises(ValueError):
        PrunableGroup("", "conv", 4, granularities=CHANNELS)


# --------------------------------------------------------------------------- RatioRange / Rule / SpaceConfig


def test_ratio_range_accepts_valid_ranges():
    assert RatioRange(0.1, 0.7, 0.2).high == 0.7  # 0.6 / 0.2 is not exactly 3 in floats
    assert RatioRange(0.0, 0.8, 0.05).step == 0.05
    assert RatioRange(0.2, 0.6, None).step is None
    assert RatioRange(0.3, 0.3, 0.1).low == 0.3


def test_ratio_range_rejects_low_above_high():
    with pytest.raises(ValueError, match="low <= high") as info:
        RatioRange(low=0.6, high=0.2)
    assert "0.6" in str(info.value) and "0.2" in str(info.value)


def test_ratio_range_rejects_step_not_dividing_range():
    with pytest.raises(ValueError, match="multiple of step") as info:
        RatioRange(low=0.0, high=0.5, step=0.2)
    assert "0.2" in str(info.value)


@pytest.mark.parametrize("kwargs", [{"step": 0.0}, {"step": 1.0}, {"step": -0.1}, {"low": -0.1}, {"high": 1.0}])
def test_ratio_range_rejects_out_of_range_values(kwargs):
    with pytest.raises(ValueError):
        RatioRange(**{"low": 0.0, "high": 0.5, "step": 0.1, **kwargs})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"exclude": True, "ratio": 0.5},
        {"ratio": 0.5, "high": 0.3},
        {"exclude": True, "low": 0.1},
        {},
    ],
)
def test_rule_needs_exactly_one_effect(kwargs):
    with pytest.raises(ValueError, match="exactly one of") as info:
        Rule(match="features.*", **kwargs)
    assert "features.*" in str(info.value)


def test_rule_rejects_empty_match_and_bad_ratio():
    with pytest.raises(ValueError, match="match"):
        Rule(match="", exclude=True)
    with pytest.raises(ValueError, match="1.0"):
        Rule(match="a", ratio=1.0)


def test_rule_matches_glob_case_sensitively():
    rule = Rule(match="features.*", exclude=True)
    assert rule.matches("features.0")
    assert not rule.matches("classifier.1")
    assert not rule.matches("Features.0")


def test_space_config_validation():
    with pytest.raises(ValueError, match="criteria"):
        SpaceConfig(criteria=[])
    with pytest.raises(ValueError, match="granularity"):
        SpaceConfig(granularity=[])
    with pytest.raises(ValueError, match="'block'"):
        SpaceConfig(granularity=["block"])
    with pytest.raises(ValueError, match="round_to"):
        SpaceConfig(round_to=0)
    with pytest.raises(ValueError, match="min_channels"):
        SpaceConfig(min_channels=0)


# --------------------------------------------------------------------------- SearchSpace: rules


def _dims(space: SearchSpace) -> dict[str, dict]:
    return {row["group"]: row for row in space.describe()}


def test_rules_exclude_fix_and_narrow():
    config = SpaceConfig(
        ratio=RatioRange(0.0, 0.8, 0.1),
        rules=[
            Rule(match="features.*", exclude=True),
            Rule(match="features.3", ratio=0.25),
            Rule(match="features.7", high=0.3),
        ],
    )
    space = SearchSpace(config, GROUPS)
    assert space.searched_groups == ["features.7", "classifier.1"]
    rows = _dims(space)
    assert rows["features.0"]["ratio"] == "excluded"
    assert rows["features.3"]["ratio"] == "fixed 0.25"
    assert rows["features.7"]["ratio"] == "0..0.3 step 0.1"
    assert rows["classifier.1"]["ratio"] == "0..0.8 step 0.1"
    assert [r["size"] for r in space.describe()] == [g.size for g in GROUPS]

    policy = space.policy({RATIO_PREFIX + "features.7": 0.2, RATIO_PREFIX + "classifier.1": 0.5, "criterion": "l2"})
    assert policy.ratios == {"features.3": 0.25, "features.7": 0.2, "classifier.1": 0.5}
    assert policy.criterion == "l2"


def test_rules_apply_in_order_later_overrides_earlier():
    fixed_then_excluded = SearchSpace(
        SpaceConfig(rules=[Rule(match="features.3", ratio=0.25), Rule(match="features.*", exclude=True)]), GROUPS
    )
    assert _dims(fixed_then_excluded)["features.3"]["ratio"] == "excluded"

    excluded_then_fixed = SearchSpace(
        SpaceConfig(rules=[Rule(match="features.*", exclude=True), Rule(match="features.3", ratio=0.25)]), GROUPS
    )
    assert _dims(excluded_then_fixed)["features.3"]["ratio"] == "fixed 0.25"

    # a narrowing rule after an exclusion makes the group searched again
    excluded_then_narrowed = SearchSpace(
        SpaceConfig(rules=[Rule(match="features.0", exclude=True), Rule(match="features.0", high=0.4)]), GROUPS
    )
    assert "features.0" in excluded_then_narrowed.searched_groups


def test_successive_narrowing_composes():
    config = SpaceConfig(
        ratio=RatioRange(0.0, 0.8, 0.1),
        rules=[Rule(match="*", low=0.2), Rule(match="features.0", high=0.5)],
    )
    rows = _dims(SearchSpace(config, GROUPS))
    assert rows["features.0"]["ratio"] == "0.2..0.5 step 0.1"
    assert rows["features.3"]["ratio"] == "0.2..0.8 step 0.1"


def test_rule_matching_no_group_raises_listing_groups():
    config = SpaceConfig(rules=[Rule(match="features.*", exclude=True), Rule(match="head.*", exclude=True)])
    with pytest.raises(SpaceError) as info:
        SearchSpace(config, GROUPS)
    message = str(info.value)
    assert "rules[1]" in message and "'head.*'" in message
    for g in GROUPS:
        assert g.name in message


def test_narrowing_to_an_invalid_range_raises_space_error():
    config = SpaceConfig(ratio=RatioRange(0.0, 0.8, 0.1), rules=[Rule(match="features.0", low=0.9)])
    with pytest.raises(SpaceError, match="features.0"):
        SearchSpace(config, GROUPS)


def test_space_without_groups_raises():
    with pytest.raises(SpaceError, match="no prunable groups"):
        SearchSpace(SpaceConfig(), [])


# --------------------------------------------------------------------------- SearchSpace: sampling with optuna


def test_sampling_with_real_optuna_trials_respects_the_space():
    config = SpaceConfig(
        criteria=["l1", "l2", "random"],
        ratio=RatioRange(0.1, 0.7, 0.2),
        round_to=4,
        min_channels=2,
        rules=[
            Rule(match="features.0", exclude=True),
            Rule(match="features.3", ratio=0.35),
            Rule(match="features.7", low=0.3, high=0.5, step=0.1),
        ],
    )
    space = SearchSpace(config, GROUPS, seed=11)
    study = _study(0)
    ranges = {"features.7": (0.3, 0.5, 0.1), "classifier.1": (0.1, 0.7, 0.2)}
    seen_criteria = set()
    for _ in range(25):
        params, constants = _ask(space, study)
        assert set(params) == {RATIO_PREFIX + "features.7", RATIO_PREFIX + "classifier.1", "criterion"}
        assert constants == {"granularity": "channel"}
        policy = space.policy({**params, **constants})
        assert isinstance(policy, Policy)
        assert "features.0" not in policy.ratios
        assert policy.ratios["features.3"] == 0.35
        for group, (low, high, step) in ranges.items():
            value = policy.ratios[group]  # low > 0, so never dropped
            assert low - 1e-9 <= value <= high + 1e-9
            k = (value - low) / step
            assert abs(k - round(k)) < 1e-6
        assert policy.criterion in config.criteria
        seen_criteria.add(policy.criterion)
        assert policy.granularity == "channel"
        assert (policy.round_to, policy.min_channels, policy.seed) == (4, 2, 11)
    assert len(seen_criteria) > 1  # the criterion really is searched


def test_zero_ratio_leaves_group_out_of_policy():
    space = SearchSpace(SpaceConfig(ratio=RatioRange(0.0, 0.4, 0.1)), GROUPS)
    params = {RATIO_PREFIX + g.name: 0.0 for g in GROUPS}
    params[RATIO_PREFIX + "features.3"] = 0.2
    assert space.policy(params).ratios == {"features.3": 0.2}


def test_continuous_range_is_sampled_continuously():
    space = SearchSpace(SpaceConfig(ratio=RatioRange(0.2, 0.6, None), criteria=["l1"]), GROUPS[:1])
    study = _study(3)
    values = []
    for _ in range(10):
        params, constants = _ask(space, study)
        policy = space.policy({**params, **constants})
        values.append(policy.ratios["features.0"])
    assert all(0.2 <= v <= 0.6 for v in values)
    # with step 0.05 or 0.1 there would be at most 9 distinct values on a grid; continuous ones are off-grid
    assert any(abs(v / 0.05 - round(v / 0.05)) > 1e-6 for v in values)


def test_single_choice_criterion_is_constant_not_suggested():
    space = SearchSpace(SpaceConfig(criteria=["l2"]), GROUPS)
    trial = _study(0).ask()
    constants = space(trial)
    assert constants == {"criterion": "l2", "granularity": "channel"}
    assert "criterion" not in trial.params
    assert "granularity" not in trial.params
    assert space.policy({**trial.params, **constants}).criterion == "l2"


def test_policy_from_params_without_criterion_uses_first():
    space = SearchSpace(SpaceConfig(criteria=["random", "l1"], ratio=RatioRange(0.0, 0.4, 0.1)), GROUPS[:1])
    assert space.policy({RATIO_PREFIX + "features.0": 0.1}).criterion == "random"


def test_policy_from_params_missing_a_ratio_raises_naming_it():
    space = SearchSpace(SpaceConfig(), GROUPS)
    params = {RATIO_PREFIX + g.name: 0.1 for g in GROUPS[:-1]}
    with pytest.raises(SpaceError, match=r"ratio\.classifier\.1"):
        space.policy(params)


def test_same_seed_same_params_different_seed_different_params():
    space = SearchSpace(SpaceConfig(), GROUPS)

    def run(seed):
        study = _study(seed)
        return [_ask(space, study)[0] for _ in range(5)]

    assert run(0) == run(0)
    assert run(0) != run(1)


# --------------------------------------------------------------------------- granularities, regex, ties, global scope

STRUCTURED = [
    PrunableGroup("stem", "conv", 16, granularities=CHANNELS),
    PrunableGroup("layer1.0.conv1", "conv", 16, granularities=CHANNELS),
    PrunableGroup("layer1.1.conv1", "conv", 16, granularities=CHANNELS),
    PrunableGroup("layer2.0.conv1", "conv", 32, granularities=CHANNELS),
    PrunableGroup("attn", "attention-heads", 4, granularities=HEADS),
    PrunableGroup("lstm", "rnn-hidden", 24, granularities=HEADS),
]
WEIGHTS = [
    PrunableGroup("stem.weight", "weight", 432, ("stem",), ("unstructured",)),  # first conv: 3 inputs, not N:M
    PrunableGroup("layer1.0.conv1.weight", "weight", 2304, ("layer1.0.conv1",), ("unstructured", "nm")),
    PrunableGroup("fc.weight", "weight", 640, ("fc",), ("unstructured", "nm")),
]


def test_prunable_group_granularities_validate():
    with pytest.raises(ValueError, match="'blocks'"):
        PrunableGroup("w", "weight", 4, granularities=("blocks",))
    g = PrunableGroup("w", "weight", 8, ("fc",), ("unstructured", "nm"))
    assert PrunableGroup.from_dict(g.to_dict()) == g


def test_policy_validates_global_groups_and_nm_block():
    p = Policy(criterion="l1", ratios={"a": 0.5, "b": 0.5}, global_groups=["b", "a", "a"])
    assert p.global_groups == ("a", "b")
    assert Policy.from_json(p.to_json()) == p
    with pytest.raises(ValueError, match=r"\['c'\]"):
        Policy(criterion="l1", ratios={"a": 0.5}, global_groups=["a", "c"])
    with pytest.raises(ValueError, match="nm"):
        Policy(criterion="l1", ratios={"a": 0.5}, granularity="nm", global_groups=["a"])
    with pytest.raises(ValueError, match="nm_block"):
        Policy(criterion="l1", ratios={}, nm_block=1)


def test_rule_regex_matches_whole_name_and_needs_one_pattern():
    rule = Rule(regex=r"layer\d+\.0\..*", exclude=True)
    assert rule.matches("layer1.0.conv1") and not rule.matches("xlayer1.0.conv1") and not rule.matches("layer1.1.conv1")
    with pytest.raises(ValueError, match="exactly one of match"):
        Rule(match="a", regex="a", exclude=True)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        Rule(regex="(", exclude=True)
    with pytest.raises(ValueError, match="tie"):
        Rule(match="a", tie="bad name")
    with pytest.raises(ValueError, match="exactly one of"):
        Rule(match="a", tie="t", exclude=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"scope": "model"}, "scope"),
    ({"scope": "global", "granularity": ["channel", "nm"]}, "scope: global does not apply to granularity nm"),
    ({"scope": "global", "rules": [Rule(match="a", high=0.3)]}, "only exclude"),
    ({"rules": [Rule(match="a", tie="t"), Rule(match="b", tie="t")]}, "already declared by rules"),
    ({"rules": [Rule(match="a", granularity="nm", exclude=True)]}, "not searched"),
    ({"granularity": ["channel", "channel"]}, "twice"),
])
def test_space_config_rejects_inconsistent_declarations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpaceConfig(**kwargs)


def test_tie_shares_one_ratio_and_leaves_other_groups_alone():
    config = SpaceConfig(ratio=RatioRange(0.0, 0.8, 0.1), rules=[Rule(regex=r"layer1\..*", tie="stage1", high=0.5)])
    space = SearchSpace(config, STRUCTURED[:4])
    assert [d.group for d in space.dimensions() if d.range] == ["stem", "stage1", "layer2.0.conv1"]
    tie = next(d for d in space.dimensions() if d.group == "stage1")
    assert tie.members == ("layer1.0.conv1", "layer1.1.conv1") and tie.range == RatioRange(0.0, 0.5, 0.1)
    policy = space.policy({"ratio.stem": 0.1, "ratio.stage1": 0.4, "ratio.layer2.0.conv1": 0.0})
    assert policy.ratios == {"stem": 0.1, "layer1.0.conv1": 0.4, "layer1.1.conv1": 0.4}
    assert policy.global_groups == ()
    rows = {r["group"]: r["ratio"] for r in space.describe()}
    assert rows["layer1.1.conv1"] == "tie stage1 0..0.5 step 0.1"
    # a later range rule on a member takes it out of the tie
    config = SpaceConfig(rules=[Rule(regex=r"layer1\..*", tie="stage1"), Rule(match="layer1.1.conv1", high=0.2)])
    space = SearchSpace(config, STRUCTURED[:4])
    assert next(d for d in space.dimensions() if d.group == "stage1").members == ("layer1.0.conv1",)


def test_a_policy_needs_the_sampled_parameter_of_each_tie():
    space = SearchSpace(SpaceConfig(rules=[Rule(match="layer1.*", tie="stage1")]), STRUCTURED[:4])
    # the members' own ratio.<group> (what MLflow shows) are no substitute: policy.json is the record
    with pytest.raises(SpaceError, match="ratio.stage1"):
        space.policy({"ratio.stem": 0.2, "ratio.layer1.0.conv1": 0.3, "ratio.layer1.1.conv1": 0.3, "ratio.layer2.0.conv1": 0.1})


def test_tie_named_like_a_group_is_refused():
    with pytest.raises(SpaceError, match="also group names"):
        SearchSpace(SpaceConfig(rules=[Rule(match="layer1.*", tie="stem")]), STRUCTURED[:4])


def test_global_scope_has_one_ratio_and_ranks_searched_groups_together():
    config = SpaceConfig(scope="global", ratio=RatioRange(0.0, 0.6, 0.2),
                         rules=[Rule(match="stem", exclude=True), Rule(match="layer2.*", ratio=0.25)])
    space = SearchSpace(config, STRUCTURED[:4])
    searched = [d for d in space.dimensions() if d.range is not None]
    assert [d.group for d in searched] == ["global"] and searched[0].joint
    assert space.searched_groups == ["layer1.0.conv1", "layer1.1.conv1"]
    policy = space.policy({"ratio.global": 0.4})
    assert policy.ratios == {"layer1.0.conv1": 0.4, "layer1.1.conv1": 0.4, "layer2.0.conv1": 0.25}
    assert policy.global_groups == ("layer1.0.conv1", "layer1.1.conv1")  # the fixed group is pruned on its own
    assert space.policy({"ratio.global": 0.0}) == Policy(criterion="l1", ratios={"layer2.0.conv1": 0.25}, seed=0)
    trial = _study(0).ask()
    space(trial)
    assert set(trial.params) == {"ratio.global", "criterion"}


def test_granularity_choice_samples_only_that_granularitys_ratios():
    config = SpaceConfig(
        granularity=["structured", "unstructured", "nm"],
        criteria=["l1"],
        rules=[Rule(match="*", granularity="unstructured", low=0.5, high=0.9, step=0.1),
               Rule(match="*", granularity="nm", high=0.5, step=0.5)],
    )
    space = SearchSpace(config, STRUCTURED + WEIGHTS, seed=3)
    names = {g: {d.group for d in space.dimensions(g)} for g in config.granularity}
    assert names["structured"] == {g.name for g in STRUCTURED}
    assert names["unstructured"] == {g.name for g in WEIGHTS}
    assert names["nm"] == {"layer1.0.conv1.weight", "fc.weight"}  # the 3-input conv cannot be N:M
    study, seen = _study(1), set()
    for _ in range(30):
        params, constants = _ask(space, study)
        gran = params["granularity"]
        seen.add(gran)
        assert {k for k in params if k.startswith(RATIO_PREFIX)} == {RATIO_PREFIX + n for n in names[gran]}
        policy = space.policy({**params, **constants})
        assert policy.granularity == gran and set(policy.ratios) <= names[gran]
        if gran == "nm":
            assert set(policy.ratios.values()) <= {0.5}
        if gran == "unstructured":
            assert all(0.5 - 1e-9 <= r <= 0.9 + 1e-9 for r in policy.ratios.values())
    assert seen == {"structured", "unstructured", "nm"}
    assert {r["granularity"] for r in space.describe()} == {"structured", "unstructured", "nm"}
    assert space.policy({"granularity": "nm", "ratio.fc.weight": 0.5, "ratio.layer1.0.conv1.weight": 0.0}).nm_block == 4


def test_groups_of_other_granularities_are_ignored_and_missing_ones_are_named():
    space = SearchSpace(SpaceConfig(granularity=["channel"]), STRUCTURED + WEIGHTS)
    assert [g.name for g in space.groups] == [g.name for g in STRUCTURED[:4]]  # heads, rnn, weights: not channel
    with pytest.raises(SpaceError, match="'nm' finds no prunable group") as info:
        SearchSpace(SpaceConfig(granularity=["channel", "nm"]), STRUCTURED)
    assert "stem" in str(info.value)
    with pytest.raises(SpaceError, match="no prunable groups for granularity unstructured"):
        SearchSpace(SpaceConfig(granularity=["unstructured"]), STRUCTURED)


def test_rule_limited_to_a_granularity_must_match_there_and_lists_its_groups():
    config = SpaceConfig(granularity=["structured", "unstructured"],
                         rules=[Rule(match="attn", granularity="unstructured", exclude=True)])
    with pytest.raises(SpaceError, match="matches no prunable group of granularity unstructured") as info:
        SearchSpace(config, STRUCTURED + WEIGHTS)
    assert "fc.weight" in str(info.value) and "attn," not in str(info.value)


def test_fine_tune_knobs_are_searched_and_travel_in_the_policy():
    import optuna

    from spaces.space import SearchSpace as _Space, SpaceConfig as _Config

    space = _Space(_Config(finetune_lr=[1e-3, 1e-1], finetune_optimizers=["sgd", "adamw"]),
                   [PrunableGroup("conv1", "conv", 16, granularities=CHANNELS)])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        constants = space(trial)
        policy = space.policy({**trial.params, **constants})
        assert 1e-3 <= policy.finetune["lr"] <= 1e-1
        assert policy.finetune["lr"] == trial.params["finetune.lr"]
        seen.add(policy.finetune["optimizer"])
        assert Policy.from_json(policy.to_json()) == policy
    assert seen == {"sgd", "adamw"}
    one = _Space(_Config(finetune_optimizers=["adamw"]), [PrunableGroup("conv1", "conv", 16, granularities=CHANNELS)])
    trial = study.ask()
    constants = one(trial)
    assert "finetune.optimizer" not in trial.params and constants["finetune.optimizer"] == "adamw"
    assert one.policy({**trial.params, **constants}).finetune == {"optimizer": "adamw"}


@pytest.mark.parametrize("finetune, message", [({"momentum": 0.5}, "unknown knob"), ({"lr": -1.0}, "lr must be a finite number > 0")])
def test_policy_rejects_bad_fine_tune_knobs(finetune, message):
    with pytest.raises(ValueError, match=message):
        Policy(criterion="l1", ratios={}, finetune=finetune)


def test_a_list_of_round_to_is_searched_and_the_pruned_widths_follow_it():
    import copy

    import torch

    from evaluators.pruning import prune
    from search.baselines import reference_points

    space = SearchSpace(SpaceConfig(criteria=["l1"], ratio=RatioRange(0.1, 0.6, 0.05), round_to=[1, 8]), GROUPS)
    study = _study(5)
    seen = set()
    for _ in range(12):
        trial = study.ask()
        constants = space(trial)
        policy = space.policy({**trial.params, **constants})
        assert policy.round_to == trial.params["round_to"]
        seen.add(policy.round_to)
    assert seen == {1, 8}
    fixed = SearchSpace(SpaceConfig(criteria=["l1"], round_to=8), GROUPS)
    trial = study.ask()
    constants = fixed(trial)
    assert "round_to" not in trial.params and "round_to" not in constants
    assert fixed.policy({**trial.params, **constants}).round_to == 8
    # the baselines are points of the space: at its first round_to
    assert all(b.point["round_to"] == 1 for b in reference_points(space, None, None, ["uniform"], [0.5]))
    # and the widths a policy keeps are multiples of its round_to
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 24, 3), torch.nn.ReLU(), torch.nn.Conv2d(24, 8, 3))
    for round_to, kept in ((1, 15), (8, 16)):
        policy = Policy(criterion="l1", ratios={"0": 0.4}, round_to=round_to)
        pruned = copy.deepcopy(model)
        prune(policy, pruned, torch.randn(1, 3, 8, 8))
        assert pruned[0].out_channels == kept


@pytest.mark.parametrize("round_to", [0, [], [8, 8], [1, 0], True, 2.5])
def test_bad_round_to_is_refused_naming_the_field(round_to):
    with pytest.raises(ValueError, match="round_to: must be an integer >= 1, or a list of distinct ones"):
        SpaceConfig(round_to=round_to)
