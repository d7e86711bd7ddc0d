"""MLflow side of an export: the export run, the logged model and the Model Registry entry.

The model is logged with ``serialization_format="pt2"`` (a ``torch.export`` program): it reloads
with ``mlflow.pytorch.load_model`` without the model's Python class and without unpickling code.
A registered model carries the task and model class in its tags; a name already used for another
task or model class is refused before anything is logged.

>>> check_registered_name(client, "digits-cnn", {"secateurs.task": "digits", ...})  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import inspect
import io
import time
from typing import Any, Mapping, Sequence

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from evaluators.batches import call, logits_of
from search.export import MODEL_CLASS_TAG, TASK_TAG
from search.records import ProductionError
from search.records import KIND, PARENT

DEFAULT_ALIAS = "candidate"


def check_alias(alias: str) -> None:
    """MLflow's rules for an alias: letters, digits, ``_`` and ``-``; not ``latest`` nor ``v<N>``."""
    from mlflow.utils import validation

    try:
        validation._validate_model_alias_name(alias)
        validation._validate_model_alias_name_reserved(alias)
    except MlflowException as exc:
        raise ProductionError(f"--alias {alias!r}: {exc.message}") from None


def _describe(identity: Mapping[str, str | None]) -> str:
    return f"task {identity.get(TASK_TAG) or '<unknown>'}, model class {identity.get(MODEL_CLASS_TAG) or '<unknown>'}"


def registered_identity(client: MlflowClient, name: str) -> dict[str, str | None] | None:
    """The task/model-class tags of registered model ``name`` (from its latest version when the
    model itself has none); None when no model of that name exists; {} when it holds nothing."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise ProductionError(f"cannot read registered model {name!r}: {exc.message}") from None
    found = {key: model.tags.get(key) for key in (TASK_TAG, MODEL_CLASS_TAG)}
    if any(found.values()):
        return found
    escaped = name.replace("'", "\\'")
    versions = client.search_model_versions(f"name = '{escaped}'")
    if not versions:
        return {}
    latest = max(versions, key=lambda v: int(v.version))
    return {key: latest.tags.get(key) for key in (TASK_TAG, MODEL_CLASS_TAG)}


def check_registered_name(client: MlflowClient, name: str, identity: Mapping[str, str]) -> None:
    """Refuse ``name`` if it is invalid or already registered for a different task or model class."""
    from mlflow.utils import validation

    try:
        validation._validate_model_name(name)
    except MlflowException as exc:
        raise ProductionError(f"--register {name!r}: {exc.message}") from None
    found = registered_identity(client, name)
    if found is None or found == {}:
        return
    if found != dict(identity):
        raise ProductionError(f"--register {name!r}: that registered model holds a different model ({_describe(found)}); "
                              f"this one is {_describe(identity)}; choose another name")


def start_export_run(client: MlflowClient, experiment_id: str, search_run_id: str, run_name: str, *, tags: Mapping[str, str], params: Mapping[str, object]) -> str:
    """A child run of the search with ``secateurs.kind=export``."""
    run = client.create_run(experiment_id, run_name=run_name, tags={KIND: "export", PARENT: search_run_id, **tags})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float]) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def positional(model: torch.nn.Module, names: Sequence[str]) -> torch.nn.Module:
    """``model`` called with its inputs in order, one tensor each (``names``: the keyword each goes to,
    or positional when they are ``input_0``, ``input_1``, ...), returning the tensor its output holds
    (``.logits`` of a Hugging Face output): the form ``mlflow.pytorch`` logs as a pt2 program."""
    keywords = not all(n == f"input_{i}" for i, n in enumerate(names))

    def forward(self, *tensors):
        return logits_of(call(self.model, dict(zip(names, tensors)) if keywords else tensors))

    parameter = inspect.Parameter
    forward.__signature__ = inspect.Signature([parameter(n, parameter.POSITIONAL_OR_KEYWORD) for n in ("self", *names)])
    module = type("PositionalInputs", (torch.nn.Module,), {"forward": forward, "__doc__": positional.__doc__})()
    module.model = model
    return module.eval()


def log_model(tracking_uri: str, run_id: str, model: torch.nn.Module, example_inputs: Any) -> str:
    """``mlflow.pytorch.log_model`` into the export run, as a pt2 program with an input example and
    a tensor signature. Returns the model URI (``models:/<model id>``). A model taking a tuple or a
    dict of inputs (token ids and an attention mask) is logged as :func:`positional` of it: the
    program takes the tensors in order (named in the signature) and returns its logits."""
    mlflow.set_tracking_uri(tracking_uri)
    model = model.cpu().eval()
    if isinstance(example_inputs, torch.Tensor):
        names, tensors = ["input"], [example_inputs]
    else:
        named = example_inputs if isinstance(example_inputs, dict) else {f"input_{i}": t for i, t in enumerate(example_inputs)}
        names, tensors = list(named), list(named.values())
        model = positional(model, names)
    arrays = [t.detach().cpu().numpy() for t in tensors]
    with torch.no_grad():
        output = logits_of(model(*[t.cpu() for t in tensors])).detach().numpy()
    example = arrays[0] if len(arrays) == 1 else tuple(arrays)
    signature = infer_signature(arrays[0] if len(arrays) == 1 else dict(zip(names, arrays)), np.asarray(output))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=example,
            signature=signature,
            serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    return info.model_uri


def register(client: MlflowClient, name: str, model_uri: str, run_id: str, *, registry_uri: str, identity: Mapping[str, str], version_tags: Mapping[str, str], alias: str, description: str = "") -> str:
    """Create (or reuse) registered model ``name`` tagged with ``identity``, add ``model_uri`` as a new
    version and point ``alias`` at it. Returns the version number."""
    mlflow.set_registry_uri(registry_uri)
    if registered_identity(client, name) is None:
        client.create_registered_model(name, tags=dict(identity), description=description or None)
    else:
        for key, value in identity.items():
            client.set_registered_model_tag(name, key, value)
    with contextlib.redirect_stderr(io.StringIO()):  # "Registered model ... already exists. Creating a new version"
        version = mlflow.register_model(model_uri, name, tags={**identity, **version_tags}).version
    client.set_registered_model_alias(name, alias, version)
    client.set_tag(run_id, "secateurs.registered", f"{name}/{version}@{alias}")
    return str(version)
