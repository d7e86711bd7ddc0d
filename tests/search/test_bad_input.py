"""Bad input a user plausibly gives the ``secateurs`` command, each case run through its entry point
(:func:`search.cli.main`) in a working directory of its own: exit code 2, one line naming the field,
the value and what is valid, no traceback, no MLflow run written, no file outside the working
directory touched, and nothing started (no Ray).

The cases run in this process, for speed: with HOME, TMPDIR, the dense-model cache and the data
root pointed into the case's own sandbox, everything a run could write outside its working
directory lands there, where the test sees it. ``test_bad_input_through_a_real_process`` (an
integration test) runs a sample of the same cases as real ``python -m search.cli`` processes.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from evaluators.models import DigitsCNN, build_model
from search.cli import main
from search.tracking import SearchTracker
from spaces import Policy

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "task": {"name": "digits", "checkpoint": "dense.pt", "dense_epochs": 1},
    "finetune": {"epochs": 0.3},
    "measure": {"warmup": 1, "repeats": 2},
    "search": {"num_trials": 2, "baseline_ratios": [], "max_concurrent": 1},
}


@dataclasses.dataclass
class Case:
    """One bad input: the command line (``{store}``, ``{finished}`` and ``{trial}`` stand for the
    shared MLflow store, a finished search in it and one of its trial runs), the files it needs in
    its working directory, and what its one line must say."""

    id: str
    argv: list[str]
    expect: tuple[str, ...]
    files: dict[str, Callable[[Path], None]] = dataclasses.field(default_factory=dict)
    marks: tuple = ()


def _merge(base: dict, patch: dict) -> dict:
    merged = dict(base)
    for key, value in patch.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def text(body: str | bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(body.encode() if isinstance(body, str) else body)


def config(**patch) -> Callable[[Path], None]:
    return text(yaml.safe_dump(_merge(BASE, patch), sort_keys=False))


def search(patch: dict | None = None, *overrides: str, expect: tuple[str, ...], id: str, files: dict | None = None, marks=()) -> Case:
    """``secateurs search cfg.yaml`` over BASE changed by ``patch`` (and ``--set`` ``overrides``)."""
    argv = ["search", "cfg.yaml", *[a for o in overrides for a in ("--set", o)]]
    return Case(id, argv, expect, {"cfg.yaml": config(**(patch or {})), **(files or {})}, marks)


def yaml_file(id: str, body: str, expect: tuple[str, ...]) -> Case:
    return Case(id, ["search", "cfg.yaml"], expect, {"cfg.yaml": text(body)})


def state_dict(model: torch.nn.Module) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        torch.save(model.state_dict(), path)
    return write


def truncated(path: Path) -> None:
    state_dict(DigitsCNN())(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def pickled_model(path: Path) -> None:
    torch.save(DigitsCNN(), path)


def module(body: str) -> Callable[[Path], None]:
    return text("import torch\nfrom torch import nn\nfrom evaluators.tasks import Task\n" + body)


def tensor_task(x: str, y: str, model: str = "nn.Sequential(nn.Flatten(), nn.Linear(64, 10))", classes: int = 10) -> str:
    """A user module whose ``make_task`` returns a Task of these tensors (as the README shows one)."""
    return (f"def make_task(config):\n    g = torch.Generator().manual_seed(0)\n    x = {x}\n    y = {y}\n"
            f"    return Task(model=lambda: {model}, train_data=(x, y), eval_data=(x[:40], y[:40]), num_classes={classes}, name='user')\n")


GOOD_X, GOOD_Y = "torch.randn(200, 1, 8, 8, generator=g)", "torch.randint(0, 10, (200,), generator=g)"

CASES = [
    # --- the config file itself
    yaml_file("yaml-list", "- task\n- search\n", ("config", "top level", "mapping", "list")),
    yaml_file("yaml-empty", "", ("config", "empty", "section")),
    yaml_file("yaml-only-comments", "# nothing here yet\n", ("config", "empty", "section")),
    yaml_file("yaml-scalar", "quickstart\n", ("config", "top level", "mapping", "str")),
    yaml_file("yaml-tabs", "search:\n\tnum_trials: 4\n", ("line 2", "tab")),
    yaml_file("yaml-unclosed-bracket", "space:\n  criteria: [l1, l2\n", ("not valid YAML", "line")),
    yaml_file("yaml-section-twice", "search:\n  num_trials: 4\nsearch:\n  seed: 1\n", ("search", "twice", "lines 1 and 3")),
    yaml_file("yaml-key-twice", "search:\n  num_trials: 4\n  num_trials: 8\n", ("num_trials", "twice", "lines 2 and 3")),
    yaml_file("yaml-section-null", "search:\n", ("search", "mapping", "null")),
    yaml_file("yaml-section-list", "search: [num_trials, 4]\n", ("search", "mapping", "list")),
    Case("config-missing", ["search", "nope.yaml"], ("nope.yaml", "does not exist")),
    Case("config-is-a-directory", ["search", "configs"], ("configs", "directory"), {"configs": lambda p: p.mkdir()}),
    Case("config-not-text", ["search", "cfg.yaml"], ("cfg.yaml", "UTF-8"), {"cfg.yaml": text(b"\xff\xfe\x00search")}),
    search({"searc": {"num_trials": 4}}, expect=("searc", "valid keys", "search"), id="unknown-section"),
    search({"search": {"num_trails": 4}}, expect=("search.num_trails", "valid keys", "num_trials"), id="unknown-key"),
    # --- types and ranges
    search({"search": {"num_trials": -1}}, expect=("search.num_trials", ">= 0", "-1"), id="num-trials-negative"),
    search({"search": {"num_trials": "ten"}}, expect=("search.num_trials", "integer", "ten"), id="num-trials-string"),
    search({"search": {"num_trials": 2.5}}, expect=("search.num_trials", "integer", "2.5"), id="num-trials-float"),
    search({"search": {"num_trials": 0}}, expect=("search.num_trials", "0", "nothing to run"), id="num-trials-zero-no-baselines"),
    search({"search": {"max_concurrent": 0}}, expect=("search.max_concurrent", ">= 1", "0"), id="max-concurrent-zero"),
    search({"search": {"population_size": 1}}, expect=("search.population_size", ">= 2", "1"), id="population-one"),
    search({"search": {"sampler": "bayes"}}, expect=("search.sampler", "bayes", "nsga2"), id="unknown-sampler"),
    search({"search": {"cpus_per_trial": 0}}, expect=("search.cpus_per_trial", "> 0", "0"), id="cpus-zero"),
    search({"search": {"gpus_per_trial": -1}}, expect=("search.gpus_per_trial", ">= 0", "-1"), id="gpus-negative"),
    search({"search": {"time_budget_s": 0}}, expect=("search.time_budget_s", "> 0", "0"), id="time-budget-zero"),
    search({"search": {"patience": 0}}, expect=("search.patience", ">= 1", "0"), id="patience-zero"),
    search({"search": {"refine": {"share": 1.0}, "time_budget_s": 60}}, expect=("search.refine.share", "0 < share < 1", "1.0"), id="refine-share-one"),
    search({"search": {"refine": {"share": 0.4}}}, expect=("search.refine", "share 0.4", "time_budget_s", "null"), id="refine-share-no-budget"),
    search({"search": {"max_failures": -2}}, expect=("search.max_failures", ">= 0", "-2"), id="max-failures-negative"),
    search({"search": {"baseline_ratios": [1.5]}}, expect=("search.baseline_ratios", "0 < ratio < 1", "1.5"), id="baseline-ratio-above-one"),
    search({"search": {"baseline_ratios": [0.0]}}, expect=("search.baseline_ratios", "0 < ratio < 1", "0.0"), id="baseline-ratio-zero"),
    search({"search": {"baselines": ["magnitude"]}}, expect=("search.baselines", "magnitude", "uniform"), id="unknown-baseline"),
    search({"search": {"screening": {"fine_tunes": 0}}}, expect=("search.screening.fine_tunes", ">= 1", "0"), id="fine-tunes-zero"),
    search({"search": {"sensitivity": {"ratios": [1.2]}}}, expect=("search.sensitivity.ratios", "0 < ratio < 1", "1.2"), id="sensitivity-ratio"),
    search({"space": {"ratio": {"low": 0.6, "high": 0.2}}}, expect=("space.ratio", "low <= high", "low=0.6, high=0.2"), id="low-above-high"),
    search({"space": {"ratio": {"low": -0.1, "high": 0.5}}}, expect=("space.ratio", "0 <= ratio < 1", "-0.1"), id="ratio-negative"),
    search({"space": {"ratio": {"low": 0.0, "high": 1.0}}}, expect=("space.ratio", "0 <= ratio < 1", "1.0"), id="ratio-one"),
    search({"space": {"ratio": {"low": 0.0, "high": 0.5, "step": 0}}}, expect=("space.ratio", "step", "0"), id="ratio-step-zero"),
    search({"space": {"criteria": ["l3"]}}, expect=("space.criteria", "l3", "l1"), id="unknown-criterion"),
    search({"space": {"criteria": []}}, expect=("space.criteria", "at least one"), id="no-criteria"),
    search({"space": {"criteria": "l1"}}, expect=("space.criteria", "list", "l1"), id="criteria-not-a-list"),
    search({"space": {"granularity": ["filter"]}}, expect=("space.granularity", "filter", "channel"), id="unknown-granularity"),
    search({"space": {"rules": [{"match": "features.9*", "high": 0.3}]}}, expect=("space.rules[0].match", "features.9*", "features.0"),
           id="rule-matches-nothing"),
    search({"space": {"rules": [{"high": 0.3}]}}, expect=("space.rules[0]", "match", "regex"), id="rule-without-match"),
    search({"space": {"rules": [{"regex": "features.(", "high": 0.3}]}}, expect=("space.rules[0]", "regex", "features.("), id="rule-bad-regex"),
    search({"finetune": {"epochs": -1}}, expect=("finetune.epochs", "-1"), id="finetune-epochs-negative"),
    search({"finetune": {"lr": 0}}, expect=("finetune.lr", "> 0", "0"), id="finetune-lr-zero"),
    search({"finetune": {"optimizer": "adamw2"}}, expect=("finetune.optimizer", "adamw2", "sgd"), id="unknown-optimizer"),
    search({"finetune": {"momentum": 1.0}}, expect=("finetune.momentum", "0 <= momentum < 1", "1.0"), id="finetune-momentum-one"),
    search({"measure": {"backend": "tensorrt"}}, expect=("measure.backend", "tensorrt", "onnxruntime"), id="unknown-measure-backend"),
    search({"measure": {"repeats": 0}}, expect=("measure.repeats", ">= 1", "0"), id="measure-repeats-zero"),
    search({"measure": {"batch_size": 0}}, expect=("measure.batch_size", ">= 1", "0"), id="measure-batch-zero"),
    search({"measure": {"device": "cuda"}}, expect=("measure.device", "cuda", "no CUDA device"), id="measure-cuda-without-gpu"),
    search({"tracking": {"experiment": " "}}, expect=("tracking.experiment", "non-empty"), id="experiment-blank"),
    # --- constraints
    search({"search": {"constraints": ["accuracy >>= 0.9"]}}, expect=("search.constraints", "accuracy >>= 0.9"), id="constraint-operator"),
    search({"search": {"constraints": ["acuracy >= 0.9"]}}, expect=("search.constraints", "acuracy", "accuracy"), id="constraint-unknown-metric"),
    search({"search": {"objectives": {"acuracy": "max", "latency_ms": "min"}}}, expect=("search.objectives", "acuracy", "accuracy"),
           id="objective-unknown-score"),
    search({"search": {"objectives": {"accuracy": "max", "latency_ms": "max"}}}, expect=("objectives.latency_ms", "cost", "max"),
           id="objective-cost-maximised"),
    search({"search": {"constraints": ["latency_ms <="]}}, expect=("search.constraints", "latency_ms <="), id="constraint-no-bound"),
    search({"search": {"constraints": ["macs <= 0.5 * dens"]}}, expect=("search.constraints", "dens"), id="constraint-bad-reference"),
    search({"search": {"constraints": "accuracy >= 0.9"}}, expect=("search.constraints", "list"), id="constraints-not-a-list"),
    # --- --set overrides
    search(None, "search.num_trials", expect=("--set", "search.num_trials", "KEY=VALUE"), id="set-without-equals"),
    search(None, "search.num_trials=[1", expect=("--set", "search.num_trials=[1", "YAML"), id="set-bad-yaml"),
    search(None, "search.num_trail=3", expect=("search.num_trail", "valid keys", "num_trials"), id="set-unknown-key"),
    search(None, "search=3", expect=("search", "3"), id="set-section-to-value"),
    search(None, "search.num_trials=abc", expect=("search.num_trials", "integer", "abc"), id="set-wrong-type"),
    search(None, "search.max_concurrent=0", expect=("search.max_concurrent", ">= 1", "0"), id="set-max-concurrent-zero"),
    search(None, "=4", expect=("--set", "=4", "KEY=VALUE"), id="set-empty-key"),
    # --- the task
    search({"task": {"name": "imagenet"}}, expect=("task.name", "imagenet", "digits"), id="unknown-task"),
    search({"task": {"model": "resnet1000"}}, expect=("task.model", "resnet1000", "resnet20"), id="unknown-model"),
    search({"task": {"dense_epochs": 0}}, expect=("task.dense_epochs", ">= 1", "0"), id="dense-epochs-zero"),
    search({"task": {"name": "cifar10", "options": {"train_sise": 100}}}, expect=("task.options", "train_sise", "train_size"),
           id="unknown-task-option"),
    search({"task": {"name": "no_such_module:make_task"}}, expect=("task.name", "no_such_module"), id="user-task-not-found"),
    search({"task": {"name": "user_ok:make_tsak"}}, expect=("task.name", "make_tsak"), id="user-task-no-factory",
           files={"user_ok.py": module(tensor_task(GOOD_X, GOOD_Y))}),
    search({"task": {"name": "user_raises:make_task"}}, expect=("task.name", "user_raises", "RuntimeError", "share is not mounted"),
           id="user-task-raises-on-import", files={"user_raises.py": text("raise RuntimeError('the data share is not mounted')\n")}),
    search({"task": {"name": "user_factory_raises:make_task"}}, expect=("task.name", "user_factory_raises", "FileNotFoundError", "x.npy"),
           id="user-task-factory-raises",
           files={"user_factory_raises.py": text("def make_task(config):\n    open('/nonexistent/x.npy')\n")}),
    search({"task": {"name": "user_none:make_task"}}, expect=("task.name", "user_none", "None"), id="user-task-returns-none",
           files={"user_none.py": text("def make_task(config):\n    return None\n")}),
    search({"task": {"name": "user_classes:make_task", "checkpoint": None}}, expect=("Task.model", "(8, 3)", "10 classes"),
           id="user-task-wrong-number-of-classes",
           files={"user_classes.py": module(tensor_task(GOOD_X, GOOD_Y, "nn.Sequential(nn.Flatten(), nn.Linear(64, 3))"))}),
    search({"task": {"name": "user_nan:make_task", "checkpoint": None}}, expect=("train_data", "NaN", "finite"), id="nan-in-the-data",
           files={"user_nan.py": module(tensor_task(GOOD_X + ".index_fill(0, torch.tensor([7]), float('nan'))", GOOD_Y))}),
    search({"task": {"name": "user_labels:make_task", "checkpoint": None}}, expect=("train_data", "labels", "[0, 9]", "12"),
           id="labels-out-of-range", files={"user_labels.py": module(tensor_task(GOOD_X, "torch.full((200,), 12)"))}),
    # --- data files of the built-in tasks
    search({"task": {"name": "cifar10", "checkpoint": None, "data_root": "cifar10.npz"}}, expect=("cifar10", "cifar10.npz", "npz"),
           id="cifar-npz-corrupt", files={"cifar10.npz": text(b"PK\x03\x04 not really a zip")}),
    search({"task": {"name": "cifar10", "checkpoint": None, "data_root": "nodata"}}, expect=("cifar10", "nodata"), id="cifar-missing"),
    search({"task": {"name": "sst2", "checkpoint": None, "data_root": "sst2.csv"}}, expect=("sst2", "sst2.csv", "label"),
           id="sst2-columns", files={"sst2.csv": text("sentence,polarity\ngood film,1\n")}),
    search({"task": {"name": "fashion_mnist", "checkpoint": None, "data_root": "fm"}}, expect=("fashion_mnist", "fm"),
           id="fashion-mnist-empty-dir", files={"fm": lambda p: p.mkdir()}),
    # --- the dense checkpoint
    search({"task": {"checkpoint": "missing.pt"}}, expect=("task.checkpoint", "missing.pt", "does not exist"), id="checkpoint-missing"),
    search({"task": {"checkpoint": "ckpt"}}, expect=("task.checkpoint", "ckpt"), id="checkpoint-is-a-directory", files={"ckpt": lambda p: p.mkdir()}),
    search(None, expect=("task.checkpoint", "dense.pt", "state dict"), id="checkpoint-empty", files={"dense.pt": text(b"")}),
    search(None, expect=("task.checkpoint", "dense.pt", "state_dict"), id="checkpoint-corrupt", files={"dense.pt": text(bytes(range(256)) * 16)}),
    search(None, expect=("task.checkpoint", "dense.pt", "state dict"), id="checkpoint-truncated", files={"dense.pt": truncated}),
    search(None, expect=("task.checkpoint", "dense.pt", "DigitsCNN"), id="checkpoint-of-another-model",
           files={"dense.pt": state_dict(build_model("mlp", num_classes=10, in_features=64))}),
    search(None, expect=("task.checkpoint", "dense.pt", "DigitsCNN", "state_dict()"), id="checkpoint-full-pickled-model",
           files={"dense.pt": pickled_model}),
    search(None, expect=("task.checkpoint", "dense.pt", "state_dict"), id="checkpoint-is-json", files={"dense.pt": text('{"weights": [1, 2]}')}),
    search(None, expect=("task.checkpoint", "dense.pt", "list", "state dict"), id="checkpoint-a-list-of-tensors",
           files={"dense.pt": lambda p: torch.save([torch.zeros(3)], p)}),
    # --- what the model and the space allow (checked before any work)
    search({"task": {"model": "mlp"}, "space": {"criteria": ["bn_scale"]}}, expect=("bn_scale", "BatchNorm"), id="bn-scale-without-batchnorm",
           files={"dense.pt": state_dict(build_model("mlp", num_classes=10, in_features=64))}),
    search({"space": {"granularity": ["unstructured"], "criteria": ["fpgm"]}}, expect=("fpgm", "unstructured", "l1"),
           id="criterion-for-another-granularity"),
    # --- resources the machine does not have
    search({"search": {"gpus_per_trial": 1}}, expect=("search.gpus_per_trial", "1", "GPU"), id="gpus-without-gpu"),
    search({"search": {"cpus_per_trial": 512}}, expect=("search.cpus_per_trial", "512", "CPU"), id="more-cpus-than-the-machine"),
    # --- --resume
    Case("resume-and-config", ["search", "cfg.yaml", "--resume", "abc"], ("--resume", "config"), {"cfg.yaml": config()}),
    Case("no-config-no-resume", ["search"], ("CONFIG", "--resume")),
    Case("resume-unknown-run", ["search", "--resume", "0123456789abcdef0123456789abcdef", "--tracking-uri", "{store}"],
         ("--resume", "0123456789abcdef0123456789abcdef", "not in the tracking store")),
    Case("resume-garbage-id", ["search", "--resume", "../etc", "--tracking-uri", "{store}"], ("--resume", "../etc")),
    Case("resume-finished-search", ["search", "--resume", "{finished}", "--tracking-uri", "{store}"], ("--resume", "{finished}", "already finished")),
    Case("resume-a-trial-run", ["search", "--resume", "{trial}", "--tracking-uri", "{store}"], ("--resume", "{trial}", "not a search")),
    Case("resume-no-store", ["search", "--resume", "0123456789abcdef0123456789abcdef"], ("mlflow.db", "no MLflow store")),
    # --- pick, frontier, compare, ui
    Case("pick-out-is-a-file", ["pick", "{finished}", "--out", "model.pt", "--tracking-uri", "{store}"], ("--out", "model.pt", "not a directory"),
         {"model.pt": text(b"x")}),
    Case("pick-unknown-run", ["pick", "0123456789abcdef0123456789abcdef", "--tracking-uri", "{store}"],
         ("0123456789abcdef0123456789abcdef", "not found")),
    Case("pick-a-trial-run", ["pick", "{trial}", "--tracking-uri", "{store}"], ("{trial}", "not a search", "{finished}")),
    Case("pick-unknown-trial", ["pick", "{finished}", "--trial", "99", "--tracking-uri", "{store}"], ("99",)),
    Case("pick-where-unknown-metric", ["pick", "{finished}", "--where", "speed < 1", "--tracking-uri", "{store}"], ("speed",)),
    Case("pick-alias-without-register", ["pick", "{finished}", "--alias", "prod", "--tracking-uri", "{store}"], ("--alias", "--register")),
    Case("pick-negative-epochs", ["pick", "{finished}", "--finetune-epochs", "-1", "--out", "x", "--tracking-uri", "{store}"],
         ("--finetune-epochs", ">= 0", "-1")),
    Case("frontier-no-store", ["frontier", "0123456789abcdef0123456789abcdef"], ("mlflow.db", "no MLflow store")),
    Case("compare-a-trial-run", ["compare", "{finished}", "{trial}", "--tracking-uri", "{store}"], ("{trial}", "not a search")),
    Case("ui-port-out-of-range", ["ui", "--port", "70000", "--tracking-uri", "{store}"], ("--port", "1..65535", "70000")),
    Case("ui-no-store", ["ui"], ("mlflow.db", "no MLflow store")),
]


def _tracking_cases() -> list[Case]:
    """Tracking URIs a search cannot write to, probed before any work."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]  # nothing listens there once the socket is closed
    cfg = {"cfg.yaml": config()}
    return [
        Case("tracking-proc", ["search", "cfg.yaml", "--tracking-uri", "sqlite:////proc/x/mlflow.db"], ("--tracking-uri", "/proc/x"), cfg),
        Case("tracking-under-a-file", ["search", "cfg.yaml", "--tracking-uri", "sqlite:///afile/mlflow.db"], ("--tracking-uri", "afile", "not a directory"),
             {**cfg, "afile": text(b"x")}),
        Case("tracking-unknown-scheme", ["search", "cfg.yaml", "--tracking-uri", "sqlit:///mlflow.db"], ("--tracking-uri", "sqlit", "sqlite"), cfg),
        Case("tracking-server-down", ["search", "cfg.yaml", "--tracking-uri", f"http://127.0.0.1:{closed_port}"],
             ("--tracking-uri", f"127.0.0.1:{closed_port}", "reach"), cfg),
        Case("tracking-not-a-database", ["search", "cfg.yaml", "--tracking-uri", "sqlite:///notes.txt"], ("--tracking-uri", "notes.txt", "database"),
             {**cfg, "notes.txt": text("these are my notes\n" * 50)}),
        Case("tracking-env-unwritable", ["search", "cfg.yaml"], ("MLFLOW_TRACKING_URI", "/proc/x"), cfg),
    ]


CASES += _tracking_cases()


@pytest.fixture(scope="module")
def store(tmp_path_factory, new_store) -> dict[str, str]:
    """An MLflow store holding one finished search (a trial and its frontier) and its ids."""
    root = tmp_path_factory.mktemp("store")
    uri = new_store(root)
    tracker = SearchTracker(uri)
    tracker.group_names = ["features.0"]
    config()(root / "config.yaml")
    tracker.start_search("bad-input", "finished", config_yaml=(root / "config.yaml").read_text(), params={})
    checkpoint = root / "dense.pt"
    torch.save(DigitsCNN().state_dict(), checkpoint)
    tracker.log_dense({"accuracy": 0.9, "latency_ms": 1.0, "size_mb": 0.4, "macs": 1000, "params": 100}, str(checkpoint))
    metrics = {"accuracy": 0.8, "accuracy_drop": 0.1, "latency_ms": 0.5, "size_mb": 0.2, "macs": 500, "params": 50}
    trial = tracker.log_trial(1, Policy(criterion="l1", ratios={"features.0": 0.5}), metrics)
    tracker.tag_pareto({trial: True})
    tracker.end_search("FINISHED")
    return {"store": uri, "finished": tracker.parent_run_id, "trial": trial, "root": str(root)}


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (but ``skip``) with its size and modification time."""
    found = {}
    for path in root.rglob("*"):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_file():
            stat = path.stat()
            found[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return found


def sandbox(case: Case, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The case's working directory, its files written, and the environment that points everything
    a run could write outside it (home, temporary files, caches, data) into ``tmp_path``."""
    work, home, tmp = tmp_path / "work", tmp_path / "home", tmp_path / "tmp"
    for folder in (work, home, tmp):
        folder.mkdir()
    torch.save(DigitsCNN().state_dict(), work / "dense.pt")
    for name, write in case.files.items():
        write(work / name)
    env = {"HOME": str(home), "TMPDIR": str(tmp), "SECATEURS_CACHE": str(home / ".cache" / "secateurs"),
           "SECATEURS_DATA": str(home / "data")}
    if case.id == "tracking-env-unwritable":
        env["MLFLOW_TRACKING_URI"] = "sqlite:////proc/x/mlflow.db"
    return work, env


def run_in_process(case: Case, tmp_path: Path, store: dict[str, str], monkeypatch, capfd) -> tuple[int, str, Path]:
    """Run the case through :func:`search.cli.main` in this process; returns its exit code and output."""
    work, env = sandbox(case, tmp_path)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))  # user task modules, as `python -m` finds them in its directory
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(tempfile, "tempdir", env["TMPDIR"])
    argv = [a.format(**store) for a in case.argv]
    outside = snapshot(tmp_path, skip=work) | snapshot(Path(store["root"]))
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    output = "".join(capfd.readouterr())
    assert snapshot(tmp_path, skip=work) | snapshot(Path(store["root"])) == outside, "files outside the working directory changed"
    return code, output, work


def runs_in(store: dict[str, str]) -> dict[str, str]:
    client = MlflowClient(store["store"])
    experiments = [e.experiment_id for e in client.search_experiments(view_type=3)]
    return {r.info.run_id: r.info.status for r in client.search_runs(experiments, run_view_type=3)}


def check_one_clean_line(case: Case, code: int, output: str, work: Path, store: dict[str, str]) -> None:
    lines = output.strip().splitlines()
    assert code == 2, output[-3000:]
    assert "Traceback" not in output
    assert len(lines) == 1 and lines[0].startswith("secateurs: error: "), output[-3000:]
    for part in case.expect:
        assert part.format(**store) in lines[0], f"{part!r} not in: {lines[0]}"
    assert not (work / "mlflow.db").exists() and not (work / "mlruns").exists()  # no MLflow store written here


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_gives_one_clean_line(case: Case, tmp_path, store, monkeypatch, capfd):
    from search import ray_runtime

    rays: list = []  # Ray is not started, nor connected to (another test may have left this process one up)
    monkeypatch.setattr(ray_runtime, "init_ray", lambda *args, **kwargs: rays.append(args) or True)
    before = runs_in(store)
    started = time.monotonic()
    code, output, work = run_in_process(case, tmp_path, store, monkeypatch, capfd)
    check_one_clean_line(case, code, output, work, store)
    assert runs_in(store) == before  # no run written or changed in the shared store
    assert rays == []
    assert time.monotonic() - started < 30, "a bad input must be found before any work"


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


SAMPLE = ("yaml-section-twice", "gpus-without-gpu", "tracking-server-down", "checkpoint-full-pickled-model",
          "user-task-raises-on-import", "bn-scale-without-batchnorm", "resume-finished-search", "pick-out-is-a-file")


@pytest.mark.integration
@pytest.mark.parametrize("case", [c for c in CASES if c.id in SAMPLE], ids=lambda c: c.id)
def test_bad_input_through_a_real_process(case: Case, tmp_path, store):
    """The same, as a user runs it: ``python -m search.cli`` in its own process."""
    work, env = sandbox(case, tmp_path)
    environ = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    environ.update(env, PYTHONPATH=str(ROOT))
    before, outside = runs_in(store), snapshot(tmp_path, skip=work) | snapshot(Path(store["root"]))
    done = subprocess.run([sys.executable, "-m", "search.cli", *[a.format(**store) for a in case.argv]], cwd=work, env=environ,
                          capture_output=True, text=True, timeout=120)
    check_one_clean_line(case, done.returncode, done.stdout + done.stderr, work, store)
    assert runs_in(store) == before
    assert snapshot(tmp_path, skip=work) | snapshot(Path(store["root"])) == outside, "files outside the working directory changed"
