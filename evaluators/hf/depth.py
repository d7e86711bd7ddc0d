"""Depth for Hugging Face models: their decoder/encoder layers as the removable blocks of
:mod:`evaluators.depth` (registered when :mod:`evaluators.hf` is imported).

Blocks are named after the dense model's layers (``model.layers.3``, ``bert.encoder.layer.1``),
whatever was removed before; :func:`~evaluators.hf.pruning.drop_layers` removes them from the layer
list (config and KV-cache indices follow), so the smaller model saves and reloads with
``from_pretrained``. Widths pruned first keep their names (units are named after the dense layers).

Importance: ``block_influence`` is ShortGPT's ``1 - E_t[cos(x_t, y_t)]``, the cosine between a
layer's input and output hidden state of each (non-padding) token, over the feature dimension,
averaged over the calibration tokens (the rule for every block of hidden states of shape
``(batch, tokens, features)``; see :func:`evaluators.blocks.block_importance`); ``loss`` is the
increase of the task's loss on the calibration batches when the layer alone is removed.

>>> from evaluators.hf.models import build_model
>>> m = build_model({"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
...                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50})
>>> [b.name for b in HFLayers().discover(m, None)]
['layers.0', 'layers.1', 'layers.2']
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from evaluators.batches import Calibration, to_device
from evaluators.depth import register_depth_handler
from evaluators.hf import importance, pruning
from evaluators.hf.models import HFModelError, family_of, layers_of
from spaces import Block


def _positions(model: nn.Module, names: Sequence[str]) -> list[int]:
    """Current positions of the layers ``names`` (dense-model names); refuses unknown ones, naming the layers."""
    current = pruning.layer_names(model)
    unknown = [n for n in names if n not in current]
    if unknown:
        raise pruning.HFPruningError(f"no layer {unknown[0]!r} in this {family_of(model).name} model; its layers are "
                                     f"{', '.join(current)}")
    return [current.index(n) for n in names]


class HFLayers:
    """The decoder/encoder layers of a supported Hugging Face model (Llama, BERT, ViT)."""

    name = "hf-layers"
    keeps_one = True  # a model with no decoder/encoder layer left does not run

    def claims(self, model: nn.Module) -> bool:
        if not isinstance(model, PreTrainedModel):
            return False
        family_of(model)  # a family secateurs cannot prune: say so rather than trace it
        return True

    def discover(self, model: nn.Module, example_inputs: Any) -> list[Block]:
        return [Block(name, pruning.parameter_count(layer)) for name, layer in zip(pruning.layer_names(model), layers_of(model))]

    def drop(self, model: nn.Module, names: Sequence[str], example_inputs: Any) -> nn.Module:
        pruning.drop_layers(model, _positions(model, names))
        return model

    def importance(self, model: nn.Module, calibration: Calibration, names: Sequence[str], criterion: str) -> dict[str, float]:
        positions = _positions(model, names)
        if criterion == "block_influence":
            scores = importance.block_influence(model, calibration.batches)
            return {n: scores[i] for n, i in zip(names, positions)}
        if criterion == "loss":
            base = _mean_loss(model, calibration)
            out = {}
            for n, i in zip(names, positions):
                smaller = copy.deepcopy(model)
                pruning.drop_layers(smaller, [i])
                out[n] = _mean_loss(smaller, calibration) - base
            return out
        raise HFModelError(f"space.depth.criterion: unknown criterion {criterion!r}; valid: block_influence, loss")


def _mean_loss(model: nn.Module, calibration: Calibration) -> float:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = [float(calibration.loss(model, to_device(b, device))) for b in calibration.batches]
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)


register_depth_handler(HFLayers())
