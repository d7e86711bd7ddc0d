from __future__ import annotations

import dataclasses
from typing import Any

GROUP_KINDS = ("conv", "linear")


@dataclasses.dataclass(frozen=True)
class PrunableGroup:
    """One set of coupled output channels or neurons that must be pruned together.

    ``name`` is the module name of the group's root layer (the layer whose outputs are
    removed); ``modules`` lists every layer whose outputs are removed with it (for example
    the convolutions joined by a residual add).

    >>> g = PrunableGroup(name="features.0", kind="conv", size=32, modules=("features.0",))
    >>> PrunableGroup.from_dict(g.to_dict()) == g
    True
    """

    name: str
    kind: str
    size: int
    modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("PrunableGroup.name must be a non-empty module name")
        if self.kind not in GROUP_KINDS:
            raise ValueError(f"PrunableGroup.kind must be one of {', '.join(GROUP_KINDS)}, but got {self.kind!r}")
        if self.size < 1:
            raise ValueError(f"PrunableGroup.size must be >= 1, but got {self.size} for group {self.name!r}")
        object.__setattr__(self, "modules", tuple(self.modules) or (self.name,))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "size": self.size, "modules": list(self.modules)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrunableGroup:
        return cls(name=data["name"], kind=data["kind"], size=int(data["size"]), modules=tuple(data.get("modules", ())))
