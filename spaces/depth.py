"""Depth and quantization in a search space: which whole blocks a policy removes, and whether the
pruned model ships as int8.

A *block* is a sub-network the model can lose whole: a residual block whose output is its input
plus a branch (it becomes the identity), or a transformer layer (removed from its layer list).
``evaluators`` finds them; here they are names, with their parameter counts.

>>> blocks = [Block("layer1.0", 100), Block("layer1.1", 100), Block("layer2.1", 400)]
>>> depth = DepthSpace(choice="count", max_drop=2)
>>> resolve(depth, blocks, ["layer2.1", "layer1.1", "layer1.0"]).droppable
['layer2.1', 'layer1.1', 'layer1.0']
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

DEPTH_CHOICES = ("per_block", "count")
QUANTIZATIONS = ("none", "int8", "int8_dynamic")
QUANTIZATION_HELP = {
    "none": "float weights and activations",
    "int8": "static int8 (weights and activations; activation ranges from calibration batches): ONNX Runtime",
    "int8_dynamic": "dynamic int8 (int8 weights, activations quantized on the fly): ONNX Runtime, or torch for Linear/LSTM",
}
DROP_PREFIX = "drop."      # per_block: parameter drop.<block or tie> in {False, True}
COUNT_PARAM = "depth.drop"  # count: parameter depth.drop in 0..max_drop
QUANTIZATION_PARAM = "quantization"


@dataclasses.dataclass(frozen=True)
class Block:
    """A removable block of the model: its module name and how many parameters go with it."""

    name: str
    params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params}


@dataclasses.dataclass(frozen=True)
class DepthRule:
    """``exclude: true`` (never remove the matched blocks) or ``tie: NAME`` (they are kept or
    removed together, parameter ``drop.NAME``), for the blocks whose names match the glob
    ``match`` (or the regular expression ``regex``), as ``space.rules`` do for widths."""

    __pydantic_config__ = {"extra": "forbid"}

    match: str = ""
    regex: str = ""
    exclude: bool = False
    tie: str | None = None

    def __post_init__(self) -> None:
        from spaces.space import Rule  # one implementation of matching and of the checks on match/regex/tie

        if self.exclude == (self.tie is not None):
            raise ValueError(f"depth rule for {self.match or self.regex!r} must set exactly one of exclude: true or tie: NAME")
        Rule(match=self.match, regex=self.regex, exclude=self.exclude, tie=self.tie)

    def matches(self, name: str) -> bool:
        from spaces.space import Rule

        return Rule(match=self.match, regex=self.regex, exclude=True).matches(name)


@dataclasses.dataclass(frozen=True)
class DepthSpace:
    """``space.depth``: search which whole blocks to remove.

    ``choice: per_block`` decides each block (or tie of blocks) alone, parameter ``drop.<name>``;
    ``choice: count`` searches how many to remove (``depth.drop``, 0..``max_drop``) and removes the
    least important ones by ``criterion`` (scored once on the dense model's calibration batches).
    ``rules`` exclude or tie blocks.
    """

    __pydantic_config__ = {"extra": "forbid"}

    choice: str = "per_block"
    max_drop: int | None = None  # count: at most this many (null: every removable block)
    criterion: str = "block_influence"  # count: the order in which blocks go (see evaluators.blocks)
    rules: list[DepthRule] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.choice not in DEPTH_CHOICES:
            raise ValueError(f"choice: must be one of {', '.join(DEPTH_CHOICES)}, but got {self.choice!r}")
        if self.max_drop is not None and (isinstance(self.max_drop, bool) or self.max_drop < 1):
            raise ValueError(f"max_drop: must be an integer >= 1 or null, but got {self.max_drop!r}")
        if self.max_drop is not None and self.choice != "count":
            raise ValueError("max_drop: applies to choice: count (per_block decides each block alone)")
        if self.choice == "count" and any(r.tie for r in self.rules):
            raise ValueError("rules: tie applies to choice: per_block (count removes blocks one by one, least important first)")


@dataclasses.dataclass(frozen=True)
class ResolvedDepth:
    """A depth space applied to one model: the searched decisions and the blocks each one removes."""

    config: DepthSpace
    decisions: dict[str, tuple[str, ...]]  # per_block: parameter name (block or tie) -> blocks it removes
    droppable: list[str]                   # count: the blocks that may go, least important first
    excluded: list[str]

    @property
    def max_drop(self) -> int:
        return min(self.config.max_drop or len(self.droppable), len(self.droppable))

    def can_drop_all(self, blocks: int) -> bool:
        """Whether some policy of this space removes all ``blocks`` removable blocks of the model."""
        if self.excluded:
            return False
        return self.config.choice == "per_block" or self.max_drop >= blocks

    def suggest(self, trial: Any) -> None:
        if self.config.choice == "per_block":
            for name in self.decisions:
                trial.suggest_categorical(DROP_PREFIX + name, [False, True])
        elif self.max_drop:
            trial.suggest_int(COUNT_PARAM, 0, self.max_drop)

    def dropped(self, params: dict[str, Any]) -> tuple[str, ...]:
        """The blocks the sampled ``params`` remove (absent parameters: nothing removed)."""
        if self.config.choice == "count":
            return tuple(self.droppable[: int(params.get(COUNT_PARAM) or 0)])
        return tuple(b for name, members in self.decisions.items() if params.get(DROP_PREFIX + name) for b in members)

    def keep_all(self) -> dict[str, Any]:
        """The parameters of a policy that removes no block (baselines)."""
        if self.config.choice == "count":
            return {COUNT_PARAM: 0} if self.max_drop else {}
        return {DROP_PREFIX + name: False for name in self.decisions}


def _why_not(not_removable: Mapping[str, str], names: Sequence[str], limit: int = 4) -> str:
    """``names`` with the reason each is not removable (the first ``limit``)."""
    shown = [f"{n}: {not_removable[n]}" for n in names[:limit]]
    more = f"; and {len(names) - limit} more" if len(names) > limit else ""
    return "; ".join(shown) + more


def resolve(config: DepthSpace, blocks: Sequence[Block], order: Sequence[str] = (),
            not_removable: Mapping[str, str] | None = None) -> ResolvedDepth:
    """Apply ``config`` to the model's ``blocks``; ``order``: the block names, least important first
    (needed for ``choice: count``). Every rule must match a block; the error lists the removable ones,
    and says why the modules it matched are not removable when ``not_removable`` (module name -> why)
    knows it.

    >>> resolve(DepthSpace(rules=[DepthRule(match="layer2.0", exclude=True)]), [Block("layer1.0")],
    ...         not_removable={"layer2.0": "it maps (1, 16) to (1, 32)"})
    Traceback (most recent call last):
    spaces.space.SpaceError: space.depth.rules[0]: 'layer2.0' matches no removable block (layer2.0: it maps (1, 16) to (1, 32)); removable blocks: layer1.0
    """
    from spaces.space import SpaceError

    not_removable = dict(not_removable or {})
    names = [b.name for b in blocks]
    if not names:
        why = f"; why its candidates are not: {_why_not(not_removable, list(not_removable))}" if not_removable else ""
        raise SpaceError("space.depth: the model has no removable block (a residual block whose output is its input plus a "
                         f"branch of the same shape, or a transformer layer){why}; remove space.depth")
    excluded: set[str] = set()
    tie_of: dict[str, str] = {}
    for i, rule in enumerate(config.rules):
        hits = [n for n in names if rule.matches(n)]
        if not hits:
            matched = [n for n in not_removable if rule.matches(n)]
            why = f" ({_why_not(not_removable, matched)})" if matched else ""
            raise SpaceError(f"space.depth.rules[{i}]: {rule.match or rule.regex!r} matches no removable block{why}; "
                             f"removable blocks: {', '.join(names)}")
        for n in hits:
            if rule.exclude:
                excluded.add(n)
                tie_of.pop(n, None)
            else:
                excluded.discard(n)
                tie_of[n] = rule.tie
    clash = sorted(set(tie_of.values()) & set(names))
    if clash:
        raise SpaceError(f"space.depth.rules: tie name(s) {clash} are also block names; choose other names")
    decisions: dict[str, tuple[str, ...]] = {}
    for n in names:
        if n not in excluded:
            key = tie_of.get(n, n)
            decisions[key] = decisions.get(key, ()) + (n,)
    droppable: list[str] = []
    if config.choice == "count":
        if sorted(order) != sorted(names):
            raise SpaceError(f"space.depth: choice count needs every removable block ranked by {config.criterion}; "
                             f"got {len(order)} of {len(names)}")
        droppable = [n for n in order if n not in excluded]
    if not decisions:
        raise SpaceError(f"space.depth: every removable block is excluded ({', '.join(names)}); remove the rule or space.depth")
    return ResolvedDepth(config, decisions, droppable, sorted(excluded))
