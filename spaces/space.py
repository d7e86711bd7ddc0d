from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Protocol, Sequence

from spaces.groups import PrunableGroup
from spaces.policy import GRANULARITIES, Policy

RATIO_PREFIX = "ratio."


class SpaceError(ValueError):
    """A search space that cannot be built from the declared rules and the model's groups."""


class TrialLike(Protocol):
    """The part of ``optuna.Trial`` a space samples through (kept duck-typed: no optuna import)."""

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None) -> float: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


def _check_ratio(field: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{field}: must satisfy 0 <= ratio < 1, but got {value!r}")


@dataclasses.dataclass(frozen=True)
class RatioRange:
    """The ratios a group may take: ``low``..``high`` in steps of ``step`` (``step: null`` = continuous).

    >>> RatioRange(low=0.0, high=0.5, step=0.1).high
    0.5
    """

    __pydantic_config__ = {"extra": "forbid"}

    low: float = 0.0
    high: float = 0.8
    step: float | None = 0.05

    def __post_init__(self) -> None:
        _check_ratio("low", self.low)
        _check_ratio("high", self.high)
        if self.low > self.high:
            raise ValueError(f"low <= high must hold, but got (low={self.low}, high={self.high})")
        if self.step is not None:
            if not 0.0 < self.step < 1.0:
                raise ValueError(f"step: must satisfy 0 < step < 1 (or be null), but got {self.step!r}")
            steps = (self.high - self.low) / self.step
            if abs(steps - round(steps)) > 1e-6:
                raise ValueError(
                    f"(high - low) must be a multiple of step, but got (low={self.low}, high={self.high}, step={self.step})"
                )


@dataclasses.dataclass(frozen=True)
class Rule:
    """Overrides the space for every group whose name matches the glob ``match``.

    Exactly one effect: ``exclude: true`` (never prune), ``ratio: x`` (fix the ratio), or any of
    ``low``/``high``/``step`` (narrow the range). Later rules override earlier ones.

    >>> Rule(match="classifier.*", exclude=True).exclude
    True
    """

    __pydantic_config__ = {"extra": "forbid"}

    match: str
    exclude: bool = False
    ratio: float | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None

    def __post_init__(self) -> None:
        if not self.match:
            raise ValueError("match: must be a non-empty glob pattern over group names")
        if self.ratio is not None:
            _check_ratio("ratio", self.ratio)
        effects = [self.exclude, self.ratio is not None, any(v is not None for v in (self.low, self.high, self.step))]
        if sum(effects) != 1:
            raise ValueError(
                f"rule for {self.match!r} must set exactly one of exclude: true, ratio: x, or low/high/step"
            )

    def matches(self, group_name: str) -> bool:
        return fnmatch.fnmatchcase(group_name, self.match)


@dataclasses.dataclass(frozen=True)
class SpaceConfig:
    """The ``space:`` section of a config: what a search may choose.

    >>> SpaceConfig(criteria=["l1", "l2"], ratio=RatioRange(0.0, 0.5, 0.1)).criteria
    ['l1', 'l2']
    """

    __pydantic_config__ = {"extra": "forbid"}

    granularity: list[str] = dataclasses.field(default_factory=lambda: ["channel"])
    criteria: list[str] = dataclasses.field(default_factory=lambda: ["l1", "l2", "random"])
    ratio: RatioRange = dataclasses.field(default_factory=RatioRange)
    round_to: int = 1
    min_channels: int = 1
    rules: list[Rule] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.granularity:
            raise ValueError(f"granularity: must list at least one of {', '.join(GRANULARITIES)}")
        for g in self.granularity:
            if g not in GRANULARITIES:
                raise ValueError(f"granularity: unknown granularity {g!r}; valid: {', '.join(GRANULARITIES)}")
        if not self.criteria:
            raise ValueError("criteria: must list at least one criterion")
        if self.round_to < 1:
            raise ValueError(f"round_to: must be >= 1, but got {self.round_to}")
        if self.min_channels < 1:
            raise ValueError(f"min_channels: must be >= 1, but got {self.min_channels}")


@dataclasses.dataclass(frozen=True)
class _Dim:
    group: str
    fixed: float | None
    range: RatioRange | None


class SearchSpace:
    """The resolved space for one model: one ratio dimension per prunable group plus the criterion.

    Built from a :class:`SpaceConfig` and the model's groups; every rule must match at least one
    group. Instances are callables usable as Optuna define-by-run spaces (``space(trial) -> dict``).

    >>> groups = [PrunableGroup("conv1", "conv", 16), PrunableGroup("fc", "linear", 32)]
    >>> space = SearchSpace(SpaceConfig(rules=[Rule(match="fc", exclude=True)]), groups)
    >>> space.searched_groups
    ['conv1']
    """

    def __init__(self, config: SpaceConfig, groups: Sequence[PrunableGroup], seed: int = 0) -> None:
        if not groups:
            raise SpaceError("the model has no prunable groups (no Conv2d/Linear layer whose outputs can be removed)")
        self.config = config
        self.groups = list(groups)
        self.seed = seed
        names = [g.name for g in self.groups]
        fixed: dict[str, float | None] = {n: None for n in names}
        ranges: dict[str, RatioRange | None] = {n: config.ratio for n in names}
        for i, rule in enumerate(config.rules):
            hits = [n for n in names if rule.matches(n)]
            if not hits:
                raise SpaceError(
                    f"space.rules[{i}].match: {rule.match!r} matches no prunable group; "
                    f"available groups: {', '.join(names)}"
                )
            for n in hits:
                if rule.exclude:
                    fixed[n], ranges[n] = 0.0, None
                elif rule.ratio is not None:
                    fixed[n], ranges[n] = rule.ratio, None
                else:
                    base = ranges[n] or config.ratio
                    try:
                        ranges[n] = RatioRange(
                            low=base.low if rule.low is None else rule.low,
                            high=base.high if rule.high is None else rule.high,
                            step=base.step if rule.step is None else rule.step,
                        )
                    except ValueError as exc:
                        raise SpaceError(f"space.rules[{i}] ({rule.match!r}) on group {n!r}: {exc}") from None
                    fixed[n] = None
        self._dims = [_Dim(n, fixed[n], ranges[n]) for n in names]

    def dimensions(self) -> list[_Dim]:
        """One entry per group: its fixed ratio, or the range the search samples it from."""
        return list(self._dims)

    @property
    def searched_groups(self) -> list[str]:
        return [d.group for d in self._dims if d.range is not None]

    def describe(self) -> list[dict[str, Any]]:
        """One row per group: its size and what the search may do with it."""
        sizes = {g.name: g for g in self.groups}
        rows = []
        for d in self._dims:
            g = sizes[d.group]
            if d.range is not None:
                what = f"{d.range.low:g}..{d.range.high:g}" + (f" step {d.range.step:g}" if d.range.step else "")
            else:
                what = "excluded" if d.fixed == 0.0 else f"fixed {d.fixed:g}"
            rows.append({"group": g.name, "kind": g.kind, "size": g.size, "ratio": what})
        return rows

    def __call__(self, trial: TrialLike) -> dict[str, Any]:
        """Sample one policy's parameters through ``trial.suggest_*``; returns the fixed ones."""
        for d in self._dims:
            if d.range is not None:
                trial.suggest_float(RATIO_PREFIX + d.group, d.range.low, d.range.high, step=d.range.step)
        constants: dict[str, Any] = {}
        for key, choices in (("criterion", self.config.criteria), ("granularity", self.config.granularity)):
            if len(choices) > 1:
                trial.suggest_categorical(key, list(choices))
            else:
                constants[key] = choices[0]
        return constants

    def policy(self, params: dict[str, Any]) -> Policy:
        """The policy that sampled ``params`` (as returned by a trial) stand for."""
        ratios: dict[str, float] = {}
        for d in self._dims:
            value = d.fixed if d.range is None else params.get(RATIO_PREFIX + d.group)
            if value is None:
                raise SpaceError(f"parameters have no value for {RATIO_PREFIX + d.group!r}")
            if value > 0.0:
                ratios[d.group] = float(value)
        return Policy(
            criterion=params.get("criterion", self.config.criteria[0]),
            granularity=params.get("granularity", self.config.granularity[0]),
            ratios=ratios,
            round_to=self.config.round_to,
            min_channels=self.config.min_channels,
            seed=self.seed,
        )
