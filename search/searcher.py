"""The searcher: Ray Tune's OptunaSearch, plus constraints told to the sampler and the record of a resumed search."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Sequence

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from search.constraints import Constraint, violations


ORIGIN = "secateurs_origin"  # trial config key: the baseline or seed a trial evaluates (absent for sampled ones)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RecordedTrial:
    """A trial MLflow holds, as a resumed search tells the sampler of it: the parameters the sampler
    chose (``sampled``; None if not recorded), its metrics (None: it failed) and whether it counts
    towards ``search.screening.fine_tunes`` (a sampled trial that was fine-tuned, not screened out)."""

    sampled: Mapping[str, Any] | None
    metrics: Mapping[str, float] | None = None
    fine_tuned_sample: bool = False


def sampled_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial config's sampled parameters: without the keys secateurs adds."""
    return {k: v for k, v in config.items() if k != ORIGIN}


class _Recording:
    """Stands in for an Optuna trial while a define-by-run space is replayed on recorded parameters:
    each ``suggest_*`` returns the recorded value and notes its distribution."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = params
        self.distributions: dict[str, optuna.distributions.BaseDistribution] = {}

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float:
        self.distributions[name] = optuna.distributions.FloatDistribution(low, high, step=step, log=log)
        return self.params[name]

    def suggest_categorical(self, name: str, choices) -> Any:
        self.distributions[name] = optuna.distributions.CategoricalDistribution(list(choices))
        return self.params[name]

    def suggest_int(self, name: str, low: int, high: int) -> int:
        self.distributions[name] = optuna.distributions.IntDistribution(low, high)
        return self.params[name]


class SecateursSearch(OptunaSearch):
    """OptunaSearch that sets each finished trial's constraint values (``trial.set_constraint``)
    before the study is told, so that Optuna's samplers search the feasible region, and that
    marks the trials of its ``points_to_evaluate`` with their names (config key :data:`ORIGIN`).

    Optuna hands out enqueued points first and in order, so the first ``len(origins)`` suggestions
    are those points. A sampled policy that happens to equal a baseline is therefore still a sampled trial.

    With ``fits`` (``search.time_budget_s``: whether a trial started now is expected to end before the
    time budget stops the trials) it stops suggesting, for good, once one would not: the trials
    running end the search's trials, where a trial started anyway would be killed at the stop, its
    compute lost and the stop held up while Ray Tune waits for it.

    With ``fine_tunes`` (``search.screening.fine_tunes``) it stops suggesting once that many trials
    after the first ``exempt`` (the baselines) have completed fine-tuned (a final ``fidelity`` other
    than 0). While the trials running could still reach the budget it suggests nothing and waits,
    so the budget is met exactly, not overshot by the trials in flight.

    Resume: MLflow is the record. A resumed search builds a fresh searcher with ``history``, the
    trials MLflow holds: each is added to the Optuna study as a finished trial (with its recorded
    parameters, objective values and constraint values), and the fine-tuned sampled ones count
    towards ``fine_tunes``. The sampler so hears of each recorded trial once, and nothing depends on
    Ray's experiment snapshot, which a killed driver may leave stale or half written.

    Relies on OptunaSearch keeping its pending Optuna trials in ``_ot_trials`` (ray 2.60, pinned).
    """

    def __init__(self, *, constraints: list[Constraint], dense: Mapping[str, float], origins: list[str] = (),
                 fine_tunes: int | None = None, exempt: int = 0, history: Sequence[RecordedTrial] = (),
                 fits: Callable[[], bool] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fits = fits
        self.out_of_time = False  # it stopped suggesting because no trial started now would end in time
        self._constraints = list(constraints)
        self._dense = dict(dense)
        self._origins = list(origins)
        self._suggested = 0
        self._fine_tunes = fine_tunes
        self._exempt = exempt
        self._fine_tuned = sum(r.fine_tuned_sample for r in history)
        self._counted: set[str] = set()  # trials suggested after the exempt ones, still running
        self.told = sum(self._tell_recorded(r, i) for i, r in enumerate(history))  # recorded trials the study now holds

    def _tell_recorded(self, recorded: RecordedTrial, index: int) -> bool:
        """Add one recorded trial to the study as finished; False if it cannot be (no parameters,
        or parameters outside today's space)."""
        if recorded.sampled is None:
            return False
        trial = _Recording(recorded.sampled)
        try:
            self._space(trial)
            params = {name: recorded.sampled[name] for name in trial.distributions}
            values = None if recorded.metrics is None else [float(recorded.metrics[m]) for m in self._metric]
            constraints = violations(self._constraints, recorded.metrics, self._dense) if recorded.metrics and self._constraints else None
            attrs = {}
            sampler = self._ot_study.sampler
            generation_key = getattr(sampler, "_get_generation_key", None)  # NSGA-II/III: GA samplers breed by generation
            if values is not None and generation_key is not None:
                attrs[generation_key()] = index // sampler.population_size
            frozen = optuna.trial.create_trial(
                state=optuna.trial.TrialState.FAIL if values is None else optuna.trial.TrialState.COMPLETE,
                values=values, params=params, distributions=trial.distributions, system_attrs=attrs, constraints=constraints,
            )
            self._ot_study.add_trial(frozen)
        except (KeyError, ValueError) as exc:
            log.warning("a recorded trial cannot be told to the sampler (%s); it still counts, the sampler does not learn from it", exc)
            return False
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.out_of_time or (self._fits is not None and not self._fits()):
            self.out_of_time = True  # time only runs out: the trials running end the search's trials
            return Searcher.FINISHED
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

    def save(self, checkpoint_path: str) -> None:
        """Ray Tune's snapshot of the searcher (never read back: MLflow is the record), without ``fits``,
        which holds the session and does not pickle."""
        fits, self._fits = self._fits, None
        try:
            super().save(checkpoint_path)
        finally:
            self._fits = fits

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
