"""Constraints on trial metrics, absolute or relative to the dense model.

``"accuracy_drop <= 0.01"``, ``"latency_ms <= 4"``, ``"macs <= 0.5 * dense"``. Each becomes an
Optuna constraint value (feasible when <= 0) that the sampler sees, and the reported frontier
keeps only feasible trials.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import pandas as pd

METRICS = ("accuracy", "accuracy_drop", "latency_ms", "size_mb", "macs", "params")
_PATTERN = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_.\-]*)\s*(?P<op><=|>=)\s*(?P<value>[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)\s*(?P<dense>\*\s*dense)?\s*$"
)


@dataclasses.dataclass(frozen=True)
class Constraint:
    """``metric op value`` (``value`` times the dense model's metric when ``relative``).

    >>> c = Constraint.parse("macs <= 0.5 * dense")
    >>> c.violation({"macs": 40.0}, dense={"macs": 100.0})
    -10.0
    """

    metric: str
    op: str
    value: float
    relative: bool = False
    label: str | None = dataclasses.field(default=None, compare=False)  # how it was typed, if not as an expression (``--max-latency-ms 4``)

    @classmethod
    def parse(cls, text: str, metrics: Sequence[str] | None = METRICS) -> Constraint:
        """``text`` as a constraint on one of ``metrics`` (None: any metric name; the search checks it
        against what the task records before any trial)."""
        match = _PATTERN.match(text)
        if not match:
            raise ValueError(
                f"constraint {text!r} is not of the form 'METRIC <= VALUE', 'METRIC >= VALUE' or "
                f"'METRIC <= VALUE * dense'; METRIC is one of {', '.join(metrics or METRICS)}"
            )
        if metrics is not None and match["metric"] not in metrics:
            raise ValueError(f"constraint {text!r}: unknown metric {match['metric']!r}; valid: {', '.join(metrics)}")
        return cls(match["metric"], match["op"], float(match["value"]), bool(match["dense"]))

    def bound(self, dense: Mapping[str, float]) -> float:
        if self.relative and self.metric not in dense:
            raise ValueError(f"constraint {self}: relative to the dense model, whose {self.metric} is not known here")
        return self.value * float(dense[self.metric]) if self.relative else self.value

    def violation(self, metrics: Mapping[str, float], dense: Mapping[str, float]) -> float:
        """How far ``metrics`` is outside the constraint (<= 0 when it holds), in the metric's unit."""
        bound = self.bound(dense)
        value = float(metrics[self.metric])
        return value - bound if self.op == "<=" else bound - value

    def holds(self, table: pd.DataFrame, dense: Mapping[str, float]) -> pd.Series:
        """Boolean mask of the rows of ``table`` that meet the constraint."""
        bound = self.bound(dense)
        return table[self.metric] >= bound if self.op == ">=" else table[self.metric] <= bound

    def __str__(self) -> str:
        return self.label or f"{self.metric} {self.op} {self.value:g}" + (" * dense" if self.relative else "")


def parse_all(texts: list[str], metrics: Sequence[str] | None = METRICS) -> list[Constraint]:
    return [Constraint.parse(t, metrics) for t in texts]


def violations(constraints: list[Constraint], metrics: Mapping[str, float], dense: Mapping[str, float]) -> dict[str, float]:
    """One violation value per constraint, keyed by its text."""
    return {str(c): c.violation(metrics, dense) for c in constraints}
