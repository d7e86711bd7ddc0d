"""What a unit kind is: how one kind of prunable unit is found in a model, checked, scored,
removed, and read back from a saved state dict. The granularity engines
(:mod:`evaluators.granularities`) only talk to kinds through :class:`UnitKind`; nothing here assumes
channels or torch-pruning (the channel and recurrent kinds use torch-pruning's dependency graph
through :mod:`evaluators.units.graph`, the others do not).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Mapping, Sequence

import torch
from torch import nn

from evaluators.prune_base import output_layers
from spaces import Policy, PrunableGroup

if TYPE_CHECKING:  # criteria import the unit kinds' modules: only type names here
    from evaluators.criteria import Criterion, Stats

Scores = dict[Hashable, torch.Tensor]  # one score tensor per set of units chosen together (key None if one set)
Keep = dict[Hashable, Any]             # per key of the scores: the unit indices kept (count engines) or a bool mask (masks)


@dataclasses.dataclass
class Unit:
    """One prunable group of the current model, as a unit kind found it.

    ``name`` is the group's name in policies (a module name; a parameter name for weight masks),
    ``kind`` its :attr:`PrunableGroup.kind`, ``size`` how many units it has, ``module`` the module
    it prunes, ``members`` the modules whose outputs go with it, ``granularities`` which
    granularities may prune it, ``state`` what its kind needs to prune it later (a torch-pruning
    group, an attention layout, ...). ``handler`` is set by the registry to the kind that found it.
    """

    name: str
    kind: str
    size: int
    module: nn.Module
    members: tuple[str, ...] = ()
    granularities: tuple[str, ...] = ()
    state: Any = None
    handler: UnitKind | None = None

    def to_group(self) -> PrunableGroup:
        return PrunableGroup(self.name, self.kind, self.size, self.members or (self.name,), self.granularities)


class Context:
    """The model being pruned, its example inputs, the policy (when one is applied), and what unit kinds share while they work on it
    (module names and order, the layers producing its output, values computed once and memoised).

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> context = Context(model, torch.zeros(1, 4))
    >>> context.position["2"], [context.names[m] for m in context.protected]
    (3, ['2'])
    """

    def __init__(self, model: nn.Module, example_inputs: Any, *, nm_block: int = 4, kinds: Iterable[UnitKind] = (),
                 policy: Policy | None = None) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.nm_block = nm_block
        self.policy = policy  # the policy being applied or restored, when there is one (kinds may read its settings, e.g. gqa)
        self.kinds = tuple(kinds)
        self.names = {m: n for n, m in model.named_modules()}
        self.position = {n: i for i, n in enumerate(self.names.values())}
        self._memo: dict[str, Any] = {}

    def memo(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()`` once per context (keyed by ``key``); later calls return the same value."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    @property
    def protected(self) -> list[nn.Module]:
        """Layers whose output is the model's output (never pruned by structured kinds)."""
        return self.memo("output_layers", lambda: output_layers(self.model, self.example_inputs))

    @property
    def reserved(self) -> set[int]:
        """Ids of modules some kind prunes as its own units (e.g. q/k/v projections pruned as heads):
        other kinds must not remove their outputs as free channels."""
        return self.memo("reserved", lambda: {id(m) for kind in self.kinds for m in kind.reserved(self)})


class UnitKind:
    """How one kind of prunable unit is found, checked, scored and removed. Subclass it in one file
    and register an instance (``evaluators.pruning.register_unit_kind``); see the README's
    contributor section for a worked example.

    Class attributes:

    - ``name``: the registry key;
    - ``kinds``: the :attr:`PrunableGroup.kind` names its units carry;
    - ``granularities``: the granularities that prune it (their engine calls it);
    - ``scorer``: the :class:`~evaluators.criteria.Criterion` method its :meth:`score` calls
      (``channel_importance``, ``unit_scores``, ``weight_scores`` or one a new criterion adds):
      a criterion applies to this kind exactly when it implements that method.

    Engines that keep a count of units per group (``channel``, ``structured``) call :meth:`find`,
    :meth:`check`, :meth:`limits`, :meth:`score`, then :meth:`prune` with the indices to keep
    (the highest scores of each score tensor), then :meth:`finish`; ``restore`` calls :meth:`saved`
    instead of scoring.
    """

    name = ""
    kinds: tuple[str, ...] = ()
    granularities: tuple[str, ...] = ("structured",)
    scorer = "unit_scores"

    def reserved(self, context: Context) -> Iterable[nn.Module]:
        """Modules whose outputs this kind prunes as its own units (other kinds leave them alone)."""
        return ()

    def find(self, context: Context) -> list[Unit]:
        """The units of this kind in ``context.model``, each once (any order: engines sort them)."""
        raise NotImplementedError

    def check(self, unit: Unit, context: Context) -> None:
        """Raise a :class:`~evaluators.prune_base.PruningError` naming the unit if it cannot be pruned."""

    def limits(self, unit: Unit, policy: Policy) -> tuple[int, int]:
        """(the fewest units the group keeps, the multiple its kept count is rounded up to)."""
        return min(policy.group_min_channels.get(unit.name, policy.min_channels), unit.size), policy.round_to

    def check_ratios(self, unit: Unit, ratios: Sequence[float], fixed: bool, policy: Policy) -> None:
        """Refuse, before any trial, ratios a search space gives the unit that it cannot carry out
        (a :class:`~evaluators.prune_base.PruningError` naming the unit and the valid ratios):
        ``ratios`` is the one fixed ratio (``fixed``) or the values of its searched range."""

    def score(self, unit: Unit, criterion: Criterion, stats: Stats | None) -> Scores:
        """Scores of the unit's units (higher = more important): one tensor of ``unit.size`` scores
        (key None), or several when parts of the unit choose their units apart (an RNN's layers)."""
        raise NotImplementedError

    def prune(self, unit: Unit, keep: Keep, context: Context) -> None:
        """Remove every unit but ``keep[key]`` (sorted indices, same keys as :meth:`score` gave), in place."""
        raise NotImplementedError

    def saved(self, unit: Unit, state_dict: Mapping[str, torch.Tensor]) -> Any:
        """What a saved pruned ``state_dict`` kept of the unit, for ``restore``: for count engines, how
        many units (when which ones does not matter: the weights are loaded over them) or the
        :data:`Keep` itself (when it does, e.g. blocks whose keys are gone); a bool mask for masks."""
        raise NotImplementedError

    def finish(self, units: Sequence[Unit], context: Context) -> None:
        """Called once after this kind's ``units`` were pruned (e.g. to check the model still runs)."""


def normalised(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` (flattened, float) divided by their mean, so that groups of different scales compare."""
    scores = scores.detach().float().flatten()
    mean = scores.mean()
    return scores / mean if mean > 0 else scores


def detached(t: torch.Tensor, grad: bool) -> torch.Tensor:
    """``t``'s values, or its gradient (zeros when it has none), detached."""
    if not grad:
        return t.detach()
    return t.grad.detach() if t.grad is not None else torch.zeros_like(t)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``model`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding only the output ``rows`` and input ``cols`` of ``linear`` (None: all)."""
    weight = linear.weight.detach()
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, cols] if cols is not None else weight
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach()[rows] if rows is not None else linear.bias.detach())
    return new.train(linear.training)
