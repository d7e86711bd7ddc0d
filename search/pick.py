"""``secateurs pick``: from a search's frontier to a shipped model.

``pick`` reads a search back from MLflow, chooses a frontier policy under constraints, replays it
on the dense checkpoint with the search's own config (optionally fine-tuning longer), measures it
as the search did, writes deployable files and logs/registers it in MLflow.

>>> result = pick("3241bd1d4aa04c958a6255df61a85320", constraints=Constraints(max_latency_ms=1.0),
...               out="export", register="digits-cnn")  # doctest: +SKIP
>>> print(format_pick(result))  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from evaluators import deploy
from evaluators.batches import batch_size_of, call
from evaluators.checkpoint import CheckpointError, load_dense
from evaluators.deploy import INT8_FILE
from evaluators.measure import torch_threads
from evaluators.onnx_backend import flat_outputs, max_abs_diff, max_rel_diff
from evaluators.quantize import OnnxRuntimeModel
from evaluators.tasks import make_task
from evaluators.trial import Reference, measure_model, prune_and_finetune
from search import fidelity, records
from search.choose import Constraints, choose, find_trial
from search.export import check_out_dir, model_card, model_identity, publish, score_columns, stage_export, staging_dir, write_json
from search.hf_export import HF_ARTIFACT_PATH, is_hf_model, loading_lines, stage_pretrained
from search.records import ProductionError, SearchRecord, load_search
from search.registry import (
    DEFAULT_ALIAS, check_alias, check_registered_name, log_metrics, log_model, register as register_model,
    start_export_run,
)
from spaces import Policy

Log = Callable[[str], None]
_COSTS_SHOWN = ("latency_ms", "size_mb", "macs", "params")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- frontier -------------------------------------------------------------------------------

# --- pick -----------------------------------------------------------------------------------

@dataclasses.dataclass
class PickResult:
    """What ``pick`` chose and, when it rebuilt the model, what it measured and where it shipped it."""

    record: SearchRecord
    trial: pd.Series
    policy: Policy
    reason: str
    finetune_epochs: float | None = None
    final: dict[str, float] | None = None          # the rebuilt model, measured now
    dense_now: dict[str, float] | None = None      # the dense model, measured now (back to back)
    warnings: list[str] = dataclasses.field(default_factory=list)
    out_dir: Path | None = None
    files: list[Path] = dataclasses.field(default_factory=list)
    check_diffs: dict[str, float] = dataclasses.field(default_factory=dict)
    export_notes: list[str] = dataclasses.field(default_factory=list)  # files left out, dimensions fixed
    pretrained_files: list[str] = dataclasses.field(default_factory=list)  # a Hugging Face model's save_pretrained files
    export_run_id: str | None = None
    model_uri: str | None = None
    registered: tuple[str, str, str] | None = None  # name, version, alias
    model: torch.nn.Module | None = None
    int8_onnx: bytes | None = None  # an int8 policy's quantized ONNX file: the artifact ``final`` measured
    int8_diffs: dict[str, float] = dataclasses.field(default_factory=dict)  # that file's outputs vs the float model's


def trial_policy(client: MlflowClient, run_id: str) -> Policy:
    try:
        return records.read_policy(client, run_id)
    except LookupError as exc:
        raise ProductionError(f"trial {exc}") from None


def _reason(record: SearchRecord, constraints: Constraints, prefer: str, trial: str | None) -> str:
    if trial is not None:
        return f"asked for with --trial {trial}"
    feasible = int(constraints.satisfied_by(record.frontier, record.dense).sum())
    what = "knee" if prefer == "knee" else f"best {prefer}"
    scope = (f"the {feasible} of {len(record.frontier)} frontier policies that satisfy {constraints.describe()}"
             if constraints.active() else f"all {len(record.frontier)} frontier policies")
    return f"{what} of {scope}"


def pick(run_id: str, *, constraints: Constraints = Constraints(), prefer: str = "knee", trial: str | None = None,
         finetune_epochs: float | None = None, out: str | Path | None = None, force: bool = False,
         register: str | None = None, alias: str = DEFAULT_ALIAS, onnx_tolerance: float = 1e-4,
         tracking_uri: str | None = None, command: str | None = None, log: Log = _stderr) -> PickResult:
    """Choose a policy of search ``run_id``; with ``finetune_epochs``, ``out`` or ``register`` also
    rebuild, measure, export and register it. Every input is checked before any work is done."""
    if finetune_epochs is not None and not finetune_epochs >= 0:
        raise ProductionError(f"--finetune-epochs must be >= 0, but got {finetune_epochs}")
    if not onnx_tolerance > 0:
        raise ProductionError(f"--onnx-tolerance must be > 0, but got {onnx_tolerance}")
    out_dir = check_out_dir(out, force) if out is not None else None
    record = load_search(run_id, tracking_uri)
    row = find_trial(record, trial) if trial is not None else choose(record.frontier, constraints, prefer, dense=record.dense,
                                                                      objectives=record.objectives)
    client = MlflowClient(record.tracking_uri, registry_uri=record.tracking_uri)  # not a registry another store set earlier
    config = record.config
    task = make_task(config.task)
    identity = model_identity(config.task.name, task.build_model())
    if register is not None:
        check_registered_name(client, register, identity)
        check_alias(alias)
    policy = trial_policy(client, row["run_id"])
    result = PickResult(record, row, policy, _reason(record, constraints, prefer, trial), finetune_epochs)
    if finetune_epochs is None and out_dir is None and register is None:
        return result

    if not record.checkpoint or not Path(record.checkpoint).is_file():
        raise ProductionError(f"the dense checkpoint {record.checkpoint!r} that search {record.run_id} recorded does not exist any more")
    finetune = config.finetune if finetune_epochs is None else dataclasses.replace(config.finetune, epochs=finetune_epochs)
    threads = max(1, int(config.search.cpus_per_trial))  # a Ray trial gets OMP_NUM_THREADS = its CPUs
    log(f"rebuilding {_name(row)}: prune the dense model, fine-tune {finetune.epochs:g} epoch(s) "
        f"({threads} torch thread{'s' if threads > 1 else ''}, as a trial), measure")
    try:
        with torch_threads(threads):
            model, timings = prune_and_finetune(policy, task, record.checkpoint, finetune, config.measure.resolve_device())
        dense_model = load_dense(task, record.checkpoint)
    except CheckpointError as exc:
        raise ProductionError(str(exc)) from None
    final, result.int8_onnx = _measure_shipped(model, task, config.measure, policy.quantization)
    dense_now = measure_model(dense_model, task, config.measure)
    reference = Reference.from_record(record.dense)  # the search's dense record: changes as the trials recorded them
    for measured in (final, dense_now):
        scores = {q: measured[q] for q in reference.scores if q in measured}
        measured.update({k: v for k, v in reference.changes(scores, macs=measured["macs"], params=measured["params"]).items()
                         if k not in ("macs_change", "params_change")})
    final["param_sparsity"] = 1.0 - final["params"] / dense_now["params"]
    final.update(timings)
    result.final, result.dense_now, result.model = final, dense_now, model
    result.warnings = [f"measured now, the model misses {v} (the search recorded it within bounds)"
                       for v in constraints.violations(final, record.dense)] if trial is None else []
    if out_dir is None and register is None:
        return result
    _ship(result, client, task, identity, out_dir=out_dir, register=register, alias=alias,
          onnx_tolerance=onnx_tolerance, command=command, log=log)
    return result


def _ship(result: PickResult, client: MlflowClient, task: Any, identity: dict[str, str], *, out_dir: Path | None,
          register: str | None, alias: str, onnx_tolerance: float, command: str | None, log: Log) -> None:
    record, row, model = result.record, result.trial, result.model
    example, check = task.inputs(2), task.inputs(256)
    meta = {"search_run_id": record.run_id, "trial_run_id": row["run_id"], **identity}
    epochs = record.config.finetune.epochs if result.finetune_epochs is None else result.finetune_epochs
    with staging_dir(out_dir) as tmp:
        stage = Path(tmp)
        if out_dir is not None:
            log("exporting: model.pt, model.pt2 (torch.export), model.onnx (checked with onnxruntime)")
            result.check_diffs, result.export_notes = stage_export(stage, model, result.policy, example, check,
                                                                   tolerance=onnx_tolerance, meta=meta)
            result.check_diffs["check_inputs"] = batch_size_of(check)
            for line in result.export_notes:
                log(f"warning: {line}")
            result.warnings += result.export_notes
            if is_hf_model(model):
                log("exporting the Hugging Face model: save_pretrained (config.json of the pruned shapes, model.safetensors, tokenizer)")
                result.pretrained_files = stage_pretrained(stage, model, task)
        else:
            (stage / "policy.json").write_text(result.policy.to_json() + "\n")
        _stage_int8(stage, result, check, log)
        run_id = start_export_run(
            client, record.experiment_id, record.run_id, f"export-{row['kind']}-{int(row['trial']):04d}",
            tags={"secateurs.source_run": row["run_id"], "secateurs.trial": str(int(row["trial"])), **identity},
            params={"source_run_id": row["run_id"], "finetune.epochs": epochs, "policy.criterion": result.policy.criterion,
                    **{f"ratio.{g}": f"{r:g}" for g, r in result.policy.ratios.items()}},
        )
        result.export_run_id = run_id
        try:
            log_metrics(client, run_id, {**{k: v for k, v in result.final.items() if isinstance(v, (int, float))}, **result.check_diffs,
                                         **result.int8_diffs})
            log("logging the model to MLflow (pt2)" + (f" and registering it as {register!r}" if register else ""))
            result.model_uri = log_model(record.tracking_uri, run_id, model, example)
            if register is not None:
                version = register_model(client, register, result.model_uri, run_id, registry_uri=record.tracking_uri,
                                         identity=identity, alias=alias,
                                         version_tags={"secateurs.search_run": record.run_id, "secateurs.trial_run": row["run_id"],
                                                       **{q: f"{result.final[q]:.6f}" for q in record.objectives.quality},
                                                       **_quantization_tags(result)},
                                         description=f"Pruned {identity['secateurs.model_class']} for task {identity['secateurs.task']} "
                                                     f"(secateurs){_quantization_note(result)}.")
                result.registered = (register, version, alias)
            write_json(stage / "metrics.json", {"final": result.final, "dense_measured_now": result.dense_now,
                                                "search_trial": _row_metrics(row, record.objectives.quality), "dense_search": record.dense,
                                                "checks": {**result.check_diffs, **result.int8_diffs}})
            (stage / "MODEL_CARD.md").write_text(_card(result, command, onnx_tolerance, stage))
            for name in ("policy.json", "metrics.json", "MODEL_CARD.md", INT8_FILE):
                if (stage / name).is_file():
                    client.log_artifact(run_id, str(stage / name))
            for name in result.pretrained_files:  # the save_pretrained directory, beside the pt2 program
                client.log_artifact(run_id, str(stage / name), HF_ARTIFACT_PATH)
            if out_dir is not None:
                result.files = publish(stage, out_dir)
                result.out_dir = out_dir
            client.set_terminated(run_id, "FINISHED")
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise


# --- depth and int8: what ships beside the float files ----------------------------------------

def _measure_shipped(model: torch.nn.Module, task: Any, measure: Any, quantization: str) -> tuple[dict[str, float], bytes | None]:
    """The chosen model measured as it ships (an int8 policy: its int8 artifact, see
    :mod:`evaluators.deploy`) and that int8 ONNX file (None: a float policy, or torch's dynamic
    int8, which is applied to the loaded model)."""
    if quantization == "none":
        return measure_model(model, task, measure), None
    with tempfile.TemporaryDirectory(prefix="secateurs-int8-") as tmp:
        final = measure_model(model, task, measure, quantization=quantization, keep=Path(tmp))
        path = Path(tmp) / INT8_FILE
        return final, (path.read_bytes() if path.is_file() else None)


def _stage_int8(stage: Path, result: PickResult, check_inputs: Any, log: Log) -> None:
    """Put the int8 ONNX file the final metrics were measured on into ``stage``, run it in ONNX
    Runtime on ``check_inputs`` and record how far its outputs are from the float model's (int8
    rounds: information for the card, not a failed check; its accuracy is measured on it)."""
    if result.int8_onnx is None:
        return
    path = stage / INT8_FILE
    path.write_bytes(result.int8_onnx)
    log(f"exporting: {INT8_FILE} (the int8 model the final metrics were measured on, ONNX Runtime)")
    model = result.model.cpu().eval()
    with torch.no_grad():
        expected, got = flat_outputs(call(model, check_inputs)), flat_outputs(call(OnnxRuntimeModel(path), check_inputs))
    result.int8_diffs = {"int8_max_abs_diff": max_abs_diff(expected, got), "int8_max_rel_diff": max_rel_diff(expected, got),
                         "int8_check_inputs": batch_size_of(check_inputs)}


def _timed_with(result: PickResult) -> tuple[str, str]:
    """The card's line on the runtime (and execution provider) the latency was timed with, and on what."""
    backend = result.record.config.measure.backend
    settings = deploy.settings(result.policy.quantization, backend)
    provider = f", execution provider {settings['execution_provider']}" if "execution_provider" in settings else ""
    if backend == "onnxruntime":
        what = INT8_FILE if result.policy.quantization != "none" else "model.onnx"
    else:
        what = "the torch model, its nn.Linear/nn.LSTM layers dynamic int8" if result.policy.quantization != "none" else "the torch model"
    return "timed with", f"{settings['runtime']}{provider}, on {what}"


def _quantization_facts(result: PickResult) -> list[tuple[str, str]]:
    """The model card's lines on what ships: the runtime, the removed blocks, and for an int8 policy
    which file is int8 and how it was quantized."""
    policy, facts = result.policy, [_timed_with(result)]
    if policy.drop_blocks:
        facts.append(("blocks removed", f"{', '.join(policy.drop_blocks)} (each replaced by what it computes without its branch; "
                                        "their weights are gone from model.pt, model.pt2 and model.onnx)"))
    if policy.quantization == "none":
        return facts
    settings = deploy.settings(policy.quantization, result.record.config.measure.backend)
    shipped = f"`{INT8_FILE}`" if result.int8_onnx is not None else "the torch model with torch's dynamic int8 applied at load"
    facts.append(("int8", f"{policy.quantization}: {settings['int8_format']}; activations {settings['int8_activations']}; weights "
                          f"{settings['int8_weights']}" + (f" ({settings['int8_why']})" if "int8_why" in settings else "")
                          + f". The final metrics are those of {shipped}; model.pt, model.pt2 and model.onnx are the float model it was "
                          "quantized from, fine-tuned before quantization (no quantization-aware training)"))
    if result.int8_diffs:
        facts.append(("int8 vs float", f"{INT8_FILE} outputs differ from the float model by {result.int8_diffs['int8_max_rel_diff']:.3g} "
                                       f"relative ({result.int8_diffs['int8_max_abs_diff']:.3g} max abs) on "
                                       f"{int(result.int8_diffs['int8_check_inputs'])} test inputs: int8 rounding, which the accuracy above includes"))
    return facts


def _quantization_loading(result: PickResult) -> list[str]:
    if result.int8_onnx is not None:
        return [f"- `{INT8_FILE}` (int8: the model the final metrics measured): `onnxruntime.InferenceSession(\"{INT8_FILE}\", "
                "providers=[\"CPUExecutionProvider\"])`, inputs and output as `model.onnx`."]
    if result.policy.quantization != "none":
        return ["- int8 as measured: `evaluators.quantize.quantize_torch_dynamic(load_pruned(...))` (torch's dynamic int8 of "
                "nn.Linear and nn.LSTM, CPU)."]
    return []


def _quantization_tags(result: PickResult) -> dict[str, str]:
    """Tags of the registered version of an int8 policy: ``secateurs.quantization`` and where the int8 file is."""
    if result.policy.quantization == "none":
        return {}
    tags = {"secateurs.quantization": result.policy.quantization,
            "secateurs.runtime": deploy.settings(result.policy.quantization, result.record.config.measure.backend)["runtime"]}
    if result.int8_onnx is not None:
        tags["secateurs.int8_artifact"] = f"runs:/{result.export_run_id}/{INT8_FILE}"
    return tags


def _quantization_note(result: PickResult) -> str:
    if result.policy.quantization == "none":
        return ""
    where = (f"the int8 ONNX model is the export run's artifact {INT8_FILE}" if result.int8_onnx is not None
             else "apply evaluators.quantize.quantize_torch_dynamic to the loaded model")
    return f"; ships {result.policy.quantization} ({where}; the registered program is the float model it was quantized from)"


def _name(row: pd.Series) -> str:
    return f"{row.get('kind', 'trial')} {int(row['trial'])}"


def _row_metrics(row: pd.Series, scores: list[str]) -> dict[str, float]:
    return {k: float(row[k]) for k in (*score_columns(scores), "latency_ms", "latency_p10_ms", "latency_p90_ms",
                                        "size_mb", "macs", "params") if k in row}


def runtime_label(measure: Any) -> str:
    """How the latency was timed, as the card states it: the runtime and, for channels-last, what
    the user must do to run the exported weights (stored contiguous) the same way."""
    if measure.backend == "onnxruntime":
        return "ONNX Runtime (model.onnx)"
    if measure.channels_last:
        return ("torch eager, channels-last weights and inputs (the files hold contiguous weights: "
                "`model.to(memory_format=torch.channels_last)` and channels-last inputs run it as timed)")
    return "torch eager"


def _card(result: PickResult, command: str | None, tolerance: float, stage: Path | None = None) -> str:
    record, row = result.record, result.trial
    config = record.config
    epochs = config.finetune.epochs if result.finetune_epochs is None else result.finetune_epochs
    facts = [
        ("search run", f"`{record.run_id}` ({record.run_name}, experiment {record.experiment_id}, tracking URI `{record.tracking_uri}`)"),
        ("source trial", f"{_name(row)}, run `{row['run_id']}` ({'on' if row.get('pareto') else 'not on'} the frontier)"),
        ("chosen as", result.reason),
        ("task / model", f"{config.task.name} / {result.model.__class__.__module__}.{type(result.model).__qualname__}"),
        ("dense reference", f"`{record.checkpoint}`"),
        ("fine-tune", f"{epochs:g} epoch(s) (search: {config.finetune.epochs:g}), lr {config.finetune.lr:g}, batch {config.finetune.batch_size}"),
        ("measured on", f"{config.measure.device}, {runtime_label(config.measure)}, batch {config.measure.batch_size}, "
                        f"{config.measure.threads} thread(s), {config.measure.repeats} timed passes after {config.measure.warmup} warm-up"),
        ("export run", f"`{result.export_run_id}` (tag secateurs.kind=export)"),
    ]
    if result.check_diffs:
        checked = [f"{name} {result.check_diffs[f'{kind}_max_rel_diff']:.3g} relative ({result.check_diffs[f'{kind}_max_abs_diff']:.3g} max abs)"
                   for name, kind in (("model.pt2", "pt2"), ("model.onnx", "onnx")) if f"{kind}_max_rel_diff" in result.check_diffs]
        facts.append(("export checks", f"output diff vs torch on {int(result.check_diffs['check_inputs'])} test inputs: "
                                       f"{', '.join(checked) or 'none checked'} (tolerance {tolerance:g}, relative to the largest output)"))
        facts += [("export note", line) for line in result.export_notes]
    first = record.objectives.quality[0]
    ranking = fidelity.describe(row, record.trials, first, record.objectives.mapping[first])
    if ranking:
        facts.insert(3, ("ranked on", ranking))
    facts += _quantization_facts(result)
    loading = [
        "- `model.pt` (weights + policy, `torch.load(weights_only=True)`): "
        "`search.export.load_pruned(task_or_model_factory, \"model.pt\")` rebuilds the dense model, applies the policy, loads the weights.",
        "- `model.pt2`: `torch.export.load(\"model.pt2\").module()` (no Python class needed).",
        "- `model.onnx`: `onnxruntime.InferenceSession(\"model.onnx\")`, input `input` (several inputs: the names of `forward`'s arguments), dynamic batch (and sequence, for token ids), output `output`.",
    ]
    loading += _quantization_loading(result)
    if result.pretrained_files and stage is not None:
        loading += loading_lines(stage, result.model)
    if result.registered:
        name, version, alias = result.registered
        facts.append(("registered", f"`{name}` version {version}, alias `{alias}`"))
        loading.append(f"- MLflow: `mlflow.pytorch.load_model(\"models:/{name}@{alias}\")` gives a torch.export program; "
                       "call it directly (it is in inference mode; `.eval()` is not supported on it).")
    columns = {"dense (search)": record.dense, f"{_name(row)} (search)": _row_metrics(row, record.objectives.quality),
               "final (measured now)": result.final, "dense (measured now)": result.dense_now}
    return model_card(title=f"Pruned {config.task.name} model from search {record.run_name}", columns=columns, facts=facts,
                      scores=record.objectives.quality,
                      policy=result.policy, command=command or f"secateurs pick {record.run_id}", loading=loading)


def format_pick(result: PickResult) -> str:
    """The report ``secateurs pick`` prints."""
    record, row = result.record, result.trial
    ratios = ", ".join(f"{g} {r:g}" for g, r in result.policy.ratios.items()) or "none (dense)"
    lines = [
        f"search {record.label}: {len(record.trials)} trials, {len(record.frontier)} on the frontier",
        f"chosen: {_name(row)} (run {row['run_id']}), {result.reason}",
        f"policy: criterion {result.policy.criterion}; fraction of channels removed: {ratios}"
        + (f"; blocks removed: {', '.join(result.policy.drop_blocks)}" if result.policy.drop_blocks else "")
        + (f"; ships {result.policy.quantization}" if result.policy.quantization != "none" else ""),
        "",
    ]
    scores = record.objectives.quality
    ranking = fidelity.describe(row, record.trials, scores[0], record.objectives.mapping[scores[0]])
    if ranking:
        lines.insert(-1, f"ranked: {ranking}")
    table = [{"": "dense (search)", **record.dense}, {"": f"{_name(row)} (search)", **_row_metrics(row, scores)}]
    if result.final is not None:
        epochs = record.config.finetune.epochs if result.finetune_epochs is None else result.finetune_epochs
        table += [{"": f"final ({epochs:g} ep fine-tune)", **result.final}, {"": "dense (measured now)", **result.dense_now}]
    frame = pd.DataFrame(table).set_index("")
    frame = frame[[c for c in (*score_columns(scores), *_COSTS_SHOWN) if c in frame]]
    frame.index.name = None
    frame[["macs", "params"]] = frame[["macs", "params"]].astype(int)
    lines.append(frame.to_string(float_format=lambda v: f"{v:.4f}"))
    lines += [f"warning: {w}" for w in result.warnings]
    if result.files:
        diffs = result.check_diffs
        lines.append(f"\nexported to {result.out_dir}: {', '.join(p.name for p in result.files)}")
        lines.append("  outputs vs torch (relative): " + ", ".join(f"model.{kind} {diffs[f'{kind}_max_rel_diff']:.2g}"
                                                             for kind in ("pt2", "onnx") if f"{kind}_max_rel_diff" in diffs))
    if result.export_run_id:
        lines.append(f"MLflow export run {result.export_run_id} (parent {record.run_id}), model {result.model_uri}")
    if result.registered:
        name, version, alias = result.registered
        lines.append(f"registered: {name} version {version}, alias {alias} -> mlflow.pytorch.load_model(\"models:/{name}@{alias}\")")
    if result.final is None:
        lines.append(f"\nrebuild and ship it: secateurs pick {record.run_id} ... --out DIR [--register NAME] [--finetune-epochs N]")
    return "\n".join(lines)
