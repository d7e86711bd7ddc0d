"""What can be searched: prunable groups, pruning policies and search spaces.

This package is pure data: it imports no torch, ray or mlflow, so that a policy can be
read, validated and sampled anywhere (the driver, a Ray worker, a notebook).
"""
from __future__ import annotations

from spaces.groups import PrunableGroup
from spaces.policy import Policy
from spaces.space import RatioRange, Rule, SearchSpace, SpaceConfig, SpaceError

__all__ = ["PrunableGroup", "Policy", "RatioRange", "Rule", "SearchSpace", "SpaceConfig", "SpaceError"]
