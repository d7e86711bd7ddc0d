"""Granularities: the registry from a policy's ``granularity`` to the engine that carries it out.

An engine turns a policy's ratios into what each unit keeps, and leaves finding, scoring and
removing units to the unit kinds that serve the granularity (``UnitKind.granularities``):

- :class:`UnitCounts` (``channel``, ``structured``): each group keeps a number of units (rounded
  up to the kind's multiple, never below its minimum), or groups named in ``policy.global_groups``
  share one removal budget spent on the lowest mean-normalised scores across them; the kind then
  removes its lowest-scored units. Every unit is scored on the model as given, before anything is
  removed; kinds prune in registry order.
- :class:`WeightMasks` (``unstructured``) and :class:`NMMasks` (``nm``): masks on single weights,
  per tensor or global, or ``floor(ratio * nm_block)`` of every block of ``nm_block`` inputs.

>>> sorted(GRANULARITIES)
['channel', 'nm', 'structured', 'unstructured']
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

import torch

from evaluators import units
from evaluators.prune_base import PruneReport, PruningError, channels_to_keep
from evaluators.sparsity import global_masks, nm_keep_mask
from evaluators.units.base import Context, Keep, Scores, Unit, normalised
from spaces import Policy, register_granularity as register_granularity_name
from spaces.policy import GRANULARITIES as GRANULARITY_NAMES

if TYPE_CHECKING:
    from evaluators.criteria import Criterion


def ranked(scores: Scores) -> torch.Tensor:
    """One group's unit scores as a global ranking compares them: each score tensor divided by its
    mean and sorted ascending, averaged over the tensors (one per layer and direction of an RNN)."""
    return torch.stack([normalised(s).sort().values for s in scores.values()]).mean(0)


class Engine:
    """How a granularity turns a policy's ratios into what each unit keeps (subclasses implement
    :meth:`prune` and, where a global ranking makes sense, :meth:`rankings`)."""

    reshapes = True  # the pruned model has other shapes (it is run once to check it still works)
    ranks = True     # it has a global ranking (:meth:`rankings`, used by global baselines)

    def units(self, context: Context, granularities: Iterable[str]) -> list[Unit]:
        """The units of the kinds serving ``granularities`` that one of them may prune, in module order."""
        wanted = set(granularities)
        found: list[Unit] = []
        for kind in units.kinds_for(wanted):
            for unit in kind.find(context):
                if wanted & set(unit.granularities):
                    unit.handler = kind
                    found.append(unit)
        position = context.position
        return sorted(found, key=lambda u: position.get(u.name, position.get(context.names.get(u.module), -1)))

    def named_units(self, context: Context, granularity: str, names: Iterable[str], what: str = "") -> dict[str, Unit]:
        """The units called ``names`` (refused, listing the available groups, if any is missing)."""
        found = {u.name: u for u in self.units(context, [granularity])}
        missing = [n for n in names if n not in found]
        if missing:
            raise PruningError(f"no {what}group(s) {missing} in this model; available groups: {', '.join(found)}")
        return {n: found[n] for n in names}

    def prune(self, context: Context, policy: Policy, criterion: Criterion | None,
              stats: Callable[[], object], shapes: Mapping[str, torch.Tensor] | None = None) -> PruneReport:
        raise NotImplementedError

    def rankings(self, context: Context, granularity: str, criterion: Criterion, names: list[str],
                 floor: Policy) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class UnitCounts(Engine):
    """Keep a number of units per group; the kinds remove their lowest-scored units."""

    def _unknown(self, context: Context, policy: Policy, found: dict[str, Unit]) -> None:
        unknown = sorted(set(policy.ratios) - set(found))
        if not unknown:
            return
        others = [g for g, entry in GRANULARITIES.items() if g != policy.granularity and entry.engine is self]
        elsewhere = {u.name: u.granularities for u in (self.units(context, others) if others else []) if u.name in unknown}
        hint = ""
        if elsewhere:
            grans = sorted({g for gs in elsewhere.values() for g in gs} & set(others))
            hint = f" ({', '.join(elsewhere)} can be pruned with granularity {' or '.join(repr(g) for g in grans)})"
        raise PruningError(
            f"policy names group(s) {unknown} that this model does not have for granularity {policy.granularity!r}{hint}; "
            f"available groups: {', '.join(found)}"
        )

    def prune(self, context, policy, criterion, stats, shapes=None):
        found = {u.name: u for u in self.units(context, [policy.granularity])}
        self._unknown(context, policy, found)  # checked before anything is pruned: the model is left untouched
        named = [u for u in found.values() if u.name in policy.ratios]
        for u in named:
            u.handler.check(u, context)
            if shapes is None:
                units.check_applies(criterion, u.kind, u.name)
        counts: dict[str, int] = {}
        scores: dict[str, Scores] = {}
        if shapes is None:
            measured = stats()
            scores = {u.name: u.handler.score(u, criterion, measured) for u in named}
            counts = allocate(list(found.values()), policy, scores)
        for kind in units.UNIT_KINDS.values():  # registry order: channels before the heads they may couple with
            pruned = []
            for u in (u for u in named if u.handler is kind):
                keep = _saved_keep(u, shapes, counts) if shapes is not None else _highest(scores[u.name], counts[u.name])
                if counts[u.name] < u.size:
                    kind.prune(u, keep, context)
                    pruned.append(u)
            if pruned:
                kind.finish(pruned, context)
        return PruneReport(policy.granularity, {u.name: (u.size, u.size - counts[u.name]) for u in named}, context.model)

    def rankings(self, context, granularity, criterion, names, floor):
        out = {}
        for n, u in self.named_units(context, granularity, names, "structured ").items():
            u.handler.check(u, context)
            units.check_applies(criterion, u.kind, u.name)
            keep_at_least = max(u.handler.limits(u, floor)[0], 1)
            out[n] = ranked(u.handler.score(u, criterion, None))[: u.size - keep_at_least]
        return out


def _highest(scores: Scores, count: int) -> Keep:
    """Per score tensor, the sorted indices of its ``count`` highest scores (on ties the later ones)."""
    return {k: sorted(torch.argsort(s.float(), stable=True)[len(s) - count:].tolist()) for k, s in scores.items()}


def _saved_keep(unit: Unit, shapes: Mapping[str, torch.Tensor], counts: dict[str, int]) -> Keep:
    """What a saved state dict kept of ``unit`` (its count goes into ``counts``)."""
    saved = unit.handler.saved(unit, shapes)
    if isinstance(saved, dict):  # these very units
        counts[unit.name] = len(next(iter(saved.values())))
        return saved
    counts[unit.name] = int(saved)  # any that many: the saved weights are loaded over them
    return {None: list(range(unit.size - int(saved), unit.size))}


def _kept(unit: Unit, policy: Policy, keep: int) -> int:
    floor, multiple = unit.handler.limits(unit, policy)
    keep = int(math.ceil(keep / multiple) * multiple)
    return min(max(keep, floor, 1), unit.size)


def allocate(found: list[Unit], policy: Policy, scores: Mapping[str, Scores]) -> dict[str, int]:
    """How many units each named group keeps: per group by its ratio, or (``global_groups``) by one
    ranking across the pooled groups that removes as many units in total as their ratios ask."""
    keep: dict[str, int] = {}
    pooled = [u for u in found if u.name in policy.global_groups]
    for u in found:
        if u.name in policy.ratios and u not in pooled:
            floor, multiple = u.handler.limits(u, policy)
            keep[u.name] = channels_to_keep(u.size, policy.ratios[u.name], multiple, floor)
    if pooled:
        budget = sum(math.floor(u.size * policy.ratios[u.name] + 1e-9) for u in pooled)
        candidates = []
        for index, u in enumerate(pooled):
            floor, _ = u.handler.limits(u, policy)
            candidates += [(float(v), index, i) for i, v in enumerate(ranked(scores[u.name])[: u.size - max(floor, 1)])]
        removed = [0] * len(pooled)
        for _, index, _ in sorted(candidates)[:budget]:
            removed[index] += 1
        for u, n in zip(pooled, removed):
            keep[u.name] = _kept(u, policy, u.size - n)
    return keep


class WeightMasks(Engine):
    """Zero the lowest-scored weights of each named tensor, or (``global_groups``) across them."""

    reshapes = False

    def _unknown(self, policy: Policy, found: dict[str, Unit]) -> None:
        unknown = sorted(set(policy.ratios) - set(found))
        if unknown:
            raise PruningError(f"policy names weight group(s) {unknown} that this model does not have for granularity "
                               f"{policy.granularity!r}{self._needs(policy)}; available groups: {', '.join(found)}")

    def _needs(self, policy: Policy) -> str:
        return ""

    def mask(self, unit: Unit, scores: torch.Tensor, ratio: float, policy: Policy) -> torch.Tensor:
        """The keep-mask of one tensor pruned alone at ``ratio``."""
        keep = torch.ones(scores.numel(), dtype=torch.bool)
        keep[torch.argsort(scores.flatten().float(), stable=True)[: math.floor(scores.numel() * ratio + 1e-9)]] = False
        return keep.view(scores.shape)

    def prune(self, context, policy, criterion, stats, shapes=None):
        found = {u.name: u for u in self.units(context, [policy.granularity])}
        self._unknown(policy, found)
        named = [found[n] for n in policy.ratios]
        if shapes is not None:
            masks = {u.name: u.handler.saved(u, shapes) for u in named}
        else:
            for u in named:
                u.handler.check(u, context)
                units.check_applies(criterion, u.kind, u.name)
            measured = stats()
            scores = {u.name: u.handler.score(u, criterion, measured)[None] for u in named}
            pooled = [u for u in named if u.name in policy.global_groups]
            masks = {u.name: self.mask(u, scores[u.name], policy.ratios[u.name], policy) for u in named if u not in pooled}
            if pooled:
                budget = sum(math.floor(u.size * policy.ratios[u.name] + 1e-9) for u in pooled)
                masks.update(zip((u.name for u in pooled), global_masks([scores[u.name] for u in pooled], budget)))
        for u in named:
            u.handler.prune(u, {None: masks[u.name]}, context)
        return PruneReport(policy.granularity, {u.name: (u.size, int((~masks[u.name]).sum())) for u in named}, context.model)

    def rankings(self, context, granularity, criterion, names, floor):
        out = {}
        for n, u in self.named_units(context, granularity, names, "weight ").items():
            units.check_applies(criterion, u.kind, n)
            out[n] = u.handler.score(u, criterion, None)[None].flatten().float().sort().values[:-1]
        return out


class NMMasks(WeightMasks):
    """In every block of ``nm_block`` consecutive inputs, zero the ``floor(ratio * nm_block)`` lowest scores."""

    ranks = False  # N:M masks are chosen per block

    def _needs(self, policy: Policy) -> str:
        return f" (N:M needs an input size that is a multiple of {policy.nm_block})"

    def mask(self, unit, scores, ratio, policy):
        return nm_keep_mask(scores, policy.nm_block, math.floor(ratio * policy.nm_block + 1e-9))


@dataclasses.dataclass(frozen=True)
class Granularity:
    """A granularity: its name (valid in configs and policies), its engine, and (for one that
    ``spaces`` does not know yet) a line saying what its ratios remove.

    >>> GRANULARITIES["nm"].engine.reshapes
    False
    """

    name: str
    engine: Engine
    help: str = ""


GRANULARITIES: dict[str, Granularity] = {}


def register_granularity(granularity: Granularity) -> None:
    """Make a granularity valid everywhere (``spaces`` learns its name) and carried out by its engine."""
    if not granularity.name:
        raise ValueError("a granularity needs a non-empty name")
    if granularity.name not in GRANULARITY_NAMES:
        register_granularity_name(granularity.name, granularity.help)
    GRANULARITIES[granularity.name] = granularity


def get_granularity(name: str) -> Granularity:
    if name not in GRANULARITIES:
        raise PruningError(f"unknown granularity {name!r}; valid: {', '.join(GRANULARITIES)}")
    return GRANULARITIES[name]


UNIT_COUNTS = UnitCounts()
for _entry in (Granularity("channel", UNIT_COUNTS), Granularity("structured", UNIT_COUNTS),
               Granularity("unstructured", WeightMasks()), Granularity("nm", NMMasks())):
    register_granularity(_entry)
