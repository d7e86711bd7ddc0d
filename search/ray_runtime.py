"""Everything that touches Ray: start-up, where Tune keeps its files, and the Tuner of a search.

A search is always run by a fresh Tuner: a resumed one too, with a searcher told what MLflow
recorded (:class:`search.searcher.SecateursSearch` ``history``), never by restoring Ray's own
experiment snapshot, which a killed driver can leave stale or half written.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

import ray
import ray._private.ray_constants as ray_constants
from ray import tune


def init_ray(address: str | None) -> bool:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start a private local Ray; True if this
    call started or connected it (and so should shut it down).

    Without an address we pass ``address="local"``: plain ``ray.init()`` would instead join any
    cluster that ``ray start`` left on this machine, and hang if that cluster is gone.

    A local Ray listens on loopback only (:func:`start_local_ray`).
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        start_local_ray()
    else:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    return True


def start_local_ray() -> str:
    """Start a private single-machine Ray whose servers (GCS, raylet, workers, runtime-env agent)
    listen on loopback only, with no dashboard; returns the node's address.

    Ray 2.60 binds them to its node IP, which it takes from the route to the outside world, and
    ``_node_ip_address="127.0.0.1"`` is turned back into that IP. What Ray does on macOS and
    Windows (single-machine Ray, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` unset) is the one path to a
    loopback node IP: it is taken here for the start of this node only. If the node still comes up
    on another address, Ray is shut down and RuntimeError raised rather than expose it.
    """
    cluster = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # read by ray._private.services.get_node_ip_address
    try:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster
    node_ip = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(node_ip).is_loopback:
        ray.shutdown()
        raise RuntimeError(f"the local Ray came up on {node_ip}, not on loopback: refusing to run a search reachable from the network")
    return node_ip


def token_auth() -> bool:
    """Whether this process talks to Ray with token authentication (``RAY_AUTH_MODE=token``)."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return is_token_auth_enabled()


def local_nodes() -> list[dict[str, float]]:
    """The resources the local Ray of :func:`start_local_ray` will have, known without starting it:
    this machine's CPUs (those this process may use) and the CUDA devices torch sees."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return [{"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}]


def cluster_nodes() -> list[dict[str, float]]:
    """The resources of each live node of the Ray this process is connected to."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def check_resources(cpus: float, gpus: float, nodes: list[dict[str, float]], where: str) -> None:
    """Raise ValueError unless one of ``nodes`` has ``cpus`` CPUs and ``gpus`` GPUs: Ray would
    otherwise keep every trial pending, silently, for ever. ``where`` names the machine or cluster."""
    if any(n.get("CPU", 0.0) >= cpus and n.get("GPU", 0.0) >= gpus for n in nodes):
        return
    most_gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    if gpus > most_gpus:
        raise ValueError(f"search.gpus_per_trial: {gpus:g} GPU(s) per trial, but {where} has at most {most_gpus:g} GPU(s) per node; "
                         f"valid here: 0{f' to {most_gpus:g}' if most_gpus else ''} (or run on a cluster with GPUs: --address)")
    fitting = [n.get("CPU", 0.0) for n in nodes if n.get("GPU", 0.0) >= gpus]
    raise ValueError(f"search.cpus_per_trial: {cpus:g} CPU(s) per trial, but {where} has at most {max(fitting, default=0.0):g} "
                     f"per node{' with the GPUs asked for' if gpus else ''}; valid here: up to {max(fitting, default=0.0):g}")


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
