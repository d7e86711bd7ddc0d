"""One trial: rebuild the dense model, apply a policy, fine-tune briefly, measure.

Pure function of its inputs; returns a :class:`Metrics` record. Runs unchanged in a Ray
worker or in-process. The policy's widths are pruned first, then the whole blocks it drops are
removed (:mod:`evaluators.depth`), then the model is fine-tuned, and only then quantized when the
policy ships int8: its scores, latency and size are measured on the artifact that ships
(:mod:`evaluators.deploy`; ``blocks_dropped``, ``quantized_ops`` and the tags of
:meth:`Metrics.tags` say what ran).

What a trial records (:meth:`Metrics.to_dict`): every score the task's evaluation returns (e.g.
``accuracy``, ``rmse``), the measured ``latency_ms`` (with ``latency_p10_ms`` / ``latency_p90_ms``),
``size_mb``, ``macs``, ``params`` and ``param_sparsity`` (and ``tokens_per_s`` for models of token
ids: the tokens of the timed batch over the latency), and the change of each score and of
``macs`` and ``params`` against the dense model as ``<name>_change`` = trial - dense (so
``rmse_change`` > 0 is worse for a minimised RMSE); ``accuracy_drop`` = dense - trial stays beside
``accuracy_change``. A trial whose evaluation returns a non-number, NaN or fewer scores than the
dense model's raises :class:`~evaluators.checks.EvaluationError` (a failed trial with that reason).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Hashable, Mapping, TypeVar

import numpy as np
import torch

from evaluators import deploy, measure, pruning
from evaluators.batches import Calibration, Inputs, first_tensor, to_device
from evaluators.checkpoint import load_dense
from evaluators.checks import CHANGE_SUFFIX, MEASURED, check_scores, describe
from evaluators.criteria import get_criterion
from evaluators.tasks import FinetuneRun, Task
from evaluators.train import FinetuneConfig, budget, recalibrate_batchnorm, train
from spaces import Policy

K = TypeVar("K", bound=Hashable)

DEVICES = ("cpu", "cuda", "auto")
BACKENDS = ("torch", "onnxruntime")


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
    """The ``measure:`` section: how latency is timed.

    >>> MeasureConfig(batch_size=1).threads
    1
    """

    __pydantic_config__ = {"extra": "forbid"}

    batch_size: int = 32   # inputs per timed forward pass
    threads: int = 1       # torch intra-op threads while timing
    warmup: int = 10       # untimed passes first
    repeats: int = 30      # timed passes; latency_ms is their median
    device: str = "cpu"    # cpu, cuda, or auto (cuda when present)
    backend: str = "torch"  # torch (eager), or onnxruntime: export to ONNX, check outputs, time ONNX Runtime (CPU)
    channels_last: bool = False  # torch backend, image inputs: time with channels-last weights and inputs (as deployed so)

    def __post_init__(self) -> None:
        for name in ("batch_size", "threads", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, but got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup: must be >= 0, but got {self.warmup}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {', '.join(BACKENDS)}, but got {self.backend!r}")
        if self.backend == "onnxruntime" and self.device == "cuda":
            raise ValueError("backend: onnxruntime times on the CPU; use device: cpu with it")
        if self.device not in DEVICES:
            raise ValueError(f"device: must be one of {', '.join(DEVICES)}, but got {self.device!r}")
        if self.channels_last and self.backend != "torch":
            raise ValueError(f"channels_last: applies to the torch backend; {self.backend} chooses its own memory layout")

    def check_inputs(self, example: Inputs) -> None:
        """Refuse settings the task's inputs cannot take (``example``: the model inputs of one example)."""
        if self.channels_last and not (isinstance(example, torch.Tensor) and example.dim() == 4):
            raise ValueError(f"measure.channels_last: needs image inputs (N, C, H, W), but the task's inputs are "
                             f"{describe(example)}; set it to false")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("measure.device: 'cuda' was asked for but torch sees no CUDA device")
        return torch.device(self.device)


@dataclasses.dataclass(frozen=True)
class Reference:
    """The dense model's measurements that a trial is compared with: the scores its evaluation
    returned, its MACs and parameters.

    >>> Reference({"accuracy": 0.9}, macs=1000, params=50).changes({"accuracy": 0.8}, macs=500, params=25)["accuracy_drop"]
    0.09999999999999998
    """

    scores: dict[str, float]
    macs: int
    params: int

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Reference:
        """From a flat record of the dense model (:meth:`Metrics.to_dict`, or what MLflow holds):
        its scores are the keys that are neither measured, nor derived, nor timings."""
        skip = {f.name for f in dataclasses.fields(Metrics)} | set(MEASURED)
        scores = {k: float(v) for k, v in record.items()
                  if k not in skip and not k.endswith((CHANGE_SUFFIX, "_drop", "_in_search", "_s", "_diff"))
                  and not k.startswith(("screening_", "time_")) and k not in ("fidelity", "replayed", "node_id")
                  and isinstance(v, (int, float)) and not isinstance(v, bool)}
        return cls(scores, macs=int(record.get("macs", 0)), params=int(record.get("params", 0)))

    def changes(self, scores: Mapping[str, float], *, macs: int, params: int) -> dict[str, float]:
        """``<name>_change`` = trial - dense for each score the dense model has, and for ``macs`` and
        ``params``; ``accuracy_drop`` = dense - trial accuracy."""
        changes = {f"{k}{CHANGE_SUFFIX}": v - self.scores[k] for k, v in scores.items() if k in self.scores}
        changes[f"macs{CHANGE_SUFFIX}"] = float(macs - self.macs)
        changes[f"params{CHANGE_SUFFIX}"] = float(params - self.params)
        if "accuracy" in scores and "accuracy" in self.scores:
            changes["accuracy_drop"] = self.scores["accuracy"] - scores["accuracy"]
        return changes


@dataclasses.dataclass(frozen=True)
class Metrics:
    """What one trial measured. Sizes are in MB (10^6 bytes) of the saved state dict. ``scores``:
    what the task's evaluation returned; ``changes``: see the module docstring."""

    scores: dict[str, float]
    latency_ms: float
    latency_p10_ms: float
    latency_p90_ms: float
    size_mb: float
    macs: int
    params: int
    param_sparsity: float
    finetune_steps: int
    time_prune_s: float
    time_finetune_s: float
    time_measure_s: float
    bn_recalibration_batches: int = 0
    onnx_max_abs_diff: float | None = None  # with measure.backend onnxruntime: ONNX vs torch outputs (the float export)
    blocks_dropped: int = 0    # whole blocks the policy removed
    quantized_ops: int = 0     # int8 nodes of the measured ONNX file, or int8 layers of the torch model (0: float)
    tokens_per_s: float | None = None  # models of token ids: tokens of the timed batch / latency_ms
    changes: dict[str, float] = dataclasses.field(default_factory=dict)
    settings: dict[str, str] = dataclasses.field(default_factory=dict)  # how the artifact ran (evaluators.deploy.settings)

    def to_dict(self) -> dict[str, float]:
        """One flat record: the scores, the measurements and the changes (see the module docstring)."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("scores", "changes", "settings")}
        return {**self.scores, **flat, **self.changes}

    def tags(self) -> dict[str, str]:
        """How the measured artifact ran, as MLflow tags: ``secateurs.quantization``, ``secateurs.runtime``, ..."""
        return {f"secateurs.{k}": v for k, v in self.settings.items()}


def _changes(scores: Mapping[str, float], macs: int, params: int, dense: Reference | None) -> dict[str, float]:
    if dense is None:  # the dense model itself: no change
        return Reference(dict(scores), macs, params).changes(scores, macs=macs, params=params)
    return dense.changes(scores, macs=macs, params=params)


def _calibration(policy: Policy, task: Task) -> Calibration | None:
    """The task's calibration batches when the policy's criterion needs data (``taylor``, ``wanda``), else None."""
    criterion = get_criterion(policy.criterion)
    if not (criterion.needs_gradients or criterion.needs_activations):
        return None
    return task.calibration()


def prune_with_task(policy: Policy, model: torch.nn.Module, task: Task) -> torch.nn.Module:
    """Apply ``policy`` to ``model`` in place with the task's example inputs and (when the criterion
    needs them) its calibration batches and loss: the widths, then the whole blocks it removes;
    returns the model."""
    if policy.ratios or policy.drop_blocks:
        pruning.apply(policy, model, task.example(), calibration=_calibration(policy, task))
    return model


def prune_model(policy: Policy, task: Task, checkpoint: str | Path | bytes) -> tuple[torch.nn.Module, float]:
    """Rebuild the dense model from ``checkpoint`` and apply ``policy``; returns it and the seconds taken."""
    start = time.perf_counter()
    model = prune_with_task(policy, load_dense(task, checkpoint), task)
    return model, time.perf_counter() - start


def finetune_model(model: torch.nn.Module, policy: Policy, task: Task, checkpoint: str | Path | bytes,
                   finetune: FinetuneConfig, device: torch.device | str = "cpu") -> dict[str, float]:
    """Fine-tune a pruned ``model`` in place (moved to ``device``, left in eval mode): the task's own
    hook (``Task.finetune``) when it has one, else secateurs' loop with the task's loss. Returns the
    steps, BatchNorm re-calibration batches and seconds taken."""
    if policy.finetune:  # knobs the search sampled override the config's
        finetune = dataclasses.replace(finetune, **policy.finetune)
    start = time.perf_counter()
    device = torch.device(device)
    model.to(device)
    torch.manual_seed(policy.seed)
    recalibrated = recalibrate_batchnorm(model, task.calibration_source, batches=finetune.bn_recalibration_batches,
                                         batch_size=finetune.batch_size)
    teacher = load_dense(task, checkpoint).to(device) if finetune.distill_alpha > 0 else None
    if task.finetune is not None:
        steps = _run_hook(model, policy, task, finetune, device, teacher)
    else:
        steps = train(model, task.train_source, finetune, seed=policy.seed, teacher=teacher, loss=task.loss,
                      transform=task.train_transform)
    model.eval()
    return {"finetune_steps": steps, "bn_recalibration_batches": recalibrated, "time_finetune_s": time.perf_counter() - start}


def _run_hook(model: torch.nn.Module, policy: Policy, task: Task, finetune: FinetuneConfig, device: torch.device,
              teacher: torch.nn.Module | None) -> int:
    steps = 0 if finetune.epochs <= 0 else budget(task.steps_per_epoch(finetune.batch_size), finetune.epochs, finetune.max_steps)
    if steps <= 0:
        return 0
    model.train()
    run = FinetuneRun(
        model=model, steps=steps, epochs=finetune.epochs, lr=finetune.lr, batch_size=finetune.batch_size, device=device,
        seed=policy.seed, teacher=teacher.eval() if teacher is not None else None, distill_alpha=finetune.distill_alpha,
        distill_temperature=finetune.distill_temperature, settings=dataclasses.asdict(finetune), loss=task.loss,
        batches=functools.partial(task.train_batches, finetune.batch_size, seed=policy.seed, device=device),
    )
    taken = task.finetune(run)
    if taken is not None and (isinstance(taken, bool) or not isinstance(taken, int) or taken < 0):
        raise TypeError(f"Task.finetune: must return the number of steps it took (an integer >= 0) or None, but returned {taken!r}")
    return steps if taken is None else taken


def prune_and_finetune(
    policy: Policy,
    task: Task,
    checkpoint: str | Path | bytes,
    finetune: FinetuneConfig,
    device: torch.device | str = "cpu",
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Rebuild the dense model from ``checkpoint``, apply ``policy`` and fine-tune it.

    Returns the model (on ``device``, in eval mode) and the phase timings. Replaying the same
    policy on the same checkpoint gives the same model: this is how a frontier policy is exported.
    """
    model, time_prune = prune_model(policy, task, checkpoint)
    return model, {"time_prune_s": time_prune, **finetune_model(model, policy, task, checkpoint, finetune, device)}


def _deployed(model: torch.nn.Module, quantization: str, task: Task, inputs: Inputs, config: MeasureConfig,
              keep: Path | None = None):
    """The artifact ``model`` ships as with ``quantization`` (:func:`evaluators.deploy.deployed`),
    int8 calibrated on the task's calibration batches."""
    return deploy.deployed(model, quantization, inputs, backend=config.backend, threads=config.threads,
                           channels_last=config.channels_last, calibration=task.calibration, keep=keep)


def _timing_inputs(task: Task, measure_config: MeasureConfig, device: torch.device) -> Inputs:
    """The first ``batch_size`` evaluation inputs (repeated if there are fewer): what latency is timed on."""
    return to_device(task.inputs(measure_config.batch_size), device)


def _score(model: torch.nn.Module, task: Task, device: torch.device, dense: Reference | None) -> dict[str, float]:
    scores = task.score(model, device)
    return check_scores(scores, dense.scores if dense is not None else None)


def _measure(model: torch.nn.Module, task: Task, measure_config: MeasureConfig, dense: Reference | None,
             quantization: str = "none", keep: Path | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Scores, latency and size of the artifact ``model`` ships as (float, or int8: then all three
    are the int8 artifact's), MACs and parameters of ``model``; ``measured["settings"]``: how it ran."""
    device = measure_config.resolve_device()
    start = time.perf_counter()
    model.to(device).eval()
    inputs = _timing_inputs(task, measure_config, device)
    with _deployed(model, quantization, task, inputs, measure_config, keep) as artifact:
        scores = _score(artifact.model, task, device, dense)
        with artifact.timer() as run:
            timing = measure.interleaved_latency_ms({0: run}, rounds=1, warmup=measure_config.warmup, repeats=measure_config.repeats,
                                                    threads=measure_config.threads, cuda=first_tensor(inputs).is_cuda)[0]
        timing.update(measure.throughput(inputs, timing))  # tokens_per_s, for models of token ids
    model.cpu()
    macs, params = pruning.effective_macs_and_params(model, task.example())  # zeros of unstructured/N:M masks do not count
    # the file export writes: the int8 artifact; else the dense state dict, or the compressed sparse one when that is smaller
    size = artifact.size_mb if artifact.size_mb is not None else min(measure.size_mb(model), len(pruning.sparse_state_dict_bytes(model)) / 1e6)
    return scores, {
        "size_mb": size,
        "macs": macs,
        "params": params,
        "time_measure_s": time.perf_counter() - start,
        **timing,
        "quantized_ops": 0,
        **artifact.metrics,
        "settings": artifact.settings,
    }


def measure_model(model: torch.nn.Module, task: Task, measure_config: MeasureConfig, *, dense: Reference | None = None,
                  quantization: str = "none", keep: Path | None = None) -> dict[str, float]:
    """The task's scores (e.g. ``accuracy``), latency, size, MACs and parameters of ``model`` as it
    is (moved to the measure device), as one flat dict. With ``dense``, a score the dense model had
    and this one lacks is an :class:`~evaluators.checks.EvaluationError`. With ``quantization``
    (``int8``, ``int8_dynamic``) the scores, latency and size are those of the int8 artifact
    (:mod:`evaluators.deploy`), whose ONNX file is copied into the folder ``keep`` when given."""
    scores, measured = _measure(model, task, measure_config, dense, quantization, keep)
    measured.pop("settings")
    return {**scores, **measured}


def _metrics(scores: Mapping[str, float], measured: dict[str, Any], dense: Reference | None, **fields: Any) -> Metrics:
    values = {**measured, **fields}  # measured: see _measure
    params = values["params"]
    return Metrics(
        scores=dict(scores),
        param_sparsity=1.0 - params / (dense.params if dense is not None and dense.params else params),
        changes=_changes(scores, values["macs"], params, dense),
        **values,
    )


def evaluate(
    policy: Policy,
    task: Task,
    checkpoint: str | Path | bytes,
    finetune: FinetuneConfig,
    measure_config: MeasureConfig,
    *,
    dense: Reference | None = None,
) -> Metrics:
    """Prune the dense checkpoint with ``policy``, fine-tune, and measure the result; ``dense`` (the
    dense model's :class:`Reference`) gives the changes, and without it the result is the reference."""
    model, timings = prune_and_finetune(policy, task, checkpoint, finetune, measure_config.resolve_device())
    scores, measured = _measure(model, task, measure_config, dense, policy.quantization)  # fine-tuned, then quantized
    return _metrics(scores, measured, dense, blocks_dropped=len(policy.drop_blocks), **timings)


def screen(
    policy: Policy,
    task: Task,
    checkpoint: str | Path | bytes,
    measure_config: MeasureConfig,
    *,
    bn_batches: int,
    batch_size: int = 64,
    dense: Reference,
) -> tuple[torch.nn.Module, Metrics]:
    """The cheap first fidelity of a trial: prune, re-estimate BatchNorm statistics on ``bn_batches``
    calibration batches (no gradient step), and measure everything. Latency, size and MACs are final
    (fine-tuning changes no shape and no mask); the scores are a lower-fidelity proxy.
    Returns the model (on the measure device) for :func:`promote`."""
    device = measure_config.resolve_device()
    model, time_prune = prune_model(policy, task, checkpoint)
    start = time.perf_counter()
    model.to(device)
    torch.manual_seed(policy.seed)
    recalibrated = recalibrate_batchnorm(model, task.calibration_source, batches=bn_batches, batch_size=batch_size)
    time_recalibrate = time.perf_counter() - start
    scores, measured = _measure(model, task, measure_config, dense, policy.quantization)
    model.to(device)
    return model, _metrics(scores, measured, dense, finetune_steps=0, time_prune_s=time_prune, blocks_dropped=len(policy.drop_blocks),
                           time_finetune_s=time_recalibrate, bn_recalibration_batches=recalibrated)


def promote(model: torch.nn.Module, screened: Metrics, policy: Policy, task: Task, checkpoint: str | Path | bytes,
            finetune: FinetuneConfig, measure_config: MeasureConfig, *, dense: Reference) -> Metrics:
    """The full fidelity of a screened trial: fine-tune the screened model, then score it again (an
    int8 policy: its fine-tuned model quantized again, and that artifact scored; its latency, size and
    MACs are those :func:`screen` measured)."""
    device = measure_config.resolve_device()
    timings = finetune_model(model, policy, task, checkpoint, finetune, device)
    start = time.perf_counter()
    if policy.quantization == "none":
        scores = _score(model, task, device, dense)
    else:
        with _deployed(model.eval(), policy.quantization, task, _timing_inputs(task, measure_config, device), measure_config) as artifact:
            scores = _score(artifact.model, task, device, dense)
    return dataclasses.replace(
        screened,
        scores=scores,
        changes=_changes(scores, screened.macs, screened.params, dense),
        finetune_steps=timings["finetune_steps"],
        time_finetune_s=screened.time_finetune_s + timings["time_finetune_s"],
        time_measure_s=screened.time_measure_s + time.perf_counter() - start,
    )


class Deployments(contextlib.AbstractContextManager):
    """The artifacts of policies kept ready to time again (:meth:`latencies`): each policy's model is
    pruned and exported (and quantized) once however many times it is timed in a row, and released
    when a call of :meth:`latencies` leaves it out (so no more models are held at once than one call
    times) or the context ends. The end-of-search re-timing times the frontier in several passes with it."""

    def __init__(self, task: Task, checkpoint: str | Path | bytes, measure_config: MeasureConfig) -> None:
        self.task, self.checkpoint, self.config = task, checkpoint, measure_config
        self._ready: dict[Hashable, tuple[Policy, Any, dict[str, float], contextlib.ExitStack]] = {}
        self._inputs: Inputs | None = None
        self.built: list[float] = []  # seconds each artifact took to build (prune, export, quantize)

    def __exit__(self, *exc: Any) -> None:
        self._release(set(self._ready))

    def _release(self, keys: set) -> None:
        for key in keys:
            self._ready.pop(key)[3].close()

    @property
    def inputs(self) -> Inputs:
        if self._inputs is None:
            self._inputs = _timing_inputs(self.task, self.config, self.config.resolve_device())
        return self._inputs

    def _timer(self, key: Hashable, policy: Policy) -> tuple[Any, dict[str, float]]:
        ready = self._ready.get(key)
        if ready is None or ready[0] != policy:
            if ready is not None:
                self._release({key})
            started = time.perf_counter()
            with contextlib.ExitStack() as stack:
                model = prune_with_task(policy, load_dense(self.task, self.checkpoint), self.task)
                model = model.to(self.config.resolve_device()).eval()
                artifact = stack.enter_context(_deployed(model, policy.quantization, self.task, self.inputs, self.config))
                extra = {k: v for k, v in artifact.metrics.items() if k == "onnx_max_abs_diff"}
                self._ready[key] = ready = (policy, stack.enter_context(artifact.timer()), extra, stack.pop_all())
            self.built.append(time.perf_counter() - started)
        return ready[1], ready[2]

    def pass_s(self, timing_s: float, new: int) -> float:
        """Seconds a pass is expected to take: ``timing_s`` (the last pass's timing, builds left out)
        and ``new`` artifacts to build, each as long as the median so far."""
        return timing_s + new * (float(np.median(self.built)) if self.built else 0.0)

    def latencies(self, policies: Mapping[K, Policy], *, rounds: int = 5) -> dict[K, dict[str, float]]:
        """Latency of the artifact each policy ships as, timed together: round-robin over ``rounds``
        rounds, so that all see the same machine (see :func:`evaluators.measure.interleaved_latency_ms`);
        ``measure.warmup`` and ``measure.repeats`` are spread over the rounds (rounded up), so a model
        costs about what one in-search timing does."""
        self._release(set(self._ready) - set(policies))
        ready = {key: self._timer(key, policy) for key, policy in policies.items()}
        stats = measure.interleaved_latency_ms({key: call for key, (call, _) in ready.items()}, rounds=rounds,
                                               warmup=-(-self.config.warmup // rounds), repeats=-(-self.config.repeats // rounds),
                                               threads=self.config.threads, cuda=first_tensor(self.inputs).is_cuda)
        return {key: {**stats[key], **measure.throughput(self.inputs, stats[key]), **ready[key][1]} for key in policies}


def measure_latencies(policies: Mapping[K, Policy], task: Task, checkpoint: str | Path | bytes,
                      measure_config: MeasureConfig, *, rounds: int = 5) -> dict[K, dict[str, float]]:
    """Latency of the artifact each policy ships as (float or int8, see :mod:`evaluators.deploy`),
    without fine-tuning it (on dense kernels the time depends on the shapes alone), timed together
    (:meth:`Deployments.latencies`). Used to time the sensitivity path's policies; the
    end-of-search re-timing keeps its :class:`Deployments` across its passes."""
    with Deployments(task, checkpoint, measure_config) as ready:
        return ready.latencies(policies, rounds=rounds)
