"""The registry of unit kinds: what structured and mask pruning can remove, one file per kind.

======================  ===================  ======================  ==================
kind (file)             group kinds          granularities           scored with
======================  ===================  ======================  ==================
``channels``            conv, linear         channel, structured     channel_importance
``rnn``                 rnn-hidden           structured              unit_scores
``mha``                 attention-heads      structured              unit_scores
``linear-heads``        attention-heads      structured              unit_scores
``hf-heads`` (hf)       hf-heads             structured              weight_scores
``hf-neurons`` (hf)     hf-neurons           structured              weight_scores
``weights``             weight               unstructured, nm        weight_scores
======================  ===================  ======================  ==================

Adding a kind is one file with a :class:`~evaluators.units.base.UnitKind` subclass and one
:func:`register_unit_kind` call (the list at the bottom of this file, or your own code). A criterion
applies to a group kind exactly when it implements the kind's scorer.

>>> list(UNIT_KINDS)
['channels', 'rnn', 'mha', 'linear-heads', 'hf-heads', 'hf-neurons', 'weights']
>>> group_kinds()["rnn-hidden"]
'unit_scores'
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from evaluators.prune_base import PruningError
from evaluators.units.base import Context, Unit, UnitKind
from spaces.policy import GRANULARITIES

if TYPE_CHECKING:
    from evaluators.criteria import Criterion

__all__ = ["UNIT_KINDS", "Context", "Unit", "UnitKind", "applicable", "check_applies", "group_kinds", "kinds_for",
           "kinds_scored_by", "register_unit_kind"]

UNIT_KINDS: dict[str, UnitKind] = {}


def register_unit_kind(kind: UnitKind) -> None:
    """Add a unit kind to the registry (kinds prune in registry order; registering a name again replaces it)."""
    if not isinstance(kind, UnitKind):
        raise TypeError(f"register_unit_kind needs a UnitKind instance, but got {kind!r}")
    if not kind.name or not kind.kinds or not kind.granularities or not kind.scorer:
        raise ValueError(f"a unit kind needs a name, group kinds, granularities and a scorer, but {type(kind).__name__} has "
                         f"(name={kind.name!r}, kinds={kind.kinds!r}, granularities={kind.granularities!r}, scorer={kind.scorer!r})")
    unknown = [g for g in kind.granularities if g not in GRANULARITIES]
    if unknown:
        raise ValueError(f"unit kind {kind.name!r} names unknown granularities {unknown}; valid: {', '.join(GRANULARITIES)} "
                         "(register a new one with evaluators.pruning.register_granularity first)")
    scorers = group_kinds(exclude=kind.name)
    clashes = [k for k in kind.kinds if scorers.get(k, kind.scorer) != kind.scorer]
    if clashes:
        raise ValueError(f"unit kind {kind.name!r} scores group kind {clashes[0]!r} with {kind.scorer!r}, but another kind "
                         f"scores it with {scorers[clashes[0]]!r}: one group kind, one scorer")
    UNIT_KINDS[kind.name] = kind


def group_kinds(exclude: str = "") -> dict[str, str]:
    """Every registered group kind (``PrunableGroup.kind``) and the criterion method that scores it."""
    return {k: h.scorer for h in UNIT_KINDS.values() if h.name != exclude for k in h.kinds}


def kinds_for(granularities: Iterable[str]) -> list[UnitKind]:
    """The unit kinds that serve any of ``granularities``, in registry order."""
    wanted = set(granularities)
    return [h for h in UNIT_KINDS.values() if wanted & set(h.granularities)]


def kinds_scored_by(criterion: Any) -> tuple[str, ...]:
    """The group kinds ``criterion`` can score (those whose scorer it implements)."""
    return tuple(k for k, scorer in group_kinds().items() if criterion.implements(scorer))


def applicable(kind: str) -> list[str]:
    """The criteria that can score a group of ``kind``."""
    from evaluators.criteria import CRITERIA

    return sorted(c.name for c in CRITERIA.values() if kind in kinds_scored_by(c))


def check_applies(criterion: Criterion, kind: str, group: str) -> None:
    """Raise unless ``criterion`` can score a group of ``kind``, naming the criteria that can."""
    if kind not in group_kinds():
        raise PruningError(f"group {group!r} has kind {kind!r}, which no registered unit kind prunes; "
                           f"valid kinds: {', '.join(sorted(group_kinds()))}")
    if kind not in kinds_scored_by(criterion):
        raise PruningError(f"criterion {criterion.name!r} does not apply to {kind} group {group!r}; "
                           f"criteria for {kind} groups: {', '.join(applicable(kind))}")


from evaluators.units import channels, hf, linear_heads, mha, rnn, weights  # noqa: E402  (the built-in kinds)

for _kind in (channels.Channels(), rnn.RNNHidden(), mha.MultiheadAttentionHeads(), linear_heads.LinearHeads(), hf.HFHeads(),
              hf.HFNeurons(), weights.Weights()):
    register_unit_kind(_kind)
