"""``pick --out`` for Hugging Face models: the pruned model as a ``save_pretrained`` directory.

Beside ``policy.json``, ``model.pt``, ``model.pt2`` and ``model.onnx``, the export folder of a
Hugging Face model holds what ``from_pretrained`` reads: ``config.json`` (the pruned shapes: the
family's own config when every layer is alike, else ``model_type: secateurs_<family>`` with
``per_layer_config``; see :mod:`evaluators.hf.checkpoint`), ``model.safetensors`` and the task's
tokenizer. So ``AutoModelForCausalLM.from_pretrained(DIR)`` (``import evaluators.hf`` first for a
``secateurs_*`` config) gives the model ``pick`` measured. A causal LM is saved with ``use_cache:
true`` (secateurs runs it without a KV cache; ``generate`` wants one).

>>> stage_pretrained(stage, model, task)  # doctest: +SKIP
['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from evaluators.units.hf import is_hf_model

# what save_pretrained writes for the families secateurs prunes, with a tokenizer
PRETRAINED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json")
HF_ARTIFACT_PATH = "hf_model"  # where the export run keeps the directory in MLflow


def stage_pretrained(stage: Path, model: nn.Module, task: Any) -> list[str]:
    """Write ``model`` (pruned) as a ``save_pretrained`` directory into ``stage``, with the task's
    tokenizer when it has one; returns the names of the files written."""
    from evaluators.hf.checkpoint import save_pretrained

    before = {p.name for p in stage.iterdir()}
    config = model.config
    causal = "ForCausalLM" in type(model).__name__
    use_cache = getattr(config, "use_cache", None)
    if causal:
        config.use_cache = True
    try:
        save_pretrained(model.cpu().eval(), stage, tokenizer=getattr(task, "tokenizer", None))
    finally:
        if causal:
            config.use_cache = use_cache
    return sorted({p.name for p in stage.iterdir()} - before)


def auto_class(model: nn.Module) -> str:
    """The ``transformers`` Auto class that loads ``model``'s kind (``AutoModelForCausalLM``, ...)."""
    from evaluators.hf.models import HEADS, default_head

    return HEADS[default_head({"architectures": [type(model).__name__]})]


def loading_lines(stage: Path, model: nn.Module) -> list[str]:
    """The model card's lines on loading the ``save_pretrained`` files written into ``stage``."""
    config = json.loads((stage / "config.json").read_text())
    cls = auto_class(model)
    pruned = str(config.get("model_type", "")).startswith("secateurs_")
    first = ("`import evaluators.hf` first (config.json's model_type is "
             f"`{config['model_type']}`: per-layer shapes in `per_layer_config`, no trust_remote_code), then "
             if pruned else "")
    return [f"- Hugging Face (`config.json`, `model.safetensors`, the tokenizer): {first}"
            f"`transformers.{cls}.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`; "
            f"{'layers alike: any transformers 5.x loads it' if not pruned else 'layers differ'}."]


__all__ = ["HF_ARTIFACT_PATH", "PRETRAINED_FILES", "auto_class", "is_hf_model", "loading_lines", "stage_pretrained"]
