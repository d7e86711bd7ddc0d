"""The searcher: Ray Tune's OptunaSearch, plus constraints told to the sampler."""
from __future__ import annotations

from typing import Any, Mapping

from ray.tune.search.optuna import OptunaSearch

from search.constraints import Constraint, violations


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
