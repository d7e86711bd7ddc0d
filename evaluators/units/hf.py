"""Hugging Face transformers (Llama, BERT, ViT: :mod:`evaluators.hf.models`): the attention heads
(``hf-heads``) and the MLP intermediate neurons (``hf-neurons``) of every decoder/encoder layer, as
unit kinds of the structured granularity. Groups are named after the dense model's modules
(``model.layers.3.self_attn``, ``model.layers.3.mlp``, ``bert.encoder.layer.0.attention.self``,
``bert.encoder.layer.0.intermediate``); their sizes are query heads and neurons.

Scoring: a unit's score is the sum of its weights' scores by the criterion's ``weight_scores`` (so
``l1`` is magnitude, ``taylor`` ``|w * dL/dw|``, ``wanda`` ``|W| * ||X||``, as in
:mod:`evaluators.hf.importance`): a head owns its rows of q and its columns of the output projection
and a share (1 / group size) of its key/value head's k and v rows; a neuron its rows of the MLP's
input linears and its column of the output linear.

Grouped-query attention (``Policy.gqa``): with ``kv_groups`` a head count is rounded up to a
multiple of the group size (query heads per key/value head) and the best whole groups stay (a group
scores the sum of its heads); with ``query_heads`` it is rounded up to a multiple of the key/value
heads and every group keeps its best heads, the same number each. Without GQA both are plain head
pruning. Every other linear of a Hugging Face model is reserved: the channel kind (torch-pruning)
leaves such models alone.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from evaluators.prune_base import PruningError, channels_to_keep
from evaluators.units.base import Context, Keep, Scores, Unit, UnitKind
from spaces import Policy

DEFAULT_GQA = "kv_groups"


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel`` (without importing transformers when
    nothing has: then it cannot be one)."""
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def hf_units(context: Context, kind: str) -> list[Any]:
    """The :class:`~evaluators.hf.pruning.HFUnit` s of one kind (``heads``/``neurons``) of a Hugging
    Face model; raises :class:`~evaluators.hf.models.HFModelError` for a family secateurs cannot prune."""
    if not is_hf_model(context.model):
        return []
    from evaluators.hf import pruning

    return [u for u in context.memo("hf-units", lambda: pruning.discover(context.model)) if u.kind == kind]


@dataclasses.dataclass
class HFState:
    """What a unit kind keeps of one Hugging Face unit between finding, scoring and pruning it."""

    unit: Any                      # the evaluators.hf.pruning.HFUnit
    model: nn.Module | None = None  # the model it was found in (scored there)
    gqa: str = DEFAULT_GQA         # the policy's grouped-query mode
    scores: torch.Tensor | None = None  # per query head, once scored (heads choose consistent groups from them)


def _weight_scores(model: nn.Module, name: str, criterion: Any, stats: Any) -> torch.Tensor:
    linear = model.get_submodule(name)
    weight = linear.weight
    grad = None
    if criterion.needs_gradients:
        grad = weight.grad.detach() if weight.grad is not None else torch.zeros_like(weight)
    scale = stats.norm(linear, "input", f"linear {name!r}")[None] if criterion.needs_activations else None
    return criterion.weight_scores(weight.detach(), grad, scale).float()


def _rows(scores: torch.Tensor, units: int) -> torch.Tensor:
    return scores.reshape(units, -1).sum(1)


def _cols(scores: torch.Tensor, units: int) -> torch.Tensor:
    return scores.reshape(scores.shape[0], units, -1).sum((0, 2))


def _gqa(context: Context) -> str:
    policy = getattr(context, "policy", None)
    return policy.gqa if policy is not None else DEFAULT_GQA


def head_limits(unit: Unit, policy: Policy) -> tuple[int, int]:
    """(the fewest query heads the attention keeps, the multiple its count is rounded up to) under
    ``policy.gqa``: multiples of the group size (``kv_groups``) or of the key/value heads (``query_heads``).

    >>> from evaluators.hf.pruning import HFUnit
    >>> u = Unit("a", "hf-heads", 8, nn.Identity(), state=HFState(HFUnit("a", "heads", 8, (), 0, kv_heads=4, head_dim=8)))
    >>> head_limits(u, Policy("l1", {})), head_limits(u, Policy("l1", {}, gqa="query_heads"))
    ((2, 2), (4, 4))
    """
    hf = unit.state.unit
    multiple = hf.group_size if policy.gqa == "kv_groups" else hf.kv_heads
    least = policy.group_min_channels.get(unit.name, 1)
    return min(int(math.ceil(least / multiple) * multiple), unit.size), multiple


def valid_head_ratios(unit: Unit, gqa: str) -> list[float]:
    """The ratios that prune exactly a valid number of ``unit``'s query heads under ``gqa`` (0 first)."""
    from evaluators.hf.pruning import valid_head_counts

    return [(unit.size - c) / unit.size for c in sorted(valid_head_counts(unit.state.unit, gqa), reverse=True)]


class HFHeads(UnitKind):
    """The query heads of a Hugging Face attention module, grouped-query attention kept consistent."""

    name = "hf-heads"
    kinds = ("hf-heads",)
    granularities = ("structured",)
    scorer = "weight_scores"

    def reserved(self, context: Context) -> Iterable[nn.Module]:
        if not is_hf_model(context.model):
            return []
        return [m for m in context.model.modules() if isinstance(m, nn.Linear)]

    def find(self, context: Context) -> list[Unit]:
        return [Unit(u.name, "hf-heads", u.size, _owner(context, u), u.members, self.granularities,
                     HFState(u, context.model, _gqa(context))) for u in hf_units(context, "heads") if u.size > 1]

    def limits(self, unit: Unit, policy: Policy) -> tuple[int, int]:
        return head_limits(unit, policy)

    def check_ratios(self, unit: Unit, ratios: Sequence[float], fixed: bool, policy: Policy) -> None:
        hf = unit.state.unit
        floor, multiple = head_limits(unit, policy)
        kept = {r: channels_to_keep(unit.size, r, multiple, floor) for r in ratios}
        valid = ", ".join(f"{r:g}" for r in valid_head_ratios(unit, policy.gqa))
        where = (f"{unit.name} has {unit.size} query heads in {hf.kv_heads} key-value groups of {hf.group_size}; with "
                 f"gqa {policy.gqa} it keeps a multiple of {multiple}")
        if fixed:
            (ratio, keep), = kept.items()
            asked = unit.size - math.floor(unit.size * ratio + 1e-9)
            if ratio > 0 and keep != asked:
                raise PruningError(f"space.rules: ratio {ratio:g} would keep {asked} of the heads of {unit.name}, which breaks "
                                   f"grouped-query attention ({where}, so it would keep {keep}); valid ratios: {valid}")
        elif max(ratios, default=0.0) > 0 and all(keep == unit.size for keep in kept.values()):
            raise PruningError(f"space: the ratios {min(ratios):g}..{max(ratios):g} searched for the heads of {unit.name} never "
                               f"prune a head ({where}); valid ratios: {valid}")

    def score(self, unit: Unit, criterion: Any, stats: Any) -> Scores:
        hf = unit.state.unit
        model = _model_of(unit)
        q, k, v, o = (_weight_scores(model, n, criterion, stats) for n in hf.members)
        shared = (_rows(k, hf.kv_heads) + _rows(v, hf.kv_heads)).repeat_interleave(hf.group_size) / hf.group_size
        scores = _rows(q, hf.size) + _cols(o, hf.size) + shared
        unit.state.scores = scores
        return {None: scores}

    def prune(self, unit: Unit, keep: Keep, context: Context) -> None:
        from evaluators.hf.pruning import heads_to_keep, prune_heads

        heads = keep[None]
        if unit.state.scores is not None:  # the count the engine chose, as whole groups or the same count per group
            heads = heads_to_keep(unit.state.unit, unit.state.scores, len(heads), unit.state.gqa)
        prune_heads(context.model, unit.name, heads)

    def saved(self, unit: Unit, state_dict: Mapping[str, torch.Tensor]) -> Keep:
        hf = unit.state.unit
        q_key, k_key = (f"{m}.weight" for m in hf.members[:2])
        for key in (q_key, k_key):
            if key not in state_dict:
                raise PruningError(f"the saved state dict has no {key!r}: it does not belong to this model and policy")
        q, kv = state_dict[q_key].shape[0] // hf.head_dim, state_dict[k_key].shape[0] // hf.head_dim
        if not 1 <= kv <= hf.kv_heads or q % kv or q // kv > hf.group_size:
            raise PruningError(f"the saved state dict gives {unit.name!r} {q} query heads over {kv} key-value heads, which its "
                               f"{hf.size} query heads in {hf.kv_heads} groups cannot become")
        return {None: [group * hf.group_size + r for group in range(kv) for r in range(q // kv)]}


class HFNeurons(UnitKind):
    """The intermediate neurons of a Hugging Face MLP."""

    name = "hf-neurons"
    kinds = ("hf-neurons",)
    granularities = ("structured",)
    scorer = "weight_scores"

    def find(self, context: Context) -> list[Unit]:
        return [Unit(u.name, "hf-neurons", u.size, _owner(context, u), u.members, self.granularities, HFState(u, context.model))
                for u in hf_units(context, "neurons") if u.size > 1]

    def score(self, unit: Unit, criterion: Any, stats: Any) -> Scores:
        hf = unit.state.unit
        model = _model_of(unit)
        *inputs, output = (_weight_scores(model, n, criterion, stats) for n in hf.members)
        return {None: sum(_rows(s, hf.size) for s in inputs) + _cols(output, hf.size)}

    def prune(self, unit: Unit, keep: Keep, context: Context) -> None:
        from evaluators.hf.pruning import prune_neurons

        prune_neurons(context.model, unit.name, keep[None])

    def saved(self, unit: Unit, state_dict: Mapping[str, torch.Tensor]) -> int:
        key = f"{unit.state.unit.members[0]}.weight"
        if key not in state_dict:
            raise PruningError(f"the saved state dict has no {key!r}: it does not belong to this model and policy")
        return int(state_dict[key].shape[0])


def _owner(context: Context, u: Any) -> nn.Module:
    """The module holding a unit's first linear (the attention's q, the MLP's first input linear)."""
    return context.model.get_submodule(u.members[0].rpartition(".")[0])


def _model_of(unit: Unit) -> nn.Module:
    if unit.state.model is None:
        raise PruningError(f"unit {unit.name!r} was not found by its kind in a model (no model to score it in)")
    return unit.state.model
