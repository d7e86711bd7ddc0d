"""The searcher: Ray Tune's OptunaSearch, plus constraints told to the sampler and baseline policies
evaluated first."""
from __future__ import annotations

from typing import Any, Mapping

from ray.tune.search.optuna import OptunaSearch

from search.constraints import Constraint, violations
from spaces import SearchSpace
from spaces.space import RATIO_PREFIX


class SecateursSearch(OptunaSearch):
    """OptunaSearch that sets each finished trial's constraint values (``trial.set_constraint``)
    before the study is told, so that Optuna's samplers search the feasible region.

    Relies on OptunaSearch keeping its pending Optuna trials in ``_ot_trials`` (ray 2.60, pinned).
    """

    def __init__(self, *, constraints: list[Constraint], dense: Mapping[str, float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._constraints = list(constraints)
        self._dense = dict(dense)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and result and self._constraints:
            try:
                for key, value in violations(self._constraints, result, self._dense).items():
                    ot_trial.set_constraint(key, value)
            except KeyError:
                pass  # a result without the metrics (an errored trial) is told as failed below
        super().on_trial_complete(trial_id, result, error)


def _snap(value: float, low: float, high: float, step: float | None) -> float:
    value = min(max(value, low), high)
    if step:
        value = low + round((value - low) / step) * step
    return round(min(value, high), 10)


def baseline_points(space: SearchSpace, ratios: list[float]) -> list[dict[str, Any]]:
    """Uniform policies: every searched group at the same ratio (clipped to its range), default criterion.

    >>> from spaces import PrunableGroup, SpaceConfig
    >>> space = SearchSpace(SpaceConfig(criteria=["l2", "l1"]), [PrunableGroup("a", "conv", 8)])
    >>> baseline_points(space, [0.5])
    [{'ratio.a': 0.5, 'criterion': 'l2'}]
    """
    points = []
    for ratio in ratios:
        point: dict[str, Any] = {}
        for dim in space.dimensions(space.config.granularity[0]):
            if dim.range is not None:
                point[RATIO_PREFIX + dim.group] = _snap(ratio, dim.range.low, dim.range.high, dim.range.step)
        if len(space.config.criteria) > 1:
            point["criterion"] = space.config.criteria[0]
        if len(space.config.granularity) > 1:
            point["granularity"] = space.config.granularity[0]
        points.append(point)
    return points
