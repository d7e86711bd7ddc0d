"""What can be searched: prunable groups, pruning policies and search spaces.

This package is pure data: it imports no torch, ray or mlflow, so that a policy can be
read, validated and sampled anywhere (the driver, a Ray worker, a notebook).
"""
from __future__ import annotations

from spaces.depth import QUANTIZATIONS, Block, DepthRule, DepthSpace
from spaces.groups import PrunableGroup
from spaces.policy import GQA_MODES, GRANULARITIES, Policy, register_granularity
from spaces.space import Dimension, RatioRange, Rule, SearchSpace, SpaceConfig, SpaceError

__all__ = [
    "GQA_MODES", "GRANULARITIES", "QUANTIZATIONS", "Block", "DepthRule", "DepthSpace", "Dimension", "PrunableGroup", "Policy", "RatioRange",
    "Rule", "SearchSpace", "SpaceConfig", "SpaceError", "register_granularity",
]
