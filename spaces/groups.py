from __future__ import annotations

import dataclasses
from typing import Any

from spaces.policy import GRANULARITIES

GROUP_KINDS = ("conv", "linear", "attention-heads", "rnn-hidden", "weight")

# The granularities that can prune a group of each kind, unless discovery says otherwise
# (a weight tensor is also N:M-prunable when its input size is a multiple of the block).
DEFAULT_GRANULARITIES: dict[str, tuple[str, ...]] = {
    "conv": ("channel", "structured"),
    "linear": ("channel", "structured"),
    "attention-heads": ("structured",),
    "rnn-hidden": ("structured",),
    "weight": ("unstructured",),
}


@dataclasses.dataclass(frozen=True)
class PrunableGroup:
    """One unit of pruning: a set of coupled output channels or neurons (``conv``/``linear``), the
    heads of one attention module (``attention-heads``), the hidden units of one recurrent module
    (``rnn-hidden``), or one weight tensor for unstructured and N:M masks (``weight``).

    ``name`` is the module name of the group's root layer (for ``weight`` groups: the parameter
    name); ``size`` counts its units (channels, heads, hidden units or weights); ``modules`` lists
    every layer whose outputs are removed with it; ``granularities`` says which granularities can
    prune it.

    >>> g = PrunableGroup(name="features.0", kind="conv", size=32, modules=("features.0",))
    >>> PrunableGroup.from_dict(g.to_dict()) == g, g.granularities
    (True, ('channel', 'structured'))
    """

    name: str
    kind: str
    size: int
    modules: tuple[str, ...] = ()
    granularities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("PrunableGroup.name must be a non-empty module name")
        if self.kind not in GROUP_KINDS:
            raise ValueError(f"PrunableGroup.kind must be one of {', '.join(GROUP_KINDS)}, but got {self.kind!r}")
        if self.size < 1:
            raise ValueError(f"PrunableGroup.size must be >= 1, but got {self.size} for group {self.name!r}")
        object.__setattr__(self, "modules", tuple(self.modules) or (self.name,))
        granularities = tuple(self.granularities) or DEFAULT_GRANULARITIES[self.kind]
        unknown = [g for g in granularities if g not in GRANULARITIES]
        if unknown:
            raise ValueError(
                f"PrunableGroup.granularities must be among {', '.join(GRANULARITIES)}, but got {unknown} for group {self.name!r}"
            )
        object.__setattr__(self, "granularities", granularities)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "modules": list(self.modules),
            "granularities": list(self.granularities),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrunableGroup:
        return cls(
            name=data["name"],
            kind=data["kind"],
            size=int(data["size"]),
            modules=tuple(data.get("modules", ())),
            granularities=tuple(data.get("granularities", ())),
        )
