from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

GRANULARITIES = ("channel",)


@dataclasses.dataclass(frozen=True)
class Policy:
    """A complete pruning decision: replaying it on the dense checkpoint rebuilds the model.

    ``ratios`` maps a prunable group's name to the fraction of its channels to remove
    (groups that are absent are left whole). ``seed`` fixes the randomness of criteria
    such as ``random``.

    >>> p = Policy(criterion="l1", ratios={"conv1": 0.25})
    >>> Policy.from_json(p.to_json()) == p
    True
    """

    criterion: str
    ratios: dict[str, float]
    granularity: str = "channel"
    round_to: int = 1
    min_channels: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"Policy.granularity must be one of {', '.join(GRANULARITIES)}, but got {self.granularity!r}"
            )
        if not isinstance(self.criterion, str) or not self.criterion:
            raise ValueError(f"Policy.criterion must be a non-empty string, but got {self.criterion!r}")
        for name, ratio in self.ratios.items():
            if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 <= ratio < 1.0:
                raise ValueError(f"Policy ratio for group {name!r} must satisfy 0 <= ratio < 1, but got {ratio!r}")
        if self.round_to < 1:
            raise ValueError(f"Policy.round_to must be >= 1, but got {self.round_to}")
        if self.min_channels < 1:
            raise ValueError(f"Policy.min_channels must be >= 1, but got {self.min_channels}")
        object.__setattr__(self, "ratios", {str(k): float(v) for k, v in sorted(self.ratios.items())})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
