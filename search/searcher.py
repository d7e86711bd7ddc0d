"""The searcher: Ray Tune's OptunaSearch, plus constraints told to the sampler."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from search.constraints import Constraint, violations


ORIGIN = "secateurs_origin"  # trial config key: the baseline or seed a trial evaluates (absent for sampled ones)
REPLAY = "secateurs_replay"  # trial config key: the Ray trial id of a recorded trial this one replays (resume)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RecordedTrial:
    """A trial MLflow holds, as a resumed search needs it: its Ray trial id, the baseline or seed it
    evaluated (``origin``) or else its sampled parameters (``sampled``; None if not recorded)."""

    ray_trial_id: str
    origin: str | None = None
    sampled: Mapping[str, Any] | None = None


def sampled_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial config's sampled parameters: without the keys secateurs adds."""
    return {k: v for k, v in config.items() if k not in (ORIGIN, REPLAY)}


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

    Resume: MLflow records each trial as it completes; Ray checkpoints the searcher and its trial
    list only every so often (10 s or more). Trials MLflow recorded after Ray's last checkpoint would
    otherwise be run a second time, or sampled afresh and counted twice against the budgets. Before
    a resume, :meth:`replay_recorded` is given what MLflow holds; once Ray has restored the searcher,
    the recorded trials it never suggested are suggested again, first and with the recorded
    parameters, marked with :data:`REPLAY` so that the trial reports its recorded result instead of
    running (``search.trainable``). The sampler, the counts and the budgets then see each recorded
    trial exactly once.

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
        self._seen: set[str] = set()  # every trial id suggested: what a checkpoint of this searcher knew
        self._recorded: list[RecordedTrial] = []  # given by a resume, used once Ray restored the state
        self._replay_origins: dict[str, str] = {}  # baseline or seed name -> recorded Ray trial id
        self._replay_queue: list[RecordedTrial] = []  # recorded sampled trials, enqueued in the study
        self.replayed = 0  # trials suggested as replays since this searcher was restored

    def suggest(self, trial_id: str) -> dict | str | None:
        if self._fine_tunes is not None and self._suggested >= self._exempt:
            if self._fine_tuned >= self._fine_tunes:
                return Searcher.FINISHED
            if self._fine_tuned + len(self._counted) >= self._fine_tunes:
                return None  # the trials running may yet be screened out: ask again when one ends
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            if self._suggested < len(self._origins):
                origin = self._origins[self._suggested]
                config = {**config, ORIGIN: origin}
                if origin in self._replay_origins:
                    config[REPLAY] = self._replay_origins.pop(origin)
            elif self._replay_queue:
                recorded = self._replay_queue.pop(0)
                if {k: config.get(k) for k in recorded.sampled} == dict(recorded.sampled):
                    config[REPLAY] = recorded.ray_trial_id
                else:  # Optuna refused an enqueued value: run the policy it sampled instead
                    log.warning("could not replay recorded trial %s: the sampler changed its parameters", recorded.ray_trial_id)
            if REPLAY in config:
                self.replayed += 1
            if self._suggested >= self._exempt:
                self._counted.add(trial_id)
            self._seen.add(trial_id)
            self._suggested += 1
        return config

    def replay_recorded(self, recorded: list[RecordedTrial]) -> None:
        """What MLflow holds of this search, in trial order; used when Ray restores the searcher."""
        self._recorded = list(recorded)

    def restore(self, checkpoint_path: str) -> None:
        recorded = self._recorded
        super().restore(checkpoint_path)
        self._recorded, self.replayed = [], 0
        unknown = [r for r in recorded if r.ray_trial_id not in self._seen]
        pending = set(self._origins[self._suggested:])
        self._replay_origins = {r.origin: r.ray_trial_id for r in unknown if r.origin in pending}
        self._replay_queue = []
        for r in unknown:
            if r.origin is not None:
                continue
            if r.sampled is None:
                log.warning("recorded trial %s has no sampled.json; it cannot be replayed", r.ray_trial_id)
                continue
            self._ot_study.enqueue_trial(dict(r.sampled))  # handed out after the waiting baselines, in order
            self._replay_queue.append(r)

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
