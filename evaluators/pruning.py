"""One path for every granularity: ``apply(policy, model, example_inputs, calibration=None)``.

- ``channel``: conv filters and linear neurons through torch-pruning's dependency graph (coupled
  BatchNorms, next-layer inputs, residual partners, depthwise convs and concatenations follow);
- ``structured``: ``channel`` plus attention heads and LSTM/GRU/RNN hidden units;
- ``unstructured``: per-layer or global masks on single weights, baked into the weights;
- ``nm``: N:M semi-structured masks (2:4 = ratio 0.5 with ``nm_block`` 4).

Three registries make it extensible, each one file plus one entry: criteria
(:mod:`evaluators.criteria`, :func:`register_criterion`), unit kinds (:mod:`evaluators.units`,
:func:`register_unit_kind`: what can be removed and how) and granularities
(:mod:`evaluators.granularities`, :func:`register_granularity`: how a policy's ratios become what
each unit keeps). The pruned model is a plain ``nn.Module``. ``taylor`` and ``wanda`` need a
:class:`~evaluators.batches.Calibration`. Example inputs are a tensor, a tuple of positional inputs
or a dict of keyword inputs. Errors are :class:`PruningError`s that name the group or module at
fault and what to do; a policy that cannot apply is refused before the model changes.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import torch
import torch_pruning as tp
from torch import nn

from evaluators import depth, units
from evaluators.batches import Calibration, Inputs
from evaluators.criteria import CRITERIA, Criterion, Stats, calibrate, get_criterion, register_criterion
from evaluators.granularities import GRANULARITIES, Granularity, get_granularity, register_granularity
from evaluators.prune_base import PruneReport, PruningError, channels_to_keep, check_runs, output_layers
from evaluators.sparsity import effective_macs_and_params, load_sparse_state_dict, sparse_state_dict_bytes
from evaluators.units import UNIT_KINDS, Context, UnitKind, register_unit_kind
from evaluators.units import graph as tpgraph
from spaces import Policy, PrunableGroup, SearchSpace

__all__ = [
    "CRITERIA", "GRANULARITIES", "UNIT_KINDS", "Calibration", "Criterion", "Granularity", "PruneReport", "PruningError",
    "UnitKind", "apply", "channels_to_keep", "check_ratios", "check_space", "discover_groups", "effective_macs_and_params",
    "load_sparse_state_dict", "output_layers", "prune", "rankings", "register_criterion", "register_granularity",
    "register_pruner", "register_unit_kind", "restore", "sparse_state_dict_bytes",
]


def register_pruner(module_type: type, pruner: tp.pruner.function.BasePruningFunc) -> None:
    """Teach structured pruning a layer type: a torch-pruning pruner (``prune_out_channels``,
    ``prune_in_channels``, ``get_out_channels``, ``get_in_channels``) for ``module_type``."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_pruner needs an nn.Module subclass, but got {module_type!r}")
    tpgraph.PRUNERS[module_type] = pruner


def _context(model: nn.Module, example_inputs: Inputs, nm_block: int = 4, policy: Policy | None = None) -> Context:
    return Context(model, example_inputs, nm_block=nm_block, kinds=UNIT_KINDS.values(), policy=policy)


def discover_groups(model: nn.Module, example_inputs: Inputs, granularities: Iterable[str] = ("channel",),
                    nm_block: int = 4) -> list[PrunableGroup]:
    """The model's prunable groups for ``granularities``, in module order (each group once; its
    ``granularities`` say which can prune it). Output layers are never structured groups.

    >>> from evaluators.models import DigitsCNN
    >>> [g.name for g in discover_groups(DigitsCNN(), torch.zeros(1, 1, 8, 8))]
    ['features.0', 'features.3', 'features.7', 'classifier.1']
    """
    granularities = tuple(granularities)
    for g in granularities:
        get_granularity(g)
    context = _context(model, example_inputs, nm_block)
    engines = list({id(GRANULARITIES[g].engine): GRANULARITIES[g].engine for g in GRANULARITIES if g in granularities}.values())
    found: dict[str, PrunableGroup] = {}
    for engine in engines:
        for unit in engine.units(context, granularities):
            found.setdefault(unit.name, unit.to_group())
    return list(found.values())


def check_space(granularities: Iterable[str], criteria: Iterable[str], groups: Iterable[PrunableGroup]) -> None:
    """Raise unless every group's kind is registered and every criterion can score the groups of
    every granularity it may be paired with.

    >>> check_space(["unstructured"], ["fpgm"], [PrunableGroup("fc.weight", "weight", 8, granularities=("unstructured",))])
    Traceback (most recent call last):
    evaluators.prune_base.PruningError: criterion 'fpgm' does not apply to granularity 'unstructured' (weight groups such as 'fc.weight'); criteria for it: l1, l2, lamp, random, taylor, wanda
    """
    groups = list(groups)
    known = units.group_kinds()
    for g in groups:
        if g.kind not in known:
            raise PruningError(f"group {g.name!r} has kind {g.kind!r}, which no registered unit kind prunes; "
                               f"valid kinds: {', '.join(sorted(known))}")
    for gran in granularities:
        kinds = {g.kind: g.name for g in groups if gran in g.granularities}
        for name in criteria:
            criterion = get_criterion(name)
            for kind, example in kinds.items():
                if kind not in criterion.kinds:
                    raise PruningError(f"criterion {name!r} does not apply to granularity {gran!r} ({kind} groups such as "
                                       f"{example!r}); criteria for it: {', '.join(units.applicable(kind))}")


def check_ratios(model: nn.Module, example_inputs: Inputs, space: SearchSpace) -> None:
    """Refuse, before any trial, a ratio ``space`` fixes or searches that a unit kind cannot carry out
    as asked (:meth:`UnitKind.check_ratios`: e.g. a head ratio that breaks grouped-query attention,
    with the valid ratios), for every grouped-query mode the space may choose (``space.gqa``)."""
    context = _context(model, example_inputs, space.config.nm_block)
    for gran in space.config.granularity:
        found = {u.name: u for u in get_granularity(gran).engine.units(context, [gran])}
        for mode in space.config.gqa:
            policy = Policy(criterion=space.config.criteria[0], ratios={}, granularity=gran, min_channels=space.config.min_channels,
                            group_min_channels=space.group_min_channels, gqa=mode)
            for d in space.dimensions(gran):
                ratios = [d.fixed] if d.range is None else d.range.values()
                for name in d.members:
                    if name in found:
                        found[name].handler.check_ratios(found[name], ratios, d.range is None, policy)


def prune(policy: Policy, model: nn.Module, example_inputs: Inputs, calibration: Calibration | None = None) -> PruneReport:
    """Prune ``model`` in place as ``policy`` says; return what was removed (and the model).

    ``calibration`` (a :class:`~evaluators.batches.Calibration`) is what data-dependent criteria
    run: ``taylor`` takes the gradients of ``calibration.loss``, ``wanda`` the norms of the inputs
    each layer sees. Every group named in ``policy.ratios`` must exist in the model; groups it does
    not name are kept. Then the whole blocks ``policy.drop_blocks`` names (module names of the dense
    model) are removed through :mod:`evaluators.depth`. Gradients left by calibration are cleared.
    """
    criterion = get_criterion(policy.criterion)
    granularity = get_granularity(policy.granularity)
    depth.check(model, policy.drop_blocks, example_inputs)  # a block that cannot go is refused before anything changes
    if not policy.ratios:
        depth.drop(model, policy.drop_blocks, example_inputs)
        return PruneReport(policy.granularity, {}, model)
    needs = criterion.needs_gradients or criterion.needs_activations
    if needs and calibration is None:
        raise PruningError(f"criterion {policy.criterion!r} needs calibration data: pass calibration=Calibration(...) "
                           "(evaluators.batches) to apply(); or choose a data-free criterion (l1, l2, lamp, fpgm, bn_scale, random)")

    def stats() -> Stats | None:
        if not needs:
            return None
        return calibrate(model, calibration, gradients=criterion.needs_gradients, activations=criterion.needs_activations)

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(policy.seed)
            report = granularity.engine.prune(_context(model, example_inputs, policy.nm_block, policy), policy, criterion, stats)
    finally:
        if criterion.needs_gradients:
            for p in model.parameters():
                p.grad = None
    if granularity.engine.reshapes:
        check_runs(model, example_inputs, f"{policy.granularity} pruning")
    depth.drop(model, policy.drop_blocks, example_inputs)  # whole blocks go after the widths (names are the dense model's)
    return report


def rankings(model: nn.Module, example_inputs: Inputs, granularity: str, criterion: str, names: list[str],
             min_channels: int = 1, group_min_channels: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Per group, the ascending scores of the units a global ranking could remove, comparable across
    groups as ``Policy.global_groups`` compares them (structured groups: mean-normalised; weights:
    raw scores). ``criterion`` must be data-free (l1, l2, lamp, fpgm, bn_scale); the model is unchanged.

    >>> from evaluators.models import DigitsCNN
    >>> ranks = rankings(DigitsCNN(), torch.zeros(1, 1, 8, 8), "channel", "l1", ["features.0"])
    >>> len(ranks["features.0"]), bool((ranks["features.0"].diff() >= 0).all())  # 32 filters, 1 must stay
    (31, True)
    """
    crit = get_criterion(criterion)
    if crit.needs_gradients or crit.needs_activations:
        raise PruningError(f"rankings() needs a data-free criterion, but {criterion!r} needs calibration data")
    engine = get_granularity(granularity).engine
    if not engine.ranks:
        valid = [g for g, entry in GRANULARITIES.items() if entry.engine.ranks]
        raise PruningError(f"granularity {granularity!r} has no global ranking; valid: {', '.join(valid)}")
    floor = Policy(criterion=crit.name, ratios={}, min_channels=min_channels, group_min_channels=dict(group_min_channels or {}))
    return engine.rankings(_context(model, example_inputs), granularity, crit, names, floor)


def apply(policy: Policy, model: nn.Module, example_inputs: Inputs, calibration: Calibration | None = None) -> nn.Module:
    """Prune ``model`` in place as ``policy`` says and return it (a plain ``nn.Module``); see :func:`prune`."""
    return prune(policy, model, example_inputs, calibration).model


def restore(policy: Policy, model: nn.Module, example_inputs: Inputs, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Rebuild a saved pruned model: give the dense ``model`` the shapes ``state_dict`` has (as
    ``policy`` pruned them), load the weights, return it. Needs no calibration data: which units
    were kept is in the weights (and for masks, the zeros in ``state_dict`` become the masks again).
    The blocks ``policy.drop_blocks`` names go first here (their weights are not in ``state_dict``,
    and a residual stream's width is read from layers that may be inside them); the widths of the
    groups left are then read from ``state_dict``: the same shapes as :func:`prune` (widths, then
    blocks) made.
    """
    get_criterion(policy.criterion)
    if policy.drop_blocks:
        depth.drop(model, policy.drop_blocks, example_inputs)
        policy = _outside(policy, policy.drop_blocks)
    if policy.ratios:
        get_granularity(policy.granularity).engine.prune(_context(model, example_inputs, policy.nm_block, policy), policy, None,
                                                         lambda: None, shapes=state_dict)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        first = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
        raise PruningError(f"the saved weights do not fit {type(model).__name__} pruned by their policy: {first}") from None
    return model


def _outside(policy: Policy, blocks: Iterable[str]) -> Policy:
    """``policy`` without the ratios of groups inside ``blocks`` (removed whole, nothing left to prune)."""
    inside = [g for g in policy.ratios if any(g == b or g.startswith(b + ".") for b in blocks)]
    if not inside:
        return policy
    return dataclasses.replace(policy, ratios={g: r for g, r in policy.ratios.items() if g not in inside},
                               global_groups=tuple(g for g in policy.global_groups if g not in inside))
