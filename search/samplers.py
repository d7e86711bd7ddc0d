"""Optuna samplers by name. Multi-objective ones are used as given; all take a seed."""
from __future__ import annotations

from typing import Callable

import optuna


def _nsga2(seed: int, population_size: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size)


def _nsga3(seed: int, population_size: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIIISampler(seed=seed, population_size=population_size)


def _tpe(seed: int, population_size: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=population_size, multivariate=True)


def _random(seed: int, population_size: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _qmc(seed: int, population_size: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.QMCSampler(seed=seed, scramble=True)


def _gp(seed: int, population_size: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=population_size)


SAMPLERS: dict[str, Callable[[int, int], optuna.samplers.BaseSampler]] = {
    "nsga2": _nsga2,
    "nsga3": _nsga3,
    "tpe": _tpe,
    "random": _random,
    "qmc": _qmc,
    "gp": _gp,
}


def make_sampler(name: str, seed: int, population_size: int = 8) -> optuna.samplers.BaseSampler:
    """The sampler registered under ``name``; an unknown name lists the valid ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name](seed, population_size)
