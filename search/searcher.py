"""The searcher: Ray Tune's OptunaSearch, plus constraints told to the sampler."""
from __future__ import annotations

from typing import Any, Mapping

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from search.constraints import Constraint, violations


ORIGIN = "secateurs_origin"  # trial config key: the baseline or seed a trial evaluates (absent for sampled ones)


class SecateursSearch(OptunaSearch):
    """OptunaSearch that sets each finished trial's constraint values (``trial.set_constraint``)
    before the study is told, so that Optuna's samplers search the feasible region, and that
    marks the trials of its ``points_to_evaluate`` with their names (config key :data:`ORIGIN`).

    Optuna hands out enqueued points first and in order, so the first ``len(origins)`` suggestions
    are those points; the count is part of the searcher's saved state, so it survives a resume. A
    sampled policy that happens to equal a baseline is therefore still a sampled trial.

    With ``fine_tunes`` (``search.screening.fine_tunes``) it stops suggesting once that many trials
    after the first ``exempt`` (the baselines) have completed fine-tuned (a final ``fidelity`` other
    than 0). While the trials running could still reach the budget it suggests nothing and waits,
    so the budget is met exactly, not overshot by the trials in flight.

    Relies on OptunaSearch keeping its pending Optuna trials in ``_ot_trials`` (ray 2.60, pinned).
    """

    def __init__(self, *, constraints: list[Constraint], dense: Mapping[str, float], origins: list[str] = (),
                 fine_tunes: int | None = None, exempt: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._constraints = list(constraints)
        self._dense = dict(dense)
        self._origins = list(origins)
        self._suggested = 0
        self._fine_tunes = fine_tunes
        self._exempt = exempt
        self._fine_tuned = 0
        self._counted: set[str] = set()  # trials suggested after the exempt ones, still running

    def suggest(self, trial_id: str) -> dict | str | None:
        if self._fine_tunes is not None and self._suggested >= self._exempt:
            if self._fine_tuned >= self._fine_tunes:
                return Searcher.FINISHED
            if self._fine_tuned + len(self._counted) >= self._fine_tunes:
                return None  # the trials running may yet be screened out: ask again when one ends
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            if self._suggested < len(self._origins):
                config = {**config, ORIGIN: self._origins[self._suggested]}
            if self._suggested >= self._exempt:
                self._counted.add(trial_id)
            self._suggested += 1
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._counted:
            self._counted.discard(trial_id)
            if not error and result and result.get("fidelity", 1) != 0:
                self._fine_tuned += 1
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and result and self._constraints:
            try:
                for key, value in violations(self._constraints, result, self._dense).items():
                    ot_trial.set_constraint(key, value)
            except KeyError:
                pass  # a result without the metrics (an errored trial) is told as failed below
        super().on_trial_complete(trial_id, result, error)
