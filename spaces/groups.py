from __future__ import annotations

import dataclasses
from typing import Any

from spaces.policy import GRANULARITIES


@dataclasses.dataclass(frozen=True)
class PrunableGroup:
    """One unit of pruning, as ``evaluators.pruning.discover_groups`` found it: e.g. a set of coupled
    output channels or neurons (kind ``conv``/``linear``), the heads of one attention module
    (``attention-heads``), the hidden units of one recurrent module (``rnn-hidden``), or one weight
    tensor for unstructured and N:M masks (``weight``). The kinds are whatever the unit kinds
    registered in ``evaluators.units`` find; this package only carries the name.

    ``name`` names the group (a module name; for ``weight`` groups a parameter name); ``size``
    counts its units (channels, heads, hidden units, weights...); ``modules`` lists every layer whose
    outputs are removed with it; ``granularities`` says which granularities can prune it.

    >>> g = PrunableGroup(name="features.0", kind="conv", size=32, modules=("features.0",), granularities=("channel", "structured"))
    >>> PrunableGroup.from_dict(g.to_dict()) == g
    True
    """

    name: str
    kind: str
    size: int
    modules: tuple[str, ...] = ()
    granularities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("PrunableGroup.name must be a non-empty module name")
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"PrunableGroup.kind must be a non-empty unit kind name, but got {self.kind!r} for group {self.name!r}")
        if self.size < 1:
            raise ValueError(f"PrunableGroup.size must be >= 1, but got {self.size} for group {self.name!r}")
        object.__setattr__(self, "modules", tuple(self.modules) or (self.name,))
        granularities = tuple(self.granularities)
        if not granularities:
            raise ValueError(f"PrunableGroup.granularities must name the granularities that can prune group {self.name!r} "
                             f"(among {', '.join(GRANULARITIES)}), but got none")
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
