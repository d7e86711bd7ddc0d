"""The search config: YAML file + ``--set`` overrides, validated before any work starts."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import pydantic
import yaml

from evaluators.pruning import CRITERIA
from evaluators.deploy import check_quantization
from evaluators.tasks import TaskConfig
from evaluators.train import OPTIMIZERS
from evaluators.trial import FinetuneConfig, MeasureConfig
from spaces import SpaceConfig
from search.baselines import BASELINES, check_kinds, default_kinds
from search.constraints import Constraint
from search.objectives import check_declared
from search.samplers import SAMPLERS
from search.refine import RefineSettings
from search.screening import ScreeningSettings


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the field, the value and what is valid."""


@dataclasses.dataclass(frozen=True)
class SensitivitySettings:
    """``search.sensitivity``: prune each searched group alone, score it with a cheap proxy (accuracy
    after BatchNorm re-calibration, no fine-tuning), log the table and plot, then use it."""

    __pydantic_config__ = {"extra": "forbid"}

    ratios: list[float] = dataclasses.field(default_factory=lambda: [0.25, 0.5, 0.75])  # tried per group (clipped to its range)
    samples: int | None = 1000     # test examples the proxy scores (null = all)
    bn_batches: int = 8            # training batches that re-estimate BatchNorm statistics
    seed_drops: list[float] = dataclasses.field(default_factory=lambda: [0.02, 0.05, 0.1])  # first sampled policies: each group at its ratio for this proxy drop
    seed_latency: list[float] = dataclasses.field(default_factory=list)  # first sampled policies at these fractions of the dense latency, allocated by drop per ms saved
    seed_macs: list[float] | None = None  # first sampled policies at or under these fractions of the dense MACs, allocated by drop per MAC saved (null: at each `macs <= X * dense` constraint)
    narrow: float | None = None    # cap each group's range at the ratio where its proxy drop reaches this (null = keep the ranges)

    def __post_init__(self) -> None:
        if not self.ratios:
            raise ValueError("ratios: must list at least one ratio")
        for ratio in self.ratios:
            if not 0 < ratio < 1:
                raise ValueError(f"ratios: each must satisfy 0 < ratio < 1, but got {ratio!r}")
        for drop in self.seed_drops:
            if not 0 <= drop <= 1:
                raise ValueError(f"seed_drops: each must satisfy 0 <= drop <= 1, but got {drop!r}")
        for fraction in self.seed_latency:
            if not 0 < fraction < 1:
                raise ValueError(f"seed_latency: each must be a fraction of the dense model's latency, 0 < fraction < 1, but got {fraction!r}")
        for fraction in self.seed_macs or []:
            if not 0 < fraction < 1:
                raise ValueError(f"seed_macs: each must be a fraction of the dense model's MACs, 0 < fraction < 1, but got {fraction!r}")
        if self.narrow is not None and not 0 < self.narrow <= 1:
            raise ValueError(f"narrow: must satisfy 0 < narrow <= 1 (or be null), but got {self.narrow!r}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples: must be >= 1 or null, but got {self.samples}")
        if self.bn_batches < 0:
            raise ValueError(f"bn_batches: must be >= 0, but got {self.bn_batches}")


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """The ``search:`` section: the budget, the sampler and how trials run."""

    __pydantic_config__ = {"extra": "forbid"}

    num_trials: int = 24           # sampled policies evaluated (after the baselines)
    seed: int = 0                  # seeds the sampler and every criterion / fine-tune
    sampler: str = "nsga2"         # see search.samplers.SAMPLERS
    population_size: int = 8       # NSGA-II/III generation size
    max_concurrent: int = 2        # trials running at once
    cpus_per_trial: float = 1.0    # Ray CPU resources per trial
    gpus_per_trial: float = 0.0    # Ray GPU resources per trial; fractions (0.25) pack small trials on one GPU
    storage_path: str | None = None  # Ray Tune experiment state (default: <tmp>/secateurs-ray); shared FS or URI on a cluster
    baseline_ratios: list[float] = dataclasses.field(default_factory=lambda: [0.25, 0.5, 0.75])  # levels of the baselines evaluated first (extra to num_trials)
    baselines: list[str] | None = None  # uniform, global_magnitude, lamp, erk (null = those that apply to the first granularity)
    sensitivity: SensitivitySettings | None = None  # per-group sensitivity analysis first (null = off; {} = defaults)
    screening: ScreeningSettings | None = None  # multi-fidelity: fine-tune only trials no screened trial dominates (null = off)
    refine: RefineSettings | None = None  # fine-tune the best frontier candidates longer at the end (null = off)
    objectives: dict[str, str] | None = None  # e.g. {rmse: min, latency_ms: min, size_mb: min}; null = the task's scores + latency_ms, size_mb
    constraints: list[str] = dataclasses.field(default_factory=list)  # e.g. "accuracy_drop <= 0.01", "macs <= 0.5 * dense"
    patience: int | None = None    # stop once this many trials in a row did not grow the hypervolume
    time_budget_s: float | None = None  # wall seconds for the whole command (earlier sessions of a resumed search included); the end is budgeted too
    remeasure: bool = True         # re-time the dense model and the frontier at the end, together (round-robin)
    max_failures: int = 0          # times Ray retries a failed trial (its worker died, or it raised)

    @property
    def fine_tune_budget(self) -> int | None:
        """``screening.fine_tunes``: the sampled trials to fine-tune before the search stops (None: no such budget)."""
        return self.screening.fine_tunes if self.screening else None

    def __post_init__(self) -> None:
        if self.num_trials < 0:
            raise ValueError(f"num_trials: must be >= 0, but got {self.num_trials}")
        for kind in self.baselines or ():
            if kind not in BASELINES:
                raise ValueError(f"baselines: unknown baseline {kind!r}; valid: {', '.join(BASELINES)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: unknown sampler {self.sampler!r}; valid: {', '.join(sorted(SAMPLERS))}")
        if self.population_size < 2:
            raise ValueError(f"population_size: must be >= 2, but got {self.population_size}")
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent: must be >= 1, but got {self.max_concurrent}")
        for ratio in self.baseline_ratios:
            if not 0 < ratio < 1:
                raise ValueError(f"baseline_ratios: each must satisfy 0 < ratio < 1, but got {ratio!r}")
        check_declared(self.objectives)
        for text in self.constraints:
            try:
                Constraint.parse(text, metrics=None)  # the metric names are checked against the task's scores before any trial
            except ValueError as exc:
                raise ValueError(f"constraints: {exc}") from None
        if self.time_budget_s is not None and not 0 < self.time_budget_s < float("inf"):
            raise ValueError(f"time_budget_s: must be a number of seconds > 0 or null, but got {self.time_budget_s}")
        if self.refine is not None and self.refine.share is not None and self.time_budget_s is None:
            raise ValueError(f"refine: share {self.refine.share:g} is a part of time_budget_s, which is null; "
                             "set search.time_budget_s, or refine.epochs instead of share")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience: must be >= 1 or null, but got {self.patience}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures: must be >= 0, but got {self.max_failures}")
        if self.gpus_per_trial < 0:
            raise ValueError(f"gpus_per_trial: must be >= 0, but got {self.gpus_per_trial}")
        if not self.cpus_per_trial > 0:
            raise ValueError(f"cpus_per_trial: must be > 0, but got {self.cpus_per_trial}")


@dataclasses.dataclass(frozen=True)
class TrackingSettings:
    """The ``tracking:`` section: where MLflow records the search."""

    __pydantic_config__ = {"extra": "forbid"}

    experiment: str = "secateurs"  # MLflow experiment name
    run_name: str | None = None    # parent run name (default: the config file's stem)

    def __post_init__(self) -> None:
        if not self.experiment.strip():
            raise ValueError("experiment: must be a non-empty MLflow experiment name")


class Config(pydantic.BaseModel):
    """A whole search, as written in ``configs/*.yaml``."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    task: TaskConfig = TaskConfig()
    space: SpaceConfig = SpaceConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    measure: MeasureConfig = MeasureConfig()
    search: SearchSettings = SearchSettings()
    tracking: TrackingSettings = TrackingSettings()

    @pydantic.field_validator("space")
    @classmethod
    def _known_criteria(cls, space: SpaceConfig) -> SpaceConfig:
        for name in space.finetune_optimizers:
            if name not in OPTIMIZERS:
                raise ValueError(f"finetune_optimizers: unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
        for name in space.criteria:
            if name not in CRITERIA:
                raise ValueError(f"criteria: unknown criterion {name!r}; valid: {', '.join(sorted(CRITERIA))}")
        return space

    @pydantic.model_validator(mode="after")
    def _runs_something(self) -> Config:
        try:
            check_kinds(self.search.baselines or (), self.space.granularity[0])
        except ValueError as exc:
            raise ValueError(f"search.{exc}") from None
        if self.search.num_trials == 0 and not (self.baseline_kinds() and self.search.baseline_ratios):
            raise ValueError("search.num_trials: is 0 and there are no baselines (search.baselines, search.baseline_ratios): nothing to run")
        check_quantization(self.space.quantization, self.measure.backend, self.measure.device)  # int8 the backend cannot run
        return self

    def baseline_kinds(self) -> list[str]:
        """The baselines this search runs: ``search.baselines``, else those for its first granularity."""
        if self.search.baselines is not None:
            return list(self.search.baselines)
        return default_kinds(self.space.granularity[0])

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _valid_keys(loc: Sequence[Any]) -> list[str]:
    """Field names valid at the parent of ``loc`` (for 'unknown key' messages)."""
    node: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = _fields_of(node)
        if part not in fields:
            return []
        node = fields[part]
        args = getattr(node, "__args__", None)
        if args:  # list[Rule] -> Rule
            node = args[0]
    return sorted(_fields_of(node))


def _fields_of(node: Any) -> dict[str, Any]:
    if isinstance(node, type) and issubclass(node, pydantic.BaseModel):
        return {name: f.annotation for name, f in node.model_fields.items()}
    if dataclasses.is_dataclass(node):
        hints = __import__("typing").get_type_hints(node)
        return {f.name: hints[f.name] for f in dataclasses.fields(node)}
    return {}


def _format_error(error: dict[str, Any]) -> str:
    loc = [p for p in error["loc"]]
    path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
    kind = error["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        valid = _valid_keys(loc)
        return f"unknown key `{path}`; valid keys here: {', '.join(valid)}"
    message = error["msg"]
    if kind in ("dataclass_type", "model_type", "dict_type"):  # a section (or a nested one) that is not a mapping
        value = error.get("input")
        valid = ", ".join(_valid_keys([*loc, None]))
        got = "nothing (null)" if value is None else f"{type(value).__name__} {value!r}"
        return f"`{path}`: must be a mapping of its fields ({valid}), but got {got}"
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
        head, sep, rest = message.partition(": ")
        if sep and head.replace(".", "_").isidentifier():  # "epochs: must be ..." -> "finetune.epochs: must be ..."
            return f"`{path}.{head}`: {rest}" if path else f"`{head}`: {rest}"
        return f"`{path}`: {message}"
    value = error.get("input")
    return f"`{path}`: {message} (got {value!r})"


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["search.num_trials=8", "space.criteria=[l1,l2]"]`` -> nested dict (values parsed as YAML)."""
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. search.num_trials=8")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc.problem})") from None
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is set both as a value and as a section")
        node[parts[-1]] = value
    return result


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate(data: Any) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: the top level must be a mapping of sections ({', '.join(Config.model_fields)}), "
                          f"but got {type(data).__name__}")
    _refuse_bools_as_numbers(data, _schema())
    try:
        return Config.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(_format_error(exc.errors()[0])) from None


@functools.cache
def _schema() -> dict[str, Any]:
    """The config's JSON schema, built once (building it takes about as long as validating a config)."""
    return Config.model_json_schema()


def _refuse_bools_as_numbers(raw: Any, schema: dict[str, Any], path: str = "", defs: dict[str, Any] | None = None) -> None:
    """A ``true``/``false`` written where only a number goes (pydantic would take it as 1/0): one
    clear error naming the field, before anything else checks the value. ``schema`` is the
    config's JSON schema at ``raw``'s place.

    >>> _refuse_bools_as_numbers({"search": {"num_trials": True}}, _schema())
    Traceback (most recent call last):
    ...
    search.config.ConfigError: `search.num_trials`: must be an integer, but got True
    """
    defs = schema.get("$defs", {}) if defs is None else defs

    def resolved(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = defs.get(node["$ref"].rsplit("/", 1)[-1], {})
        return node

    options = [resolved(o) for o in resolved(schema).get("anyOf", [resolved(schema)])]
    types = {o.get("type") for o in options}
    if isinstance(raw, bool):
        numbers = types & {"integer", "number"}
        if numbers and not types & {"boolean", None}:
            raise ConfigError(f"`{path}`: must be {'a number' if 'number' in numbers else 'an integer'}, but got {raw!r}")
    elif isinstance(raw, dict):
        for option in options:
            if "properties" in option:
                for key, value in raw.items():
                    if key in option["properties"]:
                        _refuse_bools_as_numbers(value, option["properties"][key], f"{path}.{key}" if path else str(key), defs)
                return
    elif isinstance(raw, list):
        for option in options:
            if isinstance(option.get("items"), dict):
                for i, value in enumerate(raw):
                    _refuse_bools_as_numbers(value, option["items"], f"{path}[{i}]", defs)
                return


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{key!r} is given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read ``path``, apply ``--set`` overrides, validate; raises :class:`ConfigError` on any problem.

    >>> load_config("configs/quickstart.yaml", ["search.num_trials=4"]).search.num_trials  # doctest: +SKIP
    4
    """
    path = Path(path)
    where = f"config file {str(path)!r}"
    if path.is_dir():
        raise ConfigError(f"{where} is a directory, not a file; name a YAML config such as configs/quickstart.yaml")
    if not path.is_file():
        raise ConfigError(f"{where} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.start}); save it as UTF-8 YAML") from None
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read ({exc.strerror})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where_in = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if "'\\t'" in problem:  # PyYAML: "found character '\\t' that cannot start any token"
            problem = "a tab character; YAML indents with spaces only"
        raise ConfigError(f"{where} is not valid YAML{where_in}: {problem}") from None
    if data is None:
        raise ConfigError(f"{where} is empty; it needs at least one section ({', '.join(Config.model_fields)}), "
                          "e.g. start from configs/quickstart.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections ({', '.join(Config.model_fields)}), "
                          f"but got {type(data).__name__}")
    return validate(_merge(data, parse_overrides(overrides)))
