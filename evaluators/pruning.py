"""One path for every granularity: ``apply(policy, model, example_inputs, calibration=None)``.

- ``channel``: conv filters and linear neurons through torch-pruning's dependency graph (coupled
  BatchNorms, next-layer inputs, residual partners, depthwise convs and concatenations follow);
- ``structured``: ``channel`` plus attention heads and LSTM/GRU/RNN hidden units;
- ``unstructured``: per-layer or global masks on single weights, baked into the weights;
- ``nm``: N:M semi-structured masks (2:4 = ratio 0.5 with ``nm_block`` 4).

The pruned model is a plain ``nn.Module``. Criteria live in :mod:`evaluators.criteria`; ``taylor``
and ``wanda`` need ``calibration`` batches. Errors are :class:`PruningError`s that name the group or
module at fault and what to do; a policy that cannot apply is refused before the model changes.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch_pruning as tp
from torch import nn

from evaluators import sparsity, structured
from evaluators.criteria import CRITERIA, Criterion, Stats, applicable, calibrate, get_criterion, register_criterion
from evaluators.prune_base import PruneReport, PruningError, channels_to_keep, check_runs, output_layers
from evaluators.sparsity import effective_macs_and_params, load_sparse_state_dict, sparse_state_dict_bytes
from spaces import GRANULARITIES, Policy, PrunableGroup

__all__ = [
    "CRITERIA", "GRANULARITY_KINDS", "Criterion", "PruneReport", "PruningError", "apply", "channels_to_keep", "check_space",
    "discover_groups", "effective_macs_and_params", "load_sparse_state_dict", "output_layers", "prune", "register_criterion",
    "rankings", "register_pruner", "restore", "sparse_state_dict_bytes",
]

GRANULARITY_KINDS: dict[str, tuple[str, ...]] = {
    "channel": ("conv", "linear"),
    "structured": ("conv", "linear", "attention-heads", "rnn-hidden"),
    "unstructured": ("weight",),
    "nm": ("weight",),
}


def register_pruner(module_type: type, pruner: tp.pruner.function.BasePruningFunc) -> None:
    """Teach structured pruning a layer type: a torch-pruning pruner (``prune_out_channels``,
    ``prune_in_channels``, ``get_out_channels``, ``get_in_channels``) for ``module_type``."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_pruner needs an nn.Module subclass, but got {module_type!r}")
    structured.CUSTOM_PRUNERS[module_type] = pruner


def discover_groups(model: nn.Module, example_inputs: torch.Tensor, granularities: Iterable[str] = ("channel",),
                    nm_block: int = 4) -> list[PrunableGroup]:
    """The model's prunable groups for ``granularities``, in module order (each group once; its
    ``granularities`` say which can prune it). Output layers are never structured groups.

    >>> from evaluators.models import DigitsCNN
    >>> [g.name for g in discover_groups(DigitsCNN(), torch.zeros(1, 1, 8, 8))]
    ['features.0', 'features.3', 'features.7', 'classifier.1']
    """
    granularities = tuple(granularities)
    unknown = [g for g in granularities if g not in GRANULARITIES]
    if unknown:
        raise PruningError(f"unknown granularity {unknown[0]!r}; valid: {', '.join(GRANULARITIES)}")
    found: list[PrunableGroup] = []
    kinds = tuple(k for g in granularities for k in GRANULARITY_KINDS[g] if k != "weight")
    if kinds:
        for unit in structured.StructuredGraph(model, example_inputs).units(kinds):
            grans = tuple(g for g in ("channel", "structured") if unit.kind in GRANULARITY_KINDS[g])
            found.append(PrunableGroup(unit.name, unit.kind, unit.size, unit.members or (unit.name,), grans))
    if {"unstructured", "nm"} & set(granularities):
        found += sparsity.discover(model, granularities, nm_block)
    return found


def check_space(granularities: Iterable[str], criteria: Iterable[str], groups: Iterable[PrunableGroup]) -> None:
    """Raise unless every criterion can score the groups of every granularity it may be paired with.

    >>> check_space(["unstructured"], ["fpgm"], [PrunableGroup("fc.weight", "weight", 8)])
    Traceback (most recent call last):
    evaluators.prune_base.PruningError: criterion 'fpgm' does not apply to granularity 'unstructured' (weight groups such as 'fc.weight'); criteria for it: l1, l2, lamp, random, taylor, wanda
    """
    groups = list(groups)
    for gran in granularities:
        kinds = {g.kind: g.name for g in groups if gran in g.granularities}
        for name in criteria:
            criterion = get_criterion(name)
            for kind, example in kinds.items():
                if kind not in criterion.kinds:
                    raise PruningError(f"criterion {name!r} does not apply to granularity {gran!r} ({kind} groups such as "
                                       f"{example!r}); criteria for it: {', '.join(applicable(kind))}")


def prune(policy: Policy, model: nn.Module, example_inputs: torch.Tensor, calibration: Any = None) -> PruneReport:
    """Prune ``model`` in place as ``policy`` says; return what was removed (and the model).

    ``calibration`` is a tensor of inputs or ``(inputs, targets)`` (at most the first
    ``criteria.CALIBRATION_SAMPLES`` are used); ``taylor`` needs targets, ``wanda`` inputs. Every
    group named in ``policy.ratios`` must exist in the model; groups it does not name are kept.
    Gradients left by calibration are cleared.
    """
    criterion = get_criterion(policy.criterion)
    if not policy.ratios:
        return PruneReport(policy.granularity, {}, model)
    needs = criterion.needs_gradients or criterion.needs_activations
    if needs and calibration is None:
        raise PruningError(f"criterion {policy.criterion!r} needs calibration data: pass calibration=(inputs, targets) "
                           "to apply(); or choose a data-free criterion (l1, l2, lamp, fpgm, bn_scale, random)")

    def stats() -> Stats | None:
        if not needs:
            return None
        return calibrate(model, calibration, gradients=criterion.needs_gradients, activations=criterion.needs_activations)

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(policy.seed)
            if policy.granularity in ("unstructured", "nm"):
                report = sparsity.prune(model, policy, criterion, stats)
            else:
                report = structured.prune(model, example_inputs, policy, criterion, stats,
                                          kinds=GRANULARITY_KINDS[policy.granularity])
    finally:
        if criterion.needs_gradients:
            for p in model.parameters():
                p.grad = None
    if policy.granularity in ("channel", "structured"):
        check_runs(model, example_inputs, f"{policy.granularity} pruning")
    return report


def rankings(model: nn.Module, example_inputs: torch.Tensor, granularity: str, criterion: str, names: list[str],
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
    if granularity == "unstructured":
        return sparsity.rankings(model, crit, names)
    if granularity not in ("channel", "structured"):
        raise PruningError(f"granularity {granularity!r} has no global ranking; valid: channel, structured, unstructured")
    return structured.rankings(model, example_inputs, crit, GRANULARITY_KINDS[granularity], names, min_channels, group_min_channels)


def apply(policy: Policy, model: nn.Module, example_inputs: torch.Tensor, calibration: Any = None) -> nn.Module:
    """Prune ``model`` in place as ``policy`` says and return it (a plain ``nn.Module``); see :func:`prune`."""
    return prune(policy, model, example_inputs, calibration).model


def restore(policy: Policy, model: nn.Module, example_inputs: torch.Tensor, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Rebuild a saved pruned model: give the dense ``model`` the shapes ``state_dict`` has (as
    ``policy`` pruned them), load the weights, return it. Needs no calibration data: which units
    were kept is in the weights (and for masks, the zeros in ``state_dict`` become the masks again).
    """
    get_criterion(policy.criterion)
    if policy.ratios:
        if policy.granularity in ("unstructured", "nm"):
            sparsity.prune(model, policy, None, lambda: None, shapes=state_dict)
        else:
            structured.prune(model, example_inputs, policy, None, lambda: None, kinds=GRANULARITY_KINDS[policy.granularity],
                             shapes=state_dict)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        first = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
        raise PruningError(f"the saved weights do not fit {type(model).__name__} pruned by their policy: {first}") from None
    return model
