"""Depth: which whole blocks a model can lose, and removing them, for any model.

Different models lose a block differently: a residual block of a CNN or of a user's own model is
replaced by what is left without its branch (:mod:`evaluators.blocks`), while a Hugging Face
decoder or encoder layer must leave its layer list (with the config and the KV-cache indices
renumbered) so that ``from_pretrained`` rebuilds the smaller model. A :class:`DepthHandler` does
one of these; the first registered handler that claims a model serves it (handlers registered
later are asked first, so a specific one, such as Hugging Face's, wins over the generic one).

>>> from evaluators.zoo import resnet20
>>> [b.name for b in discover(resnet20(), torch.zeros(1, 3, 32, 32))][:3]
['layer1.0', 'layer1.1', 'layer1.2']
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol, Sequence

import torch
from torch import nn

from evaluators import blocks as residual
from evaluators.batches import Calibration
from evaluators.blocks import BlockError
from spaces import Block

BLOCK_CRITERIA = ("block_influence", "loss")  # block_influence: 1 - cos(input, output); loss: the loss increase when dropped


class DepthHandler(Protocol):
    """How one family of models loses whole blocks."""

    name: str

    def claims(self, model: nn.Module) -> bool: ...

    def discover(self, model: nn.Module, example_inputs: Any) -> list[Block]:
        """The removable blocks (module names in the dense model) with their parameter counts."""

    def drop(self, model: nn.Module, names: Sequence[str], example_inputs: Any) -> nn.Module:
        """Remove ``names`` (dense-model module names) from ``model`` in place; returns it."""

    def importance(self, model: nn.Module, calibration: Calibration, names: Sequence[str], criterion: str) -> dict[str, float]:
        """Per block, how much it matters (low: removed first)."""

    # Optional: ``rejected(model, example_inputs) -> {module name: why it is not removable}``, for
    # the errors that name a block which cannot be removed (see :func:`rejected`); ``keeps_one = True``
    # when a model cannot lose all of its blocks (see :func:`keeps_one`).


class ResidualBlocks:
    """Any model: residual blocks found by tracing, each replaced by what is left without its branch."""

    name = "residual"

    def claims(self, model: nn.Module) -> bool:
        return True

    def discover(self, model: nn.Module, example_inputs: Any) -> list[Block]:
        return [Block(b.name, b.params) for b in residual.discover_blocks(model, example_inputs)]

    def drop(self, model: nn.Module, names: Sequence[str], example_inputs: Any) -> nn.Module:
        return residual.drop_blocks(model, names, example_inputs)

    def importance(self, model: nn.Module, calibration: Calibration, names: Sequence[str], criterion: str) -> dict[str, float]:
        return residual.block_importance(model, calibration, names, criterion="cosine" if criterion == "block_influence" else criterion)

    def rejected(self, model: nn.Module, example_inputs: Any) -> dict[str, str]:
        return residual.analyse_blocks(model, example_inputs)[1]


HANDLERS: list[DepthHandler] = [ResidualBlocks()]


def register_depth_handler(handler: DepthHandler) -> None:
    """Serve the models ``handler.claims`` with it (asked before the handlers registered earlier)."""
    HANDLERS.insert(0, handler)


def handler_for(model: nn.Module) -> DepthHandler:
    return next(h for h in HANDLERS if h.claims(model))


def discover(model: nn.Module, example_inputs: Any) -> list[Block]:
    """The removable blocks of ``model``, as its handler finds them."""
    return handler_for(model).discover(model, example_inputs)


def keeps_one(model: nn.Module) -> bool:
    """True when ``model`` must keep at least one of its blocks (a Hugging Face model with no layer
    left does not run); residual blocks of any model may all go (each becomes its shortcut)."""
    return bool(getattr(handler_for(model), "keeps_one", False))


def rejected(model: nn.Module, example_inputs: Any) -> dict[str, str]:
    """The modules of ``model`` that could have been removable blocks and are not, each with why
    (empty when its handler does not say)."""
    handler = handler_for(model)
    explain = getattr(handler, "rejected", None)
    return dict(explain(model, example_inputs)) if explain is not None else {}


def check(model: nn.Module, names: Iterable[str], example_inputs: Any) -> None:
    """Raise :class:`~evaluators.blocks.BlockError` unless every one of ``names`` is a removable
    block of ``model``; the message says why the first one is not and lists the removable blocks.
    Leaves the model as it is (call it before changing anything else)."""
    names = list(names)
    if not names:
        return
    removable = [b.name for b in discover(model, example_inputs)]
    bad = [n for n in names if n not in removable]
    if bad:
        reasons = rejected(model, example_inputs)
        why = f": {reasons[bad[0]]}" if bad[0] in reasons else " (no module of that name can be a block)"
        raise BlockError(f"block {bad[0]!r} cannot be dropped{why}; removable blocks: {', '.join(removable) or 'none'}")


def drop(model: nn.Module, names: Iterable[str], example_inputs: Any) -> nn.Module:
    """Remove the blocks ``names`` from ``model`` in place (nothing when empty); returns it."""
    names = list(names)
    return handler_for(model).drop(model, names, example_inputs) if names else model


def order(model: nn.Module, calibration: Calibration, names: Sequence[str], criterion: str = "block_influence") -> list[str]:
    """``names``, least important first by ``criterion`` (ties: model order)."""
    if criterion not in BLOCK_CRITERIA:
        raise ValueError(f"space.depth.criterion: unknown criterion {criterion!r}; valid: {', '.join(BLOCK_CRITERIA)}")
    scores = handler_for(model).importance(model, calibration, names, criterion)
    return sorted(names, key=lambda n: (scores[n], list(names).index(n)))
