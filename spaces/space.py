from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from typing import Any, Protocol, Sequence

from spaces.depth import QUANTIZATION_PARAM, QUANTIZATIONS, Block, DepthSpace, ResolvedDepth, resolve
from spaces.groups import PrunableGroup
from spaces.policy import GQA_MODES, GRANULARITIES, Policy

RATIO_PREFIX = "ratio."
GQA_PARAM = "gqa"  # several space.gqa modes: searched, as this parameter
FINETUNE_PREFIX = "finetune."
GLOBAL_DIM = "global"  # the one ratio of scope: global (parameter ratio.global)
SCOPES = ("layer", "global")
_TIE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


class SpaceError(ValueError):
    """A search space that cannot be built from the declared rules and the model's groups."""


class TrialLike(Protocol):
    """The part of ``optuna.Trial`` a space samples through (kept duck-typed: no optuna import)."""

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...

    def suggest_int(self, name: str, low: int, high: int) -> int: ...


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

    def narrowed(self, low: float | None, high: float | None, step: float | None) -> RatioRange:
        return RatioRange(
            low=self.low if low is None else low,
            high=self.high if high is None else high,
            step=self.step if step is None else step,
        )

    def describe(self) -> str:
        return f"{self.low:g}..{self.high:g}" + (f" step {self.step:g}" if self.step else "")

    def values(self) -> list[float]:
        """Every ratio of the range (its two ends when it is continuous).

        >>> RatioRange(0.0, 0.5, 0.25).values()
        [0.0, 0.25, 0.5]
        """
        if not self.step:
            return [self.low, self.high]
        return [round(self.low + i * self.step, 10) for i in range(int(round((self.high - self.low) / self.step)) + 1)]


@dataclasses.dataclass(frozen=True)
class Rule:
    """Overrides the space for every group whose name matches the glob ``match`` (or the regular
    expression ``regex``, matched against the whole name).

    Exactly one effect: ``exclude: true`` (never prune), ``ratio: x`` (fix the ratio), or a range
    (any of ``low``/``high``/``step``) and/or ``tie: NAME`` (every matched group shares one sampled
    ratio, the parameter ``ratio.NAME``, e.g. one ratio per ResNet stage). ``min_channels`` (alone or
    with one of those) sets the fewest units the matched groups keep. ``granularity`` limits the rule
    to one granularity's groups. Later rules override earlier ones.

    >>> Rule(match="classifier.*", exclude=True).exclude
    True
    >>> Rule(regex=r"layer1\\..*conv1", tie="stage1").matches("layer1.0.conv1")
    True
    """

    __pydantic_config__ = {"extra": "forbid"}

    match: str = ""
    regex: str = ""
    exclude: bool = False
    ratio: float | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    tie: str | None = None
    min_channels: int | None = None  # the fewest units (channels, heads, hidden units) the matched groups keep
    granularity: str | None = None

    def __post_init__(self) -> None:
        if bool(self.match) == bool(self.regex):
            raise ValueError(
                "match: a rule needs exactly one of match (a non-empty glob over group names) or regex, "
                f"but got (match={self.match!r}, regex={self.regex!r})"
            )
        if self.regex:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex: {self.regex!r} is not a valid regular expression ({exc})") from None
        if self.ratio is not None:
            _check_ratio("ratio", self.ratio)
        ranged = any(v is not None for v in (self.low, self.high, self.step)) or self.tie is not None
        if self.min_channels is not None and (isinstance(self.min_channels, bool) or self.min_channels < 1):
            raise ValueError(f"min_channels: must be an integer >= 1, but got {self.min_channels!r}")
        effects = sum([self.exclude, self.ratio is not None, ranged])
        if effects != 1 and not (effects == 0 and self.min_channels is not None):
            raise ValueError(
                f"rule for {self.pattern!r} must set exactly one of exclude: true, ratio: x, or low/high/step "
                "(optionally with tie: name), or only min_channels"
            )
        if self.tie is not None and (not _TIE_NAME.fullmatch(self.tie) or self.tie == GLOBAL_DIM):
            raise ValueError(
                f"tie: must be a name of letters, digits, '_', '.', '-' (and not {GLOBAL_DIM!r}), but got {self.tie!r}"
            )
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity: unknown granularity {self.granularity!r}; valid: {', '.join(GRANULARITIES)}")

    @property
    def pattern(self) -> str:
        return self.match or f"regex:{self.regex}"

    def matches(self, group_name: str) -> bool:
        if self.regex:
            return re.fullmatch(self.regex, group_name) is not None
        return fnmatch.fnmatchcase(group_name, self.match)


@dataclasses.dataclass(frozen=True)
class SpaceConfig:
    """The ``space:`` section of a config: what a search may choose.

    ``granularity`` lists the granularities to choose among (see ``spaces.policy.GRANULARITIES``);
    ``scope: global`` gives every searched group one shared ratio (``ratio.global``) and ranks their
    units together; ``nm_block`` is the M of N:M sparsity.

    >>> SpaceConfig(criteria=["l1", "l2"], ratio=RatioRange(0.0, 0.5, 0.1)).criteria
    ['l1', 'l2']
    """

    __pydantic_config__ = {"extra": "forbid"}

    granularity: list[str] = dataclasses.field(default_factory=lambda: ["channel"])
    criteria: list[str] = dataclasses.field(default_factory=lambda: ["l1", "l2", "random"])
    ratio: RatioRange = dataclasses.field(default_factory=RatioRange)
    round_to: int | list[int] = 1  # a list: searched, as the parameter round_to (first = the default)
    min_channels: int = 1
    rules: list[Rule] = dataclasses.field(default_factory=list)
    scope: str = "layer"
    nm_block: int = 4
    finetune_lr: list[float] | None = None  # [low, high]: search the fine-tune learning rate (log-uniform)
    finetune_optimizers: list[str] = dataclasses.field(default_factory=list)  # search the optimizer among these
    depth: DepthSpace | None = None  # search which whole blocks to remove (null: none)
    quantization: list[str] = dataclasses.field(default_factory=lambda: ["none"])  # several: searched (parameter quantization)
    gqa: list[str] = dataclasses.field(default_factory=lambda: ["kv_groups"])  # grouped-query attention; several: searched (parameter gqa)

    @property
    def round_to_choices(self) -> list:
        """``round_to`` as the list searched among (one entry when it is fixed)."""
        return list(self.round_to) if isinstance(self.round_to, (list, tuple)) else [self.round_to]

    def __post_init__(self) -> None:
        if not self.granularity:
            raise ValueError(f"granularity: must list at least one of {', '.join(GRANULARITIES)}")
        for g in self.granularity:
            if g not in GRANULARITIES:
                raise ValueError(f"granularity: unknown granularity {g!r}; valid: {', '.join(GRANULARITIES)}")
        if len(set(self.granularity)) != len(self.granularity):
            raise ValueError(f"granularity: lists a granularity twice: {self.granularity}")
        if not self.criteria:
            raise ValueError("criteria: must list at least one criterion")
        if not self.quantization or len(set(self.quantization)) != len(self.quantization) or \
                any(q not in QUANTIZATIONS for q in self.quantization):
            raise ValueError(f"quantization: must list distinct choices among {', '.join(QUANTIZATIONS)}, but got {self.quantization!r}")
        if not self.gqa or len(set(self.gqa)) != len(self.gqa) or any(m not in GQA_MODES for m in self.gqa):
            raise ValueError(f"gqa: must list distinct modes among {', '.join(GQA_MODES)}, but got {self.gqa!r}")
        if self.finetune_lr is not None and (len(self.finetune_lr) != 2 or not 0 < self.finetune_lr[0] <= self.finetune_lr[1] < math.inf):
            raise ValueError(f"finetune_lr: must be [low, high] with 0 < low <= high, but got {self.finetune_lr!r}")
        choices = self.round_to_choices
        if not choices or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in choices) or len(set(choices)) != len(choices):
            raise ValueError(f"round_to: must be an integer >= 1, or a list of distinct ones to search among, but got {self.round_to!r}")
        if self.min_channels < 1:
            raise ValueError(f"min_channels: must be >= 1, but got {self.min_channels}")
        if self.nm_block < 2:
            raise ValueError(f"nm_block: must be >= 2, but got {self.nm_block}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope: must be one of {', '.join(SCOPES)}, but got {self.scope!r}")
        if self.scope == "global" and "nm" in self.granularity:
            raise ValueError("scope: global does not apply to granularity nm (N:M masks are chosen per block); use scope: layer")
        ties: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            if self.scope == "global" and (rule.tie is not None or any(v is not None for v in (rule.low, rule.high, rule.step))):
                raise ValueError(
                    f"rules[{i}] ({rule.pattern!r}): with scope: global every searched group shares ratio.{GLOBAL_DIM}; "
                    "only exclude: true and ratio: x rules apply"
                )
            if rule.tie is not None:
                if rule.tie in ties:
                    raise ValueError(f"rules[{i}]: tie {rule.tie!r} is already declared by rules[{ties[rule.tie]}]; "
                                     "use one rule per tie (a regex can match several patterns)")
                ties[rule.tie] = i
            if rule.granularity is not None and rule.granularity not in self.granularity:
                raise ValueError(f"rules[{i}].granularity: {rule.granularity!r} is not searched; granularity lists "
                                 f"{', '.join(self.granularity)}")


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One ratio of the space: the parameter ``ratio.<group>`` (a group, a tie or ``global``),
    fixed or sampled from ``range``, applied to ``members`` (ranked together when ``joint``)."""

    group: str
    fixed: float | None
    range: RatioRange | None
    members: tuple[str, ...]
    granularities: tuple[str, ...]
    joint: bool = False


class SearchSpace:
    """The resolved space for one model: per granularity, one ratio dimension per prunable group
    (or per tie, or one global ratio), plus the criterion and the granularity.

    Built from a :class:`SpaceConfig` and the model's groups; every rule must match at least one
    group. Instances are callables usable as Optuna define-by-run spaces (``space(trial) -> dict``);
    the ratios sampled are those of the granularity the trial picked.

    >>> groups = [PrunableGroup("conv1", "conv", 16, granularities=("channel",)), PrunableGroup("fc", "linear", 32, granularities=("channel",))]
    >>> space = SearchSpace(SpaceConfig(rules=[Rule(match="fc", exclude=True)]), groups)
    >>> space.searched_groups
    ['conv1']
    """

    def __init__(self, config: SpaceConfig, groups: Sequence[PrunableGroup], seed: int = 0, *,
                 blocks: Sequence[Block] = (), block_order: Sequence[str] = ()) -> None:
        self.config = config
        self.seed = seed
        self.blocks = list(blocks)
        self.block_order = list(block_order)
        self.depth: ResolvedDepth | None = resolve(config.depth, self.blocks, self.block_order) if config.depth else None
        wanted = set(config.granularity)
        unique: dict[str, PrunableGroup] = {}
        for g in groups:
            if wanted & set(g.granularities):
                unique.setdefault(g.name, g)
        self.groups = list(unique.values())
        if not self.groups:
            found = sorted({x for g in groups for x in g.granularities})
            raise SpaceError(
                f"the model has no prunable groups for granularity {', '.join(config.granularity)}"
                + (f" (its groups are for: {', '.join(found)})" if found else " (no unit kind found anything to prune in it)")
            )
        self._dims: dict[str, list[Dimension]] = {}
        self.group_min_channels: dict[str, int] = {}  # from rules' min_channels
        hits_per_rule = [0] * len(config.rules)
        for gran in config.granularity:
            names = [g.name for g in self.groups if gran in g.granularities]
            if not names:
                others = ", ".join(g.name for g in self.groups)
                raise SpaceError(f"space.granularity: {gran!r} finds no prunable group in this model; available groups "
                                 f"(for {', '.join(x for x in config.granularity if x != gran)}): {others}")
            self._dims[gran] = self._resolve(gran, names, hits_per_rule)
        for i, hits in enumerate(hits_per_rule):
            if not hits:
                rule = config.rules[i]
                grans = [rule.granularity] if rule.granularity else config.granularity
                names = [g.name for g in self.groups if set(grans) & set(g.granularities)]
                raise SpaceError(
                    f"space.rules[{i}].{'regex' if rule.regex else 'match'}: {rule.regex or rule.match!r} matches no "
                    f"prunable group{' of granularity ' + rule.granularity if rule.granularity else ''}; "
                    f"available groups: {', '.join(names)}"
                )

    def _resolve(self, gran: str, names: list[str], hits_per_rule: list[int]) -> list[Dimension]:
        config = self.config
        fixed: dict[str, float | None] = {n: None for n in names}
        ranges: dict[str, RatioRange | None] = {n: config.ratio for n in names}
        tie_of: dict[str, str | None] = {n: None for n in names}
        tie_ranges: dict[str, RatioRange] = {}
        for i, rule in enumerate(config.rules):
            if rule.granularity not in (None, gran):
                continue
            hits = [n for n in names if rule.matches(n)]
            hits_per_rule[i] += len(hits)
            for n in hits:
                if rule.min_channels is not None:
                    self.group_min_channels[n] = rule.min_channels
                    if not (rule.exclude or rule.ratio is not None or rule.tie is not None
                            or any(v is not None for v in (rule.low, rule.high, rule.step))):
                        continue
                if rule.exclude or rule.ratio is not None:
                    fixed[n], ranges[n], tie_of[n] = (0.0 if rule.exclude else rule.ratio), None, None
                    continue
                try:
                    narrowed = (config.ratio if rule.tie else ranges[n] or config.ratio).narrowed(rule.low, rule.high, rule.step)
                except ValueError as exc:
                    raise SpaceError(f"space.rules[{i}] ({rule.pattern!r}) on group {n!r}: {exc}") from None
                fixed[n], ranges[n], tie_of[n] = None, narrowed, rule.tie
                if rule.tie:
                    tie_ranges[rule.tie] = narrowed
        clash = sorted(set(tie_ranges) & {g.name for g in self.groups})
        if clash:
            raise SpaceError(f"space.rules: tie name(s) {clash} are also group names; choose other names")
        dims: list[Dimension] = []
        searched = [n for n in names if fixed[n] is None]
        if config.scope == "global" and searched:
            dims.append(Dimension(GLOBAL_DIM, None, config.ratio, tuple(searched), (gran,), joint=True))
        done_ties: set[str] = set()
        for n in names:
            if fixed[n] is not None:
                dims.append(Dimension(n, fixed[n], None, (n,), (gran,)))
            elif config.scope == "global":
                continue
            elif tie_of[n] is None:
                dims.append(Dimension(n, None, ranges[n], (n,), (gran,)))
            elif tie_of[n] not in done_ties:
                tie = tie_of[n]
                done_ties.add(tie)
                members = tuple(m for m in names if tie_of[m] == tie)
                dims.append(Dimension(tie, None, tie_ranges[tie], members, (gran,)))
        return dims

    def dimensions(self, granularity: str | None = None) -> list[Dimension]:
        """The dimensions of one granularity, or of all (each parameter name once, first wins)."""
        if granularity is not None:
            if granularity not in self._dims:
                raise SpaceError(f"granularity {granularity!r} is not in this space; it has {', '.join(self._dims)}")
            return list(self._dims[granularity])
        seen: dict[str, Dimension] = {}
        for dims in self._dims.values():
            for d in dims:
                seen.setdefault(d.group, d)
        return list(seen.values())

    @property
    def searched_groups(self) -> list[str]:
        """Groups that some sampled ratio applies to, in discovery order."""
        searched = {m for dims in self._dims.values() for d in dims if d.range is not None for m in d.members}
        return [g.name for g in self.groups if g.name in searched]

    def describe(self) -> list[dict[str, Any]]:
        """One row per group and granularity: its size and what the search may do with it."""
        by_name = {g.name: g for g in self.groups}
        rows = []
        for gran, dims in self._dims.items():
            for d in dims:
                if d.range is None:
                    what = "excluded" if d.fixed == 0.0 else f"fixed {d.fixed:g}"
                elif d.joint:
                    what = f"global {d.range.describe()}"
                elif d.members != (d.group,):
                    what = f"tie {d.group} {d.range.describe()}"
                else:
                    what = d.range.describe()
                for m in d.members:
                    g = by_name[m]
                    rows.append({"group": g.name, "kind": g.kind, "size": g.size, "ratio": what, "granularity": gran})
        return rows

    def __call__(self, trial: TrialLike) -> dict[str, Any]:
        """Sample one policy's parameters through ``trial.suggest_*``; returns the fixed ones."""
        constants: dict[str, Any] = {}
        chosen: dict[str, Any] = {}
        for key, choices in (("granularity", self.config.granularity), ("criterion", self.config.criteria)):
            if len(choices) > 1:
                chosen[key] = trial.suggest_categorical(key, list(choices))
            else:
                chosen[key] = constants[key] = choices[0]
        for d in self._dims[chosen["granularity"]]:
            if d.range is not None:
                trial.suggest_float(RATIO_PREFIX + d.group, d.range.low, d.range.high, step=d.range.step)
        if len(self.config.round_to_choices) > 1:  # channel counts the kernels may prefer (multiples of 8, ...)
            trial.suggest_categorical("round_to", self.config.round_to_choices)
        if self.config.finetune_lr is not None:
            low, high = self.config.finetune_lr
            trial.suggest_float(FINETUNE_PREFIX + "lr", float(low), float(high), log=True)
        if len(self.config.finetune_optimizers) > 1:
            trial.suggest_categorical(FINETUNE_PREFIX + "optimizer", list(self.config.finetune_optimizers))
        elif self.config.finetune_optimizers:
            constants[FINETUNE_PREFIX + "optimizer"] = self.config.finetune_optimizers[0]
        if self.depth is not None:
            self.depth.suggest(trial)
        if len(self.config.quantization) > 1:
            trial.suggest_categorical(QUANTIZATION_PARAM, list(self.config.quantization))
        if len(self.config.gqa) > 1:
            trial.suggest_categorical(GQA_PARAM, list(self.config.gqa))
        return constants

    def default_params(self) -> dict[str, Any]:
        """The parameters besides the ratios that a hand-made policy (a baseline) takes: the first
        channel rounding, quantization and grouped-query mode, no block removed."""
        params: dict[str, Any] = {}
        if len(self.config.round_to_choices) > 1:
            params["round_to"] = self.config.round_to_choices[0]
        if self.depth is not None:
            params.update(self.depth.keep_all())
        if len(self.config.quantization) > 1:
            params[QUANTIZATION_PARAM] = self.config.quantization[0]
        if len(self.config.gqa) > 1:
            params[GQA_PARAM] = self.config.gqa[0]
        return params

    def policy(self, params: dict[str, Any]) -> Policy:
        """The policy that sampled ``params`` (as a trial's config holds them) stand for."""
        granularity = params.get("granularity") or self.config.granularity[0]
        if granularity not in self._dims:
            raise SpaceError(f"granularity {granularity!r} is not in this space; it has {', '.join(self._dims)}")
        drop = self.depth.dropped(params) if self.depth is not None else ()
        ratios: dict[str, float] = {}
        joint: list[str] = []
        for d in self._dims[granularity]:
            value = d.fixed if d.range is None else params.get(RATIO_PREFIX + d.group)
            if value is None:
                raise SpaceError(f"parameters have no value for {RATIO_PREFIX + d.group!r}")
            members = [m for m in d.members if not any(m == b or m.startswith(b + ".") for b in drop)]  # not inside a removed block
            if value > 0.0 and members:
                ratios.update({m: float(value) for m in members})
                if d.joint:
                    joint.extend(members)
        return Policy(
            criterion=params.get("criterion") or self.config.criteria[0],
            granularity=granularity,
            ratios=ratios,
            round_to=int(params.get("round_to") or self.config.round_to_choices[0]),
            min_channels=self.config.min_channels,
            group_min_channels=self.group_min_channels,
            seed=self.seed,
            global_groups=tuple(joint),
            nm_block=self.config.nm_block,
            finetune={k.removeprefix(FINETUNE_PREFIX): (float(v) if k.endswith(".lr") else v)
                      for k, v in params.items() if k.startswith(FINETUNE_PREFIX) and v is not None},
            drop_blocks=drop,
            quantization=params.get(QUANTIZATION_PARAM) or self.config.quantization[0],
            gqa=params.get(GQA_PARAM) or self.config.gqa[0],
        )
