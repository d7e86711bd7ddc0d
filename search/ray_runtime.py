"""Everything that touches Ray: start-up, where Tune keeps its files, and the Tuner of a search.

A search is always run by a fresh Tuner: a resumed one too, with a searcher told what MLflow
recorded (:class:`search.searcher.SecateursSearch` ``history``), never by restoring Ray's own
experiment snapshot, which a killed driver can leave stale or half written.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

import ray
from ray import tune

def init_ray(address: str | None) -> bool:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start a private local Ray; True if this
    call started or connected it (and so should shut it down).

    Without an address we pass ``address="local"``: plain ``ray.init()`` would instead join any
    cluster that ``ray start`` left on this machine, and hang if that cluster is gone.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(
        address=address,
        include_dashboard=False if address == "local" else None,
        log_to_driver=False,
        logging_level=logging.ERROR,
        configure_logging=True,
    )
    return True


def storage_path(configured: str | None) -> str:
    """Where Tune keeps its files: a URI (``s3://``, ``gs://``, ``file://``) as given, else an
    absolute local path (default ``<tmp>/secateurs-ray``)."""
    if configured and "://" in configured:
        return configured
    return str(Path(configured or Path(tempfile.gettempdir()) / "secateurs-ray").expanduser().resolve())


def make_tuner(trainable: Any, context: Any, *, resources: dict[str, float], searcher: Any, num_samples: int, max_concurrent: int,
               scheduler: Any, name: str, storage: str, callbacks: list, stopper: Any, max_failures: int) -> tune.Tuner:
    """A Tuner running ``trainable(params, context)`` (``context`` travels once through the object
    store) ``num_samples`` times, as ``searcher`` suggests."""
    return tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, context=context), resources),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent,
            reuse_actors=True,
            scheduler=scheduler,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            verbose=0,
            callbacks=callbacks,
            stop=stopper,
            failure_config=tune.FailureConfig(max_failures=max_failures, fail_fast=False),
        ),
    )
