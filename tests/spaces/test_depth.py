"""Depth (whole blocks removed) and quantization in a search space: sampled, resolved to a policy,
refused with the removable blocks named."""
from __future__ import annotations

import optuna
import pytest

from spaces import Block, DepthRule, DepthSpace, Policy, PrunableGroup, SearchSpace, SpaceConfig, SpaceError

CHANNELS = ("channel", "structured")  # granularities of conv groups, as discover_groups gives them
GROUPS = [PrunableGroup("stem", "conv", 16, granularities=CHANNELS), PrunableGroup("layer1.0.conv1", "conv", 16, granularities=CHANNELS),
          PrunableGroup("layer1.1.conv1", "conv", 16, granularities=CHANNELS), PrunableGroup("layer2.1.conv1", "conv", 32, granularities=CHANNELS)]
BLOCKS = [Block("layer1.0", 4640), Block("layer1.1", 4640), Block("layer2.1", 18496)]
ORDER = ["layer1.1", "layer2.1", "layer1.0"]  # least important first


def sample(space: SearchSpace, seed: int = 0, n: int = 20) -> list[Policy]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), directions=["maximize"])
    policies = []
    for _ in range(n):
        trial = study.ask()
        constants = space(trial)
        policies.append(space.policy({**trial.params, **constants}))
        study.tell(trial, 0.0)
    return policies


def test_per_block_choices_tie_and_exclude_blocks_and_skip_widths_inside_removed_blocks():
    depth = DepthSpace(rules=[DepthRule(match="layer1.*", tie="stage1"), DepthRule(match="layer2.1", exclude=True)])
    space = SearchSpace(SpaceConfig(depth=depth), GROUPS, blocks=BLOCKS)
    assert space.depth.decisions == {"stage1": ("layer1.0", "layer1.1")}
    policies = sample(space)
    assert {p.drop_blocks for p in policies} == {(), ("layer1.0", "layer1.1")}  # tied: both or neither; layer2.1 never
    for p in policies:
        if p.drop_blocks:
            assert not any(g.startswith("layer1.") for g in p.ratios)  # nothing to prune inside a removed block
    assert any("layer1.0.conv1" in p.ratios for p in policies if not p.drop_blocks)


def test_count_removes_the_least_important_blocks_up_to_max_drop():
    depth = DepthSpace(choice="count", max_drop=2, rules=[DepthRule(match="layer2.1", exclude=True)])
    space = SearchSpace(SpaceConfig(depth=depth), GROUPS, blocks=BLOCKS, block_order=ORDER)
    assert space.depth.droppable == ["layer1.1", "layer1.0"] and space.depth.max_drop == 2
    assert space.policy({**{f"ratio.{g.name}": 0.0 for g in GROUPS}, "depth.drop": 1}).drop_blocks == ("layer1.1",)
    assert {p.drop_blocks for p in sample(space, n=30)} == {(), ("layer1.1",), ("layer1.1", "layer1.0")}
    assert space.default_params() == {"depth.drop": 0}
    with pytest.raises(SpaceError, match="needs every removable block ranked by block_influence"):
        SearchSpace(SpaceConfig(depth=depth), GROUPS, blocks=BLOCKS)


def test_quantization_is_searched_when_several_choices_and_baselines_take_the_first():
    space = SearchSpace(SpaceConfig(quantization=["none", "int8"]), GROUPS)
    assert {p.quantization for p in sample(space)} == {"none", "int8"}
    assert space.default_params() == {"quantization": "none"}
    assert SearchSpace(SpaceConfig(quantization=["int8_dynamic"]), GROUPS).policy({f"ratio.{g.name}": 0.1 for g in GROUPS}).quantization == "int8_dynamic"


def test_policy_with_blocks_and_quantization_round_trips():
    p = Policy(criterion="l1", ratios={"stem": 0.25}, drop_blocks=["layer1.1"], quantization="int8")
    assert Policy.from_json(p.to_json()) == p and p.drop_blocks == ("layer1.1",)
    assert Policy.from_json('{"criterion": "l1", "ratios": {}}').drop_blocks == ()  # policies recorded before depth existed


@pytest.mark.parametrize("make, message", [
    (lambda: SpaceConfig(quantization=["int4"]), "quantization: must list distinct choices among none, int8, int8_dynamic"),
    (lambda: DepthSpace(choice="some"), "choice: must be one of per_block, count"),
    (lambda: DepthSpace(max_drop=2), "max_drop: applies to choice: count"),
    (lambda: DepthRule(match="layer1.*"), "must set exactly one of exclude: true or tie: NAME"),
    (lambda: Policy(criterion="l1", ratios={}, quantization="fp8"), "Policy.quantization must be one of none, int8, int8_dynamic"),
])
def test_bad_depth_and_quantization_settings_are_refused_naming_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_depth_rule_that_matches_no_block_lists_the_removable_ones():
    with pytest.raises(SpaceError, match=r"space.depth.rules\[0\]: 'head.\*' matches no removable block; removable blocks: layer1.0, layer1.1, layer2.1"):
        SearchSpace(SpaceConfig(depth=DepthSpace(rules=[DepthRule(match="head.*", exclude=True)])), GROUPS, blocks=BLOCKS)
    with pytest.raises(SpaceError, match="the model has no removable block"):
        SearchSpace(SpaceConfig(depth=DepthSpace()), GROUPS)
