"""Hidden units of ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (multi-layer, bidirectional): the unit kind
``rnn-hidden``.

torch-pruning's own LSTM pruner refuses ``num_layers > 1`` and mixes up gate rows, so this module
registers its own pruner for recurrent layers with torch-pruning's dependency graph: the graph
finds the layers that consume the recurrent output (their input columns follow), and
:class:`RNNPruner` rebuilds the recurrent module in place with fewer hidden units. Every layer and
direction keeps the same number of units (``nn.LSTM`` has one ``hidden_size``) but chooses its own.

A model may read the final hidden (and cell) state instead of the outputs (``_, (h_n, _) =
self.lstm(x)``, packed or not). While the graph is traced, :func:`trace_states` shows torch-pruning
those states as outputs of the recurrent layer (they hold the same hidden units), so the layers
reading them follow. Which layer and direction a slice of ``h_n`` belongs to is not traced, so a
module read through its states keeps the same units in every layer and direction (scored over all
of them), which any slice of the states then agrees with.

Unit ``j`` of layer ``l``, direction ``d`` owns: row ``g * H + j`` of every gate ``g`` in
``weight_ih``/``weight_hh``/biases, column ``j`` of ``weight_hh``, and column ``d * H + j`` of
the next layer's ``weight_ih`` (of the module's output for the last layer).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch.utils.hooks import RemovableHandle

from evaluators.prune_base import PruningError
from evaluators.units import graph as tpgraph
from evaluators.units.base import Context, Keep, Scores, Unit, UnitKind, detached, normalised
from evaluators.units.channels import check_unwrapped, drop_indices, graph_groups

RNN_TYPES = (nn.LSTM, nn.GRU, nn.RNN)
_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


def gates(rnn: nn.RNNBase) -> int:
    for cls, count in _GATES.items():
        if isinstance(rnn, cls):
            return count
    raise PruningError(f"{type(rnn).__name__} is not an LSTM, GRU or RNN")


def directions(rnn: nn.RNNBase) -> int:
    return 2 if rnn.bidirectional else 1


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")


def check_prunable(rnn: nn.Module, name: str) -> None:
    """Raise a :class:`PruningError` unless ``rnn`` is a recurrent layer this module can prune."""
    if not isinstance(rnn, RNN_TYPES):
        raise PruningError(f"module {name!r} ({type(rnn).__name__}) has no hidden-unit pruner; exclude it, or "
                           "register a pruner for its type (evaluators.pruning.register_pruner)")
    if getattr(rnn, "proj_size", 0):
        raise PruningError(f"module {name!r}: LSTM with proj_size={rnn.proj_size} is not supported by the hidden-unit "
                           "pruner; exclude it (space.rules: {match: ..., exclude: true})")


def unit_vectors(rnn: nn.RNNBase, layer: int, direction: int, grad: bool = False) -> torch.Tensor:
    """One row per hidden unit of (``layer``, ``direction``): every weight the unit owns (or their gradients).

    >>> lstm = nn.LSTM(3, 5, num_layers=2)
    >>> unit_vectors(lstm, 0, 0).shape  # 4 gates x (3 inputs + 5 recurrent) + 4 x 5 recurrent column + 4 x 5 next layer
    torch.Size([5, 72])
    """
    hidden, count = rnn.hidden_size, gates(rnn)

    def value(name: str) -> torch.Tensor:
        return detached(getattr(rnn, name), grad)

    w_ih = value("weight_ih" + _suffix(layer, direction))
    w_hh = value("weight_hh" + _suffix(layer, direction))
    parts = [
        w_ih.view(count, hidden, -1).transpose(0, 1).reshape(hidden, -1),
        w_hh.view(count, hidden, -1).transpose(0, 1).reshape(hidden, -1),
        w_hh.t(),
    ]
    if layer + 1 < rnn.num_layers:
        for d in range(directions(rnn)):
            nxt = value("weight_ih" + _suffix(layer + 1, d))
            parts.append(nxt[:, direction * hidden:(direction + 1) * hidden].t())
    return torch.cat(parts, dim=1)


def rebuild(rnn: nn.RNNBase, drops: dict[tuple[int, int], Sequence[int]]) -> None:
    """Remove the hidden units ``drops[(layer, direction)]`` from ``rnn`` in place (same count everywhere)."""
    hidden, count, dirs = rnn.hidden_size, gates(rnn), directions(rnn)
    keep = {k: [j for j in range(hidden) if j not in set(v)] for k, v in drops.items()}
    sizes = {len(v) for v in keep.values()}
    if len(sizes) != 1 or set(keep) != {(l, d) for l in range(rnn.num_layers) for d in range(dirs)}:
        raise PruningError(f"every layer and direction of a recurrent module must keep the same number of units, "
                           f"but the plan keeps {dict((k, len(v)) for k, v in keep.items())}")
    new_hidden = sizes.pop()
    if new_hidden < 1:
        raise PruningError("a recurrent module must keep at least one hidden unit")
    with torch.no_grad():
        for layer in range(rnn.num_layers):
            for d in range(dirs):
                sfx, kept = _suffix(layer, d), keep[(layer, d)]
                rows = torch.tensor([g * hidden + j for g in range(count) for j in kept])
                w_ih = getattr(rnn, "weight_ih" + sfx)[rows]
                if layer > 0:
                    cols = torch.tensor([d2 * hidden + j for d2 in range(dirs) for j in keep[(layer - 1, d2)]])
                    w_ih = w_ih[:, cols]
                new = {"weight_ih": w_ih, "weight_hh": getattr(rnn, "weight_hh" + sfx)[rows][:, torch.tensor(kept)]}
                if rnn.bias:
                    new["bias_ih"] = getattr(rnn, "bias_ih" + sfx)[rows]
                    new["bias_hh"] = getattr(rnn, "bias_hh" + sfx)[rows]
                for base, tensor in new.items():
                    old = getattr(rnn, base + sfx)
                    setattr(rnn, base + sfx, nn.Parameter(tensor.clone(), requires_grad=old.requires_grad))
    rnn.hidden_size = new_hidden


class RNNPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning pruner for recurrent layers: output channels are the module's output features
    (``direction * hidden_size + unit`` of the last layer); input channels are ``input_size``.

    The units of the inner layers come from a plan set in :attr:`plans` before the group is pruned;
    without one, every layer drops the same units as the last.
    """

    TARGET_MODULES = RNN_TYPES

    def __init__(self) -> None:
        super().__init__()
        self.plans: dict[nn.Module, dict[tuple[int, int], list[int]]] = {}

    def get_out_channels(self, layer: nn.RNNBase) -> int:
        return layer.hidden_size * directions(layer)

    def get_in_channels(self, layer: nn.RNNBase) -> int:
        return layer.input_size

    def prune_out_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
        hidden, dirs = layer.hidden_size, directions(layer)
        last = {d: sorted(i - d * hidden for i in idxs if d * hidden <= i < (d + 1) * hidden) for d in range(dirs)}
        plan = self.plans.pop(layer, None)
        if plan is None:
            plan = {(l, d): last[d] for l in range(layer.num_layers) for d in range(dirs)}
        elif any(sorted(plan[(layer.num_layers - 1, d)]) != last[d] for d in range(dirs)):
            raise PruningError("recurrent pruning plan disagrees with the output channels torch-pruning removes")
        rebuild(layer, plan)
        return layer

    def prune_in_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
        keep = torch.tensor([i for i in range(layer.input_size) if i not in set(idxs)])
        with torch.no_grad():
            for d in range(directions(layer)):
                name = "weight_ih" + _suffix(0, d)
                old = getattr(layer, name)
                setattr(layer, name, nn.Parameter(old[:, keep].clone(), requires_grad=old.requires_grad))
        layer.input_size = len(keep)
        return layer


@torch.no_grad()
def weight_inputs(rnn: nn.RNNBase, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each weight matrix of ``rnn`` multiplies on ``inputs`` (zero initial state, no dropout),
    keyed by parameter name: layer inputs for ``weight_ih_l*``, the direction's hidden states for ``weight_hh_l*``."""
    x = inputs if rnn.batch_first else inputs.transpose(0, 1)
    seen: dict[str, torch.Tensor] = {}
    for layer in range(rnn.num_layers):
        single = type(rnn)(x.shape[-1], rnn.hidden_size, batch_first=True, bias=rnn.bias, bidirectional=rnn.bidirectional,
                           **({"nonlinearity": rnn.nonlinearity} if isinstance(rnn, nn.RNN) else {}))
        for d in range(directions(rnn)):
            for base in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                if hasattr(single, base + _suffix(0, d)):
                    getattr(single, base + _suffix(0, d)).copy_(getattr(rnn, base + _suffix(layer, d)))
        out, _ = single.to(x.dtype)(x)
        for d in range(directions(rnn)):
            seen["weight_ih" + _suffix(layer, d)] = x
            seen["weight_hh" + _suffix(layer, d)] = out[..., d * rnn.hidden_size:(d + 1) * rnn.hidden_size]
        x = out
    return seen


# ------------------------------------------------------------------------------- tracing the final states
class _Traced(torch.autograd.Function):
    """Tracing only: the recurrent output as one operation of the layer's input, so that torch-pruning
    sees the layer as a whole rather than the gate arithmetic inside it."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return output.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None]:
        return None, None


class _TracedStates(torch.autograd.Function):
    """Tracing only: the final states as values derived from the layer's (traced) output."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(s.clone() for s in states)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[None, ...]:
        return (None,) * (1 + len(grads))


def trace_states(model: nn.Module, notes: dict) -> list[RemovableHandle]:
    """Forward hooks (for the tracer) that tie each recurrent layer's final states to its output;
    ``notes[(layer, "states")]`` records the autograd node its states come from."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        out, states = output
        packed = isinstance(out, nn.utils.rnn.PackedSequence)
        data = out.data if packed else out
        source = args[0].data if isinstance(args[0], nn.utils.rnn.PackedSequence) else args[0]
        if isinstance(source, torch.Tensor) and source.requires_grad:
            data = _Traced.apply(source, data.detach())
        tensors = states if isinstance(states, tuple) else (states,)
        tied = _TracedStates.apply(data, *(t.detach() for t in tensors))
        notes[(module, "states")] = tied[0].grad_fn
        if packed:
            data = nn.utils.rnn.PackedSequence(data, out.batch_sizes, out.sorted_indices, out.unsorted_indices)
        return data, (tied if isinstance(states, tuple) else tied[0])

    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, RNN_TYPES)]


PRUNER = RNNPruner()
tpgraph.PRUNERS.update({cls: PRUNER for cls in RNN_TYPES})
tpgraph.ROOTS.extend(RNN_TYPES)
tpgraph.TRACERS.append(trace_states)


class RNNHidden(UnitKind):
    """The hidden units of a recurrent module (every layer and direction), with the layers reading them."""

    name = "rnn"
    kinds = ("rnn-hidden",)
    granularities = ("structured",)
    scorer = "unit_scores"

    def find(self, context: Context) -> list[Unit]:
        if not any(isinstance(m, RNN_TYPES) for m in context.model.modules()):
            return []  # no dependency graph to build
        graph = tpgraph.graph_of(context)
        found = []
        for rnn, state, writers in graph_groups(context, RNN_TYPES):
            state.states_read = graph.notes.get((rnn, "states")) in graph.reached
            name = context.names[rnn]
            found.append(Unit(name, "rnn-hidden", rnn.hidden_size, rnn, tuple(context.names[m] for m in writers),
                              self.granularities, state))
        return found

    def check(self, unit: Unit, context: Context) -> None:
        check_unwrapped(unit)
        check_prunable(unit.module, unit.name)

    def score(self, unit: Unit, criterion: Any, stats: Any) -> Scores:
        rnn, grads = unit.module, criterion.needs_gradients
        scores = {(l, d): criterion.unit_scores(unit_vectors(rnn, l, d), unit_vectors(rnn, l, d, True) if grads else None)
                  for l in range(rnn.num_layers) for d in range(directions(rnn))}
        if unit.state.states_read:  # one choice for every layer and direction: each normalised score counts alike
            return {None: torch.stack([normalised(s) for s in scores.values()]).sum(0)}
        return scores

    def prune(self, unit: Unit, keep: Keep, context: Context) -> None:
        rnn = unit.module
        hidden, last, dirs = rnn.hidden_size, rnn.num_layers - 1, directions(rnn)
        plan = {(l, d): drop_indices(hidden, keep[(l, d)] if (l, d) in keep else keep[None])
                for l in range(rnn.num_layers) for d in range(dirs)}
        PRUNER.plans[rnn] = plan
        unit.state.group.prune(idxs=[d * hidden + j for d in range(dirs) for j in plan[(last, d)]])

    def saved(self, unit: Unit, state_dict: Mapping[str, torch.Tensor]) -> int:
        key = f"{unit.name}.weight_hh_l0"
        if key not in state_dict:
            raise PruningError(f"the saved state dict has no {key!r}: it does not belong to this model and policy")
        return int(state_dict[key].shape[1])
