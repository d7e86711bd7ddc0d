from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from spaces.depth import QUANTIZATIONS

# What a policy's ratios remove, by granularity name (evaluators carries out each one). A registry:
# evaluators.pruning.register_granularity adds a new one here with its engine.
FINETUNE_KNOBS = ("lr", "optimizer")
# How grouped-query attention (several query heads sharing one key/value head) loses heads:
GQA_MODES: dict[str, str] = {
    "kv_groups": "whole key-value groups go, with all their query heads (kept counts: multiples of the group size)",
    "query_heads": "every key-value group stays and loses the same number of query heads (kept counts: multiples of the key-value heads)",
}
GRANULARITIES: dict[str, str] = {
    "channel": "whole conv filters and linear neurons (coupled layers follow); a smaller, faster model",
    "structured": "channel, plus attention heads and recurrent (LSTM/GRU/RNN) hidden units",
    "unstructured": "single weights with the lowest scores, zeroed in place (masks baked into the weights)",
    "nm": "N:M semi-structured: in every block of nm_block weights along the input, floor(ratio * nm_block) are zeroed",
}


def register_granularity(name: str, help: str) -> None:
    """Make ``name`` a valid granularity of policies, spaces and groups (``help``: what its ratios remove).

    >>> register_granularity("channel", GRANULARITIES["channel"])  # registering a name again with the same help is a no-op
    """
    if not isinstance(name, str) or not name.strip() or not isinstance(help, str) or not help.strip():
        raise ValueError(f"a granularity needs a non-empty name and help text, but got (name={name!r}, help={help!r})")
    if GRANULARITIES.get(name, help) != help:
        raise ValueError(f"granularity {name!r} is already registered with another meaning: {GRANULARITIES[name]!r}")
    GRANULARITIES[name] = help


@dataclasses.dataclass(frozen=True)
class Policy:
    """A complete pruning decision: replaying it on the dense checkpoint rebuilds the model.

    ``ratios`` maps a prunable group's name to the fraction of its units to remove (groups that
    are absent are left whole): channels, heads or hidden units for ``channel``/``structured``,
    weights for ``unstructured``; for ``nm`` a weight tensor loses ``floor(ratio * nm_block)`` of
    every ``nm_block`` consecutive input weights (ratio 0.5 with blocks of 4 = 2:4 sparsity).
    ``min_channels`` is the fewest units a structured group keeps (``group_min_channels`` sets it
    per group; attention keeps at least one head unless a group minimum says more).
    ``global_groups`` are pruned together: they lose as many units in total as their ratios ask,
    but which ones is decided by one ranking across all of them. ``seed`` fixes the randomness
    of criteria such as ``random``. ``drop_blocks`` are whole blocks removed after the widths are
    pruned; ``quantization`` is how the model ships (``int8``: static, calibrated; ``int8_dynamic``).
    ``gqa`` is how attention with grouped-query heads loses heads (see :data:`GQA_MODES`).

    >>> p = Policy(criterion="l1", ratios={"conv1": 0.25})
    >>> Policy.from_json(p.to_json()) == p
    True
    """

    criterion: str
    ratios: dict[str, float]
    granularity: str = "channel"
    round_to: int = 1
    min_channels: int = 1
    group_min_channels: dict[str, int] = dataclasses.field(default_factory=dict)  # per-group minimum width (overrides min_channels)
    seed: int = 0
    global_groups: tuple[str, ...] = ()
    nm_block: int = 4
    finetune: dict[str, Any] = dataclasses.field(default_factory=dict)  # searched fine-tune knobs: lr, optimizer
    drop_blocks: tuple[str, ...] = ()  # whole blocks removed (after the widths are pruned)
    quantization: str = "none"  # none, int8 (static, calibrated) or int8_dynamic: how the pruned model ships
    gqa: str = "kv_groups"  # grouped-query attention: kv_groups (whole groups go) or query_heads (the same count from every group)

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"Policy.granularity must be one of {', '.join(GRANULARITIES)}, but got {self.granularity!r}"
            )
        if not isinstance(self.criterion, str) or not self.criterion:
            raise ValueError(f"Policy.criterion must be a non-empty string, but got {self.criterion!r}")
        for name, ratio in self.ratios.items():
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 <= ratio < 1.0:
                raise ValueError(f"Policy ratio for group {name!r} must satisfy 0 <= ratio < 1, but got {ratio!r}")
        if self.round_to < 1:
            raise ValueError(f"Policy.round_to must be >= 1, but got {self.round_to}")
        if self.min_channels < 1:
            raise ValueError(f"Policy.min_channels must be >= 1, but got {self.min_channels}")
        for name, width in self.group_min_channels.items():
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(f"Policy.group_min_channels for group {name!r} must be an integer >= 1, but got {width!r}")
        object.__setattr__(self, "group_min_channels", {str(k): int(v) for k, v in sorted(self.group_min_channels.items())})
        if self.nm_block < 2:
            raise ValueError(f"Policy.nm_block must be >= 2, but got {self.nm_block}")
        object.__setattr__(self, "ratios", {str(k): float(v) for k, v in sorted(self.ratios.items())})
        if isinstance(self.global_groups, str):
            raise ValueError(f"Policy.global_groups must be a list of group names, but got the string {self.global_groups!r}")
        global_groups = tuple(sorted(set(str(g) for g in self.global_groups)))
        missing = [g for g in global_groups if g not in self.ratios]
        if missing:
            raise ValueError(f"Policy.global_groups must all have a ratio in Policy.ratios, but {missing} have none")
        if global_groups and self.granularity == "nm":
            raise ValueError("Policy.global_groups must be empty for granularity 'nm' (N:M masks are chosen per block)")
        object.__setattr__(self, "global_groups", global_groups)
        unknown = sorted(set(self.finetune) - set(FINETUNE_KNOBS))
        if unknown:
            raise ValueError(f"Policy.finetune has unknown knob(s) {unknown}; valid: {', '.join(FINETUNE_KNOBS)}")
        lr = self.finetune.get("lr")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf):
            raise ValueError(f"Policy.finetune lr must be a finite number > 0, but got {lr!r}")
        object.__setattr__(self, "finetune", dict(sorted(self.finetune.items())))
        if isinstance(self.drop_blocks, str):
            raise ValueError(f"Policy.drop_blocks must be a list of block names, but got the string {self.drop_blocks!r}")
        object.__setattr__(self, "drop_blocks", tuple(dict.fromkeys(str(b) for b in self.drop_blocks)))
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"Policy.quantization must be one of {', '.join(QUANTIZATIONS)}, but got {self.quantization!r}")
        if self.gqa not in GQA_MODES:
            raise ValueError(f"Policy.gqa must be one of {', '.join(GQA_MODES)}, but got {self.gqa!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["global_groups"] = list(self.global_groups)
        data["drop_blocks"] = list(self.drop_blocks)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Policy field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        return cls.from_dict(json.loads(text))
