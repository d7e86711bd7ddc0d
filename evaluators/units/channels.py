"""Conv filters and linear neurons: the groups of coupled output channels that torch-pruning's
dependency graph finds (coupled BatchNorms, next-layer inputs, residual partners, depthwise convs
and concatenations follow), pruned through the graph.

A group is named after the layer torch-pruning grows it from, except a residual stream (channels
that several layers write and a residual add joins): it is named after the layer that writes it
nearest the model's input (fewest graph steps; module order on ties), i.e. after what starts it (the
stem, a stage's shortcut projection, a patch or token embedding), not after whichever block adds to
it. The kind is ``conv`` when the named layer is a conv, else ``linear``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Mapping

import torch
import torch_pruning as tp
from torch import nn

from evaluators.prune_base import PruningError
from evaluators.units import graph as tpgraph
from evaluators.units.base import Context, Keep, Scores, Unit, UnitKind
from spaces import Policy

CHANNEL_ROOTS = (nn.Conv1d, nn.Conv2d, nn.Linear)
WRITERS = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, nn.RNNBase)  # layers whose outputs a group removes
tpgraph.ROOTS.extend(CHANNEL_ROOTS)


@dataclasses.dataclass
class GraphGroup:
    """A torch-pruning group and what this project reads from it."""

    group: Any                 # the torch-pruning group (all output channels of its root)
    root: nn.Module            # the layer torch-pruning grew the group from
    root_name: str
    multiple: int = 1          # coupled nn.MultiheadAttention modules need the width to stay a multiple of their heads
    unwrapped: tuple[str, ...] = ()  # parameters the group reaches that no pruner handles
    states_read: bool = False  # a recurrent root whose final states (not only its outputs) are read


def graph_group(context: Context, group: Any) -> tuple[GraphGroup, list[nn.Module]]:
    """The :class:`GraphGroup` of a torch-pruning group, and the layers whose outputs it removes (module order)."""
    graph = tpgraph.graph_of(context)
    multiple, unwrapped = 1, []
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.MultiheadAttention):
            multiple = math.lcm(multiple, module.num_heads)
        if isinstance(module, nn.Parameter):  # a parameter used outside any known layer
            pname = graph.param_names.get(id(module), "?")
            owner = context.model.get_submodule(pname.rpartition(".")[0])
            if not any(True for _ in owner.children()):  # a custom layer: its weights would not follow
                unwrapped.append(f"{pname} of module {pname.rpartition('.')[0]!r} ({type(owner).__name__})")
    writers = {m for m in graph.out_channel_modules(group) if isinstance(m, WRITERS)}
    root = group[0].dep.target.module
    ordered = sorted(writers | {root}, key=lambda m: context.position[context.names[m]])
    return GraphGroup(group, root, context.names[root], multiple, tuple(dict.fromkeys(unwrapped))), ordered


def graph_groups(context: Context, types: tuple[type, ...]) -> Iterator[tuple[nn.Module, GraphGroup, list[nn.Module]]]:
    """(root, :class:`GraphGroup`, writers) of every torch-pruning group rooted at a layer of ``types``
    that no kind reserved (output layers are never roots)."""
    for group in tpgraph.graph_of(context).groups(context.protected):
        root = group[0].dep.target.module
        if isinstance(root, types) and id(root) not in context.reserved:  # e.g. q/k/v rows pruned as heads
            yield (root, *graph_group(context, group))


def is_residual(group: Any) -> bool:
    """Whether a residual add joins the group's channels (an elementwise add torch-pruning traced)."""
    return any(isinstance(dep.target.module, tp.ops._ElementWiseOp) and "add" in str(dep.target.module._grad_fn).lower()
               for dep, _ in group)


def check_unwrapped(unit: Unit) -> None:
    """Refuse a graph group that reaches parameters no pruner handles (they would not follow)."""
    if unit.state.unwrapped:
        raise PruningError(
            f"group {unit.name!r} reaches parameter {'; '.join(unit.state.unwrapped)}, which no structured pruner handles "
            f"(its weights would not follow the pruned channels); exclude the group (space.rules: {{match: {unit.name!r}, "
            "exclude: true}) or register a pruner for that module type (evaluators.pruning.register_pruner)"
        )


def drop_indices(size: int, kept: list[int]) -> list[int]:
    """The indices of ``range(size)`` not in ``kept``."""
    kept_set = set(kept)
    return [i for i in range(size) if i not in kept_set]


class Channels(UnitKind):
    """Output channels of conv and linear layers, with everything coupled to them."""

    name = "channels"
    kinds = ("conv", "linear")
    granularities = ("channel", "structured")
    scorer = "channel_importance"

    def find(self, context: Context) -> list[Unit]:
        if not any(isinstance(m, CHANNEL_ROOTS) and id(m) not in context.reserved for m in context.model.modules()):
            return []  # every layer is another kind's (a Hugging Face transformer's): no dependency graph to build
        graph = tpgraph.graph_of(context)
        found = []
        for root, state, writers in graph_groups(context, CHANNEL_ROOTS):
            first = root
            if is_residual(state.group):
                first = min(writers, key=lambda m: (graph.hops(m), context.position[context.names[m]]))
            kind = "conv" if isinstance(first, nn.modules.conv._ConvNd) else "linear"
            size = int(graph.dependencies.get_out_channels(root))
            members = tuple(context.names[m] for m in writers)
            found.append(Unit(context.names[first], kind, size, root, members, self.granularities, state))
        return found

    def check(self, unit: Unit, context: Context) -> None:
        check_unwrapped(unit)

    def limits(self, unit: Unit, policy: Policy) -> tuple[int, int]:
        floor, multiple = super().limits(unit, policy)
        return floor, math.lcm(multiple, unit.state.multiple)

    def score(self, unit: Unit, criterion: Any, stats: Any) -> Scores:
        with torch.no_grad():
            scores = criterion.channel_importance(stats)(unit.state.group)
        if scores is None:
            extra = " (it has no BatchNorm)" if criterion.name == "bn_scale" else ""
            raise PruningError(f"criterion {criterion.name!r} gives no score for group {unit.name!r}{extra}; use another criterion")
        return {None: scores}

    def prune(self, unit: Unit, keep: Keep, context: Context) -> None:
        unit.state.group.prune(idxs=drop_indices(unit.size, keep[None]))

    def saved(self, unit: Unit, state_dict: Mapping[str, torch.Tensor]) -> int:
        key = f"{unit.state.root_name}.weight"
        if key not in state_dict:
            raise PruningError(f"the saved state dict has no {key!r}: it does not belong to this model and policy")
        return int(state_dict[key].shape[0])

