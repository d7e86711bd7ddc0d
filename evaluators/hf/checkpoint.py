"""A pruned Hugging Face model saved as a ``save_pretrained`` directory that ``from_pretrained`` loads.

Which config describes the pruned shapes:

1. Every layer alike (the same heads, key/value heads and MLP width; any number of layers) and the
   family's own config can say so: the directory is a plain ``llama``/``bert``/``vit`` one
   (``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``, ``num_hidden_layers``,
   and ``head_dim`` where heads keep their width), which any transformers 5.x loads, with or without
   secateurs. Checked by building the family's class from that config on the meta device and
   comparing every weight's shape.
2. Layers that differ (or shapes the family's config cannot state, e.g. a BERT head count that is
   not ``hidden_size / head width``): ``model_type`` ``secateurs_<family>`` and the per-layer shapes
   in transformers' own heterogeneous-config field ``per_layer_config`` (``{"0": {"intermediate_size":
   96, "num_attention_heads": 4, "num_key_value_heads": 2}, ...}``; only what differs from the global
   values). The global values stay the dense ones: they fix the head width (``head_dim``, or
   ``hidden_size / num_attention_heads`` for BERT), and each layer's entry gives how many heads and
   neurons it keeps. transformers 5.24 stores and validates ``per_layer_config`` but its Llama/BERT/ViT
   modules still read the global sizes, so ``import evaluators.hf`` registers, with ``AutoConfig`` and
   the ``AutoModel*`` classes, a subclass of each family's config and model classes that builds the
   dense layers and then cuts each to its per-layer shape (the same code that pruned it). No
   ``trust_remote_code``, nothing downloaded:

       import evaluators.hf  # registers secateurs_llama, secateurs_bert, secateurs_vit
       model = AutoModelForCausalLM.from_pretrained("pruned/")

   Without that import, transformers refuses the directory with "model type secateurs_llama ... not
   recognized" rather than loading wrong shapes.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto import modeling_auto

from evaluators.hf import pruning
from evaluators.hf.models import FAMILIES, HEADS, PRUNED_PREFIX, Family, family_of

_HEAD_MAPPINGS = {
    "base": modeling_auto.MODEL_MAPPING_NAMES,
    "causal_lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "sequence_classification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "masked_lm": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    "image_classification": modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
}
_HETEROGENEITY_LOGGER = "transformers.integrations.heterogeneity.configuration_utils"

PRUNED_CONFIGS: dict[str, type[PretrainedConfig]] = {}   # family name -> secateurs_<family> config class
PRUNED_MODELS: dict[type, type] = {}                     # family model class -> its secateurs subclass
STOCK_MODELS: dict[type, type] = {}                      # secateurs subclass -> the family model class


@contextlib.contextmanager
def global_values(config: PretrainedConfig) -> Iterator[PretrainedConfig]:
    """Let code that reads the global sizes of a heterogeneous config (``config.intermediate_size``)
    read them, quietly, inside the block."""
    if not getattr(config, "is_heterogeneous", False):
        yield config
        return
    log = logging.getLogger(_HETEROGENEITY_LOGGER)
    level, allowed = log.level, config.allow_global_per_layer_attribute_access
    log.setLevel(logging.ERROR)
    config.allow_global_per_layer_attribute_access = True
    try:
        yield config
    finally:
        if allowed:
            config.allow_global_per_layer_attribute_access = True
        else:  # unset, as it was: the flag would otherwise be written into config.json
            config.__dict__.pop("allow_global_per_layer_attribute_access", None)
        log.setLevel(level)


def _layer_attrs(config: PretrainedConfig) -> tuple[str, ...]:
    """The config attributes a layer's shape is stated in."""
    with global_values(config):
        kv = ("num_key_value_heads",) if hasattr(config, "num_key_value_heads") else ()
    return ("num_attention_heads", *kv, "intermediate_size")


def _shape_values(shape: pruning.LayerShape, attrs: tuple[str, ...]) -> dict[str, int]:
    return {a: getattr(shape, a) for a in attrs}


def _base_dict(model: PreTrainedModel) -> dict[str, Any]:
    """The model's config as a dict with its global (dense) values, without per-layer overrides."""
    with global_values(model.config) as config:
        values = config.to_dict()
    values.pop("per_layer_config", None)
    values.pop("allow_global_per_layer_attribute_access", None)
    values.pop("transformers_version", None)
    values["model_type"] = values["model_type"].removeprefix(PRUNED_PREFIX)
    return values


def _stock_class(model: PreTrainedModel) -> type:
    return STOCK_MODELS.get(type(model), type(model))


def _same_shapes(model: PreTrainedModel, cls: type, config: PretrainedConfig) -> bool:
    try:
        with torch.device("meta"):
            built = cls(config)
    except Exception:  # any failure means: this config cannot state these shapes
        return False
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return mine == {k: tuple(v.shape) for k, v in built.state_dict().items()}


def pruned_config(model: PreTrainedModel) -> PretrainedConfig:
    """A config that describes the shapes ``model`` has now (see the module docstring): the family's
    own config when every layer is alike and it can say so, else ``secateurs_<family>`` with
    ``per_layer_config``."""
    family = family_of(model)
    shapes = pruning.layer_shapes(model)
    base = _base_dict(model)
    base["num_hidden_layers"] = len(shapes)
    model_type = base.pop("model_type")
    attrs = _layer_attrs(model.config)
    if len(set(shapes)) == 1:
        shape = shapes[0]
        uniform = {**base, **_shape_values(shape, attrs)}
        if "head_dim" in base or base.get("hidden_size", 0) // max(shape.num_attention_heads, 1) != shape.head_dim:
            uniform["head_dim"] = shape.head_dim
        try:
            config = AutoConfig.for_model(model_type, **uniform)
        except Exception:  # the family's config refuses these values (e.g. hidden_size % heads): per-layer config
            config = None
        if config is not None and _same_shapes(model, _stock_class(model), config):
            return config
    globals_ = {a: base[a] for a in attrs}
    per_layer = {i: {a: v for a, v in _shape_values(s, attrs).items() if v != globals_[a]} for i, s in enumerate(shapes)}
    per_layer = {i: v for i, v in per_layer.items() if v}
    return PRUNED_CONFIGS[family.name](**base, per_layer_config=per_layer)


def save_pretrained(model: PreTrainedModel, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` (pruned or not) as a ``save_pretrained`` directory (safetensors weights and a
    config.json of its current shapes) that ``AutoModel...from_pretrained`` loads; ``tokenizer``, if
    given, is saved beside it."""
    directory = Path(directory)
    config = pruned_config(model)
    pruned = config.model_type.startswith(PRUNED_PREFIX)
    cls = PRUNED_MODELS[_stock_class(model)] if pruned else _stock_class(model)
    saved_config, model.config = model.config, config
    try:
        model.save_pretrained(str(directory))
    finally:
        model.config = saved_config
    config.architectures = [cls.__name__]  # the class from_pretrained builds (save_pretrained wrote the in-memory one)
    config.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


# ------------------------------------------------------------------ the secateurs_<family> classes

def _validate_layers(self: PretrainedConfig) -> None:
    """Each layer's query heads split evenly over its key/value heads, and fit in the dense ones."""
    if not self.is_heterogeneous:
        return
    with global_values(self):
        dense = {a: getattr(self, a) for a in _layer_attrs(self)}
    for i, layer in enumerate(self.per_layer_config):
        values = {a: getattr(layer, a) for a in dense}
        for attr, value in values.items():
            if not isinstance(value, int) or not 1 <= value <= dense[attr]:
                raise ValueError(f"per_layer_config[{i}].{attr} must be an integer in 1..{dense[attr]}, but got {value!r}")
        kv = values.get("num_key_value_heads")
        if kv and values["num_attention_heads"] % kv:
            raise ValueError(f"per_layer_config[{i}]: num_attention_heads ({values['num_attention_heads']}) must be a "
                             f"multiple of num_key_value_heads ({kv})")


def _shrink_to_config(model: PreTrainedModel) -> None:
    """Cut the dense layers a secateurs_<family> model was built with to the shapes of its ``per_layer_config``."""
    config = model.config
    if not config.is_heterogeneous:
        return
    for u in pruning.discover(model):
        layer = config.per_layer_config[u.layer]
        if u.kind == "heads":
            q, kv = layer.num_attention_heads, getattr(layer, "num_key_value_heads", layer.num_attention_heads)
            if (q, kv) != (u.size, u.kv_heads):
                g = u.group_size
                pruning.prune_heads(model, u.name, [k * g + r for k in range(kv) for r in range(q // kv)])
        elif u.kind == "neurons" and layer.intermediate_size != u.size:
            pruning.prune_neurons(model, u.name, range(layer.intermediate_size))


def _pruned_config_class(family: Family) -> type[PretrainedConfig]:
    stock = type(AutoConfig.for_model(family.model_types[0]))
    namespace = {
        "model_type": PRUNED_PREFIX + family.name,
        "validate_architecture": _validate_layers,
        "__module__": __name__,
        "__qualname__": f"Secateurs{stock.__name__}",
        "__doc__": f"A {stock.__name__} whose layers may differ: shapes per layer in ``per_layer_config``.",
    }
    cls = strict(type(f"Secateurs{stock.__name__}", (stock,), namespace))
    globals()[cls.__name__] = cls
    return cls


def _pruned_model_class(stock: type, config_class: type[PretrainedConfig]) -> type:
    def __init__(self, config, *args, **kwargs):
        with global_values(config):
            stock.__init__(self, config, *args, **kwargs)
            _shrink_to_config(self)

    name = f"Secateurs{stock.__name__}"
    cls = type(name, (stock,), {"config_class": config_class, "__init__": __init__, "__module__": __name__,
                                "__qualname__": name,
                                "__doc__": f"{stock.__name__} built from a secateurs_ config: each layer cut to its per_layer_config shape."})
    globals()[name] = cls
    return cls


def _register() -> None:
    for family in FAMILIES.values():
        config_class = _pruned_config_class(family)
        PRUNED_CONFIGS[family.name] = config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for head in family.heads:
            class_name = _HEAD_MAPPINGS[head].get(family.model_types[0])
            if class_name is None:
                continue
            stock = getattr(transformers, class_name)
            cls = _pruned_model_class(stock, config_class)
            PRUNED_MODELS[stock], STOCK_MODELS[cls] = cls, stock
            getattr(transformers, HEADS[head]).register(config_class, cls, exist_ok=True)


_register()
