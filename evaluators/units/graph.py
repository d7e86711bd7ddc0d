"""torch-pruning's dependency graph of a model, for the unit kinds that prune through it (conv/linear
channels, recurrent hidden units): built once per pruning context, with the pruners and tracers the
kinds registered here.

- :data:`PRUNERS`: torch-pruning pruners by module type (the recurrent kind's, and
  ``evaluators.pruning.register_pruner``'s for custom layers);
- :data:`ROOTS`: the module types whose output channels start a group;
- :data:`TRACERS`: functions that install forward hooks while the graph is traced, to show the
  tracer what it cannot see by itself (an RNN read through its final hidden state).

The graph is traced with :func:`evaluators.batches.call`, so example inputs may be a tensor, a tuple
of positional inputs or a dict of keyword inputs.
"""
from __future__ import annotations

import collections
import warnings
from typing import Any, Callable

import torch
import torch_pruning as tp
from torch import nn
from torch.utils.hooks import RemovableHandle

from evaluators.batches import call
from evaluators.prune_base import PruningError, flat_tensors

PRUNERS: dict[type, tp.pruner.function.BasePruningFunc] = {}
ROOTS: list[type] = []
Tracer = Callable[[nn.Module, dict], list[RemovableHandle]]  # (model, notes) -> hooks to remove after tracing
TRACERS: list[Tracer] = []


class Graph:
    """The dependency graph of ``model`` traced on ``example_inputs`` (the model is left as it was).

    ``notes`` holds what tracers recorded; ``reached`` the autograd nodes the model's outputs depend
    on (filled only when a tracer recorded notes).

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> [type(g[0].dep.target.module).__name__ for g in Graph(model, torch.zeros(1, 4)).groups([model[2]])]
    ['Linear']
    """

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        self.model = model
        self.notes: dict[Any, Any] = {}
        self.reached: set[Any] = set()
        handles = [h for tracer in TRACERS for h in tracer(model, self.notes)]
        was_training = model.training
        model.eval()
        try:
            with warnings.catch_warnings():  # torch-pruning warns about every model-level parameter (positions)
                warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
                self.dependencies = tp.DependencyGraph().build_dependency(
                    model, example_inputs=example_inputs, forward_fn=self._forward, customized_pruners=dict(PRUNERS))
        except Exception as exc:  # torch-pruning raises many kinds when tracing fails
            shape = tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else type(example_inputs).__name__
            raise PruningError(
                f"cannot trace {type(model).__name__} with example inputs of shape {shape}: {exc}; structured pruning needs "
                "a model torch-pruning can trace (granularity unstructured or nm does not)"
            ) from exc
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        self.param_names = {id(p): n for n, p in model.named_parameters()}
        self._groups: list[Any] | None = None
        self._hops: dict[Any, int] | None = None

    def _forward(self, model: nn.Module, inputs: Any) -> Any:
        out = call(model, inputs)
        if self.notes:  # a tracer wants to know which of the outputs it tagged are read
            stack = [t.grad_fn for t in flat_tensors(out) if t.grad_fn is not None]
            while stack:
                fn = stack.pop()
                if fn not in self.reached:
                    self.reached.add(fn)
                    stack += [f for f, _ in fn.next_functions if f is not None]
        return out

    def groups(self, protected: list[nn.Module]) -> list[Any]:
        """Every torch-pruning group rooted at a module of the :data:`ROOTS` types (protected layers left out)."""
        if self._groups is None:
            self._groups = list(self.dependencies.get_all_groups(ignored_layers=protected, root_module_types=tuple(ROOTS)))
        return self._groups

    def out_channel_modules(self, group: Any) -> list[nn.Module]:
        """The modules whose output channels ``group`` removes, in the order torch-pruning lists them."""
        return [dep.target.module for dep, _ in group if self.dependencies.is_out_channel_pruning_fn(dep.handler)]

    def hops(self, module: nn.Module) -> int:
        """How many graph nodes lie between the model's inputs and ``module`` (shortest path)."""
        if self._hops is None:
            nodes = list(self.dependencies.module2node.values())
            self._hops = {n: 0 for n in nodes if not n.inputs}
            queue = collections.deque(self._hops)
            while queue:
                node = queue.popleft()
                for nxt in node.outputs:
                    if nxt not in self._hops:
                        self._hops[nxt] = self._hops[node] + 1
                        queue.append(nxt)
        node = self.dependencies.module2node.get(module)
        return self._hops.get(node, len(self._hops)) if node is not None else len(self._hops)


def graph_of(context: Any) -> Graph:
    """The dependency graph of a pruning context's model (built on first use)."""
    return context.memo("dependency-graph", lambda: Graph(context.model, context.example_inputs))
