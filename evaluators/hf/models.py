"""Hugging Face Transformers models secateurs can prune: the supported families, how a model is
loaded from a ``save_pretrained`` directory or built with fresh weights from a config dict, and the
refusals (no config, a family that cannot be pruned) that come before any trial.

A :class:`Family` says where an architecture keeps what the pruner cuts: the list of decoder or
encoder layers, and in each layer the query/key/value/output linears of the attention and the input
and output linears of the MLP. Everything else (finding units, slicing, saving) is written once
against these paths.

Nothing here downloads: a directory is read with ``local_files_only=True``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel


class HFModelError(ValueError):
    """A Hugging Face model that secateurs cannot load or prune; the message says what is supported."""


@dataclasses.dataclass(frozen=True)
class Family:
    """Where one transformer architecture keeps its prunable linears (paths relative to one layer).

    ``layers`` is the ``nn.ModuleList`` of decoder/encoder layers under ``model.base_model``.
    ``attention`` is the module whose forward splits q/k/v into heads of ``head_dim`` (its head-count
    attributes are updated when heads go); ``mlp`` the module named for the MLP's neurons.

    >>> FAMILIES["llama"].query, FAMILIES["bert"].mlp_output
    ('self_attn.q_proj', 'output.dense')
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    attention: str
    query: str
    key: str
    value: str
    attention_output: str
    mlp: str
    mlp_inputs: tuple[str, ...]
    mlp_output: str
    heads: tuple[str, ...]  # head classes: keys of HEADS that this family's models come with
    causal: bool = False    # a decoder whose layers take a KV cache (layer_idx must follow the layer's position)


FAMILIES: dict[str, Family] = {
    "llama": Family(
        name="llama", model_types=("llama",), layers="layers", attention="self_attn",
        query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj", attention_output="self_attn.o_proj",
        mlp="mlp", mlp_inputs=("mlp.gate_proj", "mlp.up_proj"), mlp_output="mlp.down_proj",
        heads=("base", "causal_lm", "sequence_classification"), causal=True,
    ),
    "bert": Family(
        name="bert", model_types=("bert",), layers="encoder.layer", attention="attention.self",
        query="attention.self.query", key="attention.self.key", value="attention.self.value",
        attention_output="attention.output.dense",
        mlp="intermediate", mlp_inputs=("intermediate.dense",), mlp_output="output.dense",
        heads=("base", "sequence_classification", "masked_lm"),
    ),
    "vit": Family(
        name="vit", model_types=("vit",), layers="layers", attention="attention",
        query="attention.q_proj", key="attention.k_proj", value="attention.v_proj", attention_output="attention.o_proj",
        mlp="mlp", mlp_inputs=("mlp.fc1",), mlp_output="mlp.fc2",
        heads=("base", "image_classification"),
    ),
}

# Head classes: a name in configs -> the Auto class that builds it.
HEADS: dict[str, str] = {
    "base": "AutoModel",
    "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "masked_lm": "AutoModelForMaskedLM",
    "image_classification": "AutoModelForImageClassification",
}

PRUNED_PREFIX = "secateurs_"  # model_type of a saved model whose layers differ (see evaluators.hf.checkpoint)


def supported() -> str:
    """The supported families, for error messages: ``llama (model_type llama), bert (...)``."""
    return ", ".join(f"{f.name} (model_type {', '.join(f.model_types)})" for f in FAMILIES.values())


def family_of(model_or_config: PreTrainedModel | PretrainedConfig | Mapping[str, Any]) -> Family:
    """The :class:`Family` of a model, a config or a config dict; raises :class:`HFModelError`
    naming the model type and the supported families when secateurs cannot prune it.

    >>> family_of({"model_type": "llama"}).name
    'llama'
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    model_type = str(model_type or "")
    base = model_type[len(PRUNED_PREFIX):] if model_type.startswith(PRUNED_PREFIX) else model_type
    for family in FAMILIES.values():
        if base in family.model_types:
            if _get(config, "add_cross_attention") or _get(config, "is_encoder_decoder"):
                raise HFModelError(f"model_type {model_type!r} with cross-attention (add_cross_attention/is_encoder_decoder) "
                                   f"cannot be pruned by secateurs; supported: {family.name} encoders/decoders without it")
            return family
    raise HFModelError(f"model_type {model_type or '(none)'!r} is not a family secateurs can prune; supported: {supported()}")


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def _auto_class(head: str) -> type:
    if head not in HEADS:
        raise HFModelError(f"head: unknown head {head!r}; valid: {', '.join(HEADS)}")
    return getattr(transformers, HEADS[head])


def _check_head(family: Family, head: str) -> None:
    _auto_class(head)
    if head not in family.heads:
        raise HFModelError(f"head: {family.name} models come as {', '.join(family.heads)}, but got {head!r}")


def read_config(directory: str | Path) -> PretrainedConfig:
    """The config of a ``save_pretrained`` directory, checked to be a family secateurs can prune."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise HFModelError(f"model: {str(path)!r} is not a directory; expected a save_pretrained directory with config.json")
    if not (path / "config.json").is_file():
        raise HFModelError(f"model: {str(path)!r} has no config.json; expected a save_pretrained directory "
                           "(config.json and model.safetensors)")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise HFModelError(f"model: cannot read {str(path / 'config.json')!r} as JSON: {exc}") from None
    family_of(raw)
    _ensure_registered()
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def default_head(config: PretrainedConfig | Mapping[str, Any]) -> str:
    """The head a config's ``architectures`` name (``LlamaForCausalLM`` -> ``causal_lm``), else ``base``."""
    architectures = _get(config, "architectures") or []
    for name in architectures:
        for head, suffix in (("causal_lm", "ForCausalLM"), ("sequence_classification", "ForSequenceClassification"),
                             ("masked_lm", "ForMaskedLM"), ("image_classification", "ForImageClassification")):
            if name.endswith(suffix):
                return head
    return "base"


def load_model(directory: str | Path, head: str | None = None, **kwargs: Any) -> PreTrainedModel:
    """A model from a ``save_pretrained`` directory (dense, or pruned by secateurs), in eval mode.

    ``head`` is a key of :data:`HEADS` (default: the one ``config.json``'s ``architectures`` names);
    ``kwargs`` go to ``from_pretrained`` (e.g. ``num_labels``).
    """
    config = read_config(directory)
    head = head or default_head(config)
    _check_head(family_of(config), head)
    model = _auto_class(head).from_pretrained(str(Path(directory).expanduser()), local_files_only=True, **kwargs)
    return model.eval()


def build_model(config: Mapping[str, Any] | PretrainedConfig, head: str = "base", **overrides: Any) -> PreTrainedModel:
    """A model with fresh weights from a config dict (``{"model_type": "llama", "hidden_size": 64, ...}``)
    or a config object; ``overrides`` update the config (e.g. ``vocab_size``, ``num_labels``).

    >>> m = build_model({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
    ...                  "intermediate_size": 64, "vocab_size": 50}, "sequence_classification", num_labels=2)
    >>> type(m).__name__, m.config.num_labels
    ('BertForSequenceClassification', 2)
    """
    family = family_of(config)
    _check_head(family, head)
    if isinstance(config, PretrainedConfig):
        config = config.to_dict()
    values = {**dict(config), **overrides}
    model_type = values.pop("model_type")
    values.pop("architectures", None)
    _ensure_registered()
    try:
        built = AutoConfig.for_model(model_type, **values)
    except (TypeError, ValueError) as exc:
        raise HFModelError(f"task.model_options: not a valid {model_type} config: {str(exc).strip().splitlines()[-1]}") from None
    return _auto_class(head).from_config(built)


def layers_of(model: nn.Module) -> nn.ModuleList:
    """The decoder/encoder layers of a supported model, in order."""
    family = family_of(model)
    return model.base_model.get_submodule(family.layers)


def layer_prefix(model: nn.Module) -> str:
    """The full module name of the layer list, e.g. ``model.layers`` or ``bert.encoder.layer``."""
    names = {m: n for n, m in model.named_modules()}
    return names[layers_of(model)]


def _ensure_registered() -> None:
    from evaluators.hf import checkpoint  # noqa: F401  (registers the secateurs_* model types)
