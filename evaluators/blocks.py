"""Depth: residual blocks that can be removed whole, found by tracing any model.

A module is a **removable block** when, on the example inputs, it returns one tensor of the shape
and dtype of its first input, and its own forward computes ``x + branch`` (any number of branches
added one after the other: ``(x + a(x)) + b(x + a(x))`` for a pre-norm transformer layer),
optionally followed by one elementwise op (``relu``, ``relu6``), and reaches ``x`` unchanged on the
skip path (directly, or through ``nn.Identity`` / an empty ``nn.Sequential``). No model class is
named anywhere: a user's own residual module qualifies by what its forward computes.

How the forward is read: each candidate module is traced on its own with ``torch.fx`` (its
children kept as calls), which is cheap and works for most vision and user modules. Where fx
cannot trace it (control flow on tensor values, ``a, b = child(...)`` unpacking, ``**kwargs``), the
module is exported with ``torch.export`` on the arguments it really received in a forward pass on
the example inputs (captured with forward hooks) and the same reading is done on the ATen graph.

What dropping means, precisely: the block is replaced by :class:`DroppedBlock`, which computes the
block **with its branches removed**: ``x`` for ``x + f(x)``, and ``relu(x)`` for ``relu(x + f(x))``.
That replacement is always exact in this sense. It is the plain identity when the block has no op
after its add, or when its inputs already lie where that op is the identity (``x >= 0`` for ReLU,
``0 <= x <= 6`` for ReLU6): a ResNet basic block whose input comes out of a ReLU. This is judged on
the block's inputs in forward passes on the example inputs and on a seeded noisy copy of them (so
that all-zero example inputs cannot pass for a ReLU's output); ``Block.replacement`` says which was
chosen. When the inputs may leave that range the op is kept (no parameters, one elementwise pass). A block whose add is
followed by anything else, e.g. a post-norm transformer layer ``LayerNorm(x + f(x))``, is *not*
removable: the identity would also skip the normalisation, which is not the block without its
branch (an approximation that only fine-tuning could repair).

>>> from evaluators.zoo import resnet20
>>> model = resnet20()
>>> blocks = discover_blocks(model, torch.zeros(1, 3, 32, 32))
>>> [b.name for b in blocks][:3], blocks[0].replacement
(['layer1.0', 'layer1.1', 'layer1.2'], 'identity')
>>> drop_blocks(model, ["layer1.1"], torch.zeros(1, 3, 32, 32)).layer1[1]
DroppedBlock(was=BasicBlock)
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import operator
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import fx, nn

from evaluators.batches import Calibration, call, forward, inputs_of, map_tensors

IMPORTANCE_CRITERIA = ("cosine", "loss")
_ADDS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_ADD_METHODS = {"add", "add_"}
_TAILS = {  # elementwise ops allowed after the residual add: name -> (functions, methods, module types)
    "relu": ({F.relu, torch.relu, torch.relu_, torch.ops.aten.relu.default, torch.ops.aten.relu_.default}, {"relu", "relu_"}, (nn.ReLU,)),
    "relu6": ({F.relu6, torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default}, set(), (nn.ReLU6,)),
}
_TAIL_DOMAIN = {"relu": (0.0, None), "relu6": (0.0, 6.0)}  # inputs on which the tail is the identity
_TAIL_MODULES: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "relu6": nn.ReLU6}
_SAME = {torch.ops.aten.clone.default, torch.ops.aten.alias.default, torch.ops.aten.detach.default}
_CASTS = {torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten._to_copy.default}  # identity when nothing changes


class BlockError(ValueError):
    """A block name that cannot be dropped; the message says why and lists the removable blocks."""


@dataclasses.dataclass(frozen=True)
class Block:
    """One removable residual block: its module name, what dropping it saves, and how it is dropped.

    ``params`` are the parameters that go with it (those shared with the rest of the model stay),
    ``macs`` the multiply-accumulates it costs, less what its replacement still computes, in the
    units of :func:`evaluators.sparsity.effective_macs_and_params` on the same example inputs
    (torch-pruning's count, per example; integers and exactly additive for one-example inputs). ``tail`` is the elementwise op after
    its residual add (None if none), ``replacement`` is ``"identity"`` or the tail it keeps.

    >>> b = Block("layer1.0", "BasicBlock", 4640, 4816896, "relu", "identity", "relu(x + branch)")
    >>> Block.from_dict(b.to_dict()) == b
    True
    """

    name: str
    kind: str
    params: int
    macs: int
    tail: str | None
    replacement: str
    why: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Block:
        return cls(**data)


class DroppedBlock(nn.Module):
    """What a removed block becomes: its first input (through ``tail`` if one is kept), no parameters.

    >>> DroppedBlock("BasicBlock")(torch.ones(2), torch.zeros(3), mask=None)
    tensor([1., 1.])
    """

    def __init__(self, was: str, tail: nn.Module | None = None) -> None:
        super().__init__()
        self.was = was
        self.tail = tail

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x if self.tail is None else self.tail(x)

    def extra_repr(self) -> str:
        return f"was={self.was}"


# ---------------------------------------------------------------- discovery


@dataclasses.dataclass
class _Call:
    args: tuple
    kwargs: dict
    output: Any = None
    count: int = 0


def _capture_calls(model: nn.Module, example_inputs: Any) -> dict[nn.Module, _Call]:
    """The arguments and output of each module's first call in one forward pass (and how often it was called)."""
    calls: dict[nn.Module, _Call] = {}

    def before(module, args, kwargs):
        record = calls.setdefault(module, _Call(args, kwargs))
        record.count += 1

    def after(module, args, output):
        if calls[module].count == 1 and calls[module].output is None:
            calls[module].output = output

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(before, with_kwargs=True),
                                                     m.register_forward_hook(after))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return calls


def _is_library_leaf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.") and next(module.children(), None) is None


class _ChildrenAsLeaves(fx.Tracer):
    """Traces a module's own forward only: every child module stays one call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _fx_graph(module: nn.Module, args: tuple, kwargs: dict) -> tuple[fx.Graph, fx.Node]:
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    params = list(bound.arguments)
    concrete = {k: v for k, v in bound.arguments.items() if k != params[0] and not isinstance(v, torch.Tensor)}
    graph = _ChildrenAsLeaves().trace(module, concrete_args=concrete)
    source = next(n for n in graph.nodes if n.op == "placeholder")
    return graph, source


def _export_graph(module: nn.Module, args: tuple, kwargs: dict) -> tuple[fx.Graph, fx.Node]:
    from evaluators.onnx_backend import quiet_exporters

    with quiet_exporters():
        program = torch.export.export(module, tuple(args), kwargs=dict(kwargs))
    first = next(s.arg.name for s in program.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT)
    return program.graph, next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == first)


def _tail_of(node: fx.Node, owner: nn.Module) -> str | None:
    for name, (functions, methods, types) in _TAILS.items():
        if node.op == "call_function" and node.target in functions:
            if node.target in (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default) and tuple(node.args[1:3]) != (0.0, 6.0):
                return None
            return name
        if node.op == "call_method" and node.target in methods:
            return name
        if node.op == "call_module" and isinstance(owner.get_submodule(node.target), types):
            return name
    return None


def _describe(node: Any, owner: nn.Module) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_module":
        return f"`{node.target}` ({type(owner.get_submodule(node.target)).__name__})"
    if node.op == "placeholder":
        return f"input `{node.target}`"
    name = getattr(node.target, "__name__", str(node.target))
    return f"`{name.removesuffix('.default').removesuffix('.Tensor')}`"


def _same_meta(node: fx.Node) -> bool:
    """Whether an exported cast returns a tensor of its input's dtype, shape and device (a no-op:
    ``x.to(torch.float32)`` on a float32 ``x``, as in the RMSNorm of Hugging Face models)."""
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    before, after = (source.meta.get("val") if source is not None else None), node.meta.get("val")
    return (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.dtype == after.dtype
            and before.shape == after.shape and before.device == after.device)


class _Reader:
    """Reads, from a module's graph, whether its output is ``[tail](source + branch + ...)``."""

    def __init__(self, owner: nn.Module, source: fx.Node, dtype: torch.dtype) -> None:
        self.owner, self.source, self.dtype = owner, source, dtype  # dtype: the block input's

    def no_op_cast(self, node: fx.Node) -> bool:
        """``x.to(dtype)`` / ``x.float()`` / ``x.contiguous()`` in an fx graph, to the input's own dtype: every
        step walked back from the output to the input is one, so each leaves its value as it is."""
        if node.op != "call_method":
            return False
        if node.target == "contiguous" or (node.target == "float" and self.dtype == torch.float32):
            return len(node.args) == 1 and not node.kwargs
        return node.target in ("to", "type") and len(node.args) == 2 and node.args[1] == self.dtype and not node.kwargs

    def unchanged(self, node: Any) -> Any:
        """``node`` with identity steps (``nn.Identity``, empty ``Sequential``, clone, no-op casts) walked back."""
        while isinstance(node, fx.Node):
            if node.op == "call_module":
                module = self.owner.get_submodule(node.target)
                if not (isinstance(module, nn.Identity) or (isinstance(module, nn.Sequential) and len(module) == 0)):
                    break
            elif not (self.no_op_cast(node) or
                      (node.op == "call_function" and (node.target in _SAME or (node.target in _CASTS and _same_meta(node))))):
                break
            node = node.args[0]
        return node

    def operands(self, node: Any) -> tuple[Any, Any] | None:
        """The two operands of an add (None if ``node`` is not one, or scales its second operand)."""
        if not isinstance(node, fx.Node) or len(node.args) < 2:
            return None
        if not ((node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target in _ADD_METHODS)):
            return None
        return node.args[0], node.args[1] if node.kwargs.get("alpha", 1) == 1 else None

    def residual(self, node: Any) -> bool:
        """Whether ``node`` is the source plus zero or more branches."""
        node = self.unchanged(node)
        if node is self.source:
            return True
        pair = self.operands(node)
        return pair is not None and any(p is not None and self.residual(p) for p in pair)

    def read(self, output: Any) -> tuple[str | None, str | None]:
        """``(tail, None)`` for a removable block, ``(None, reason)`` otherwise."""
        tail = _tail_of(output, self.owner) if isinstance(output, fx.Node) else None
        inner = output.args[0] if tail else output
        if self.residual(inner):
            if self.unchanged(inner) is self.source:
                return None, "its output is its input (it has no residual branch)"
            return tail, None
        pair = self.operands(self.unchanged(inner))
        if pair is not None:
            direct = [p for p in pair if isinstance(p, fx.Node) and p.all_input_nodes == [self.source]]
            through = f" (the shortcut goes through {_describe(direct[0], self.owner)})" if len(direct) == 1 else ""
            return None, f"its residual add does not take its input unchanged{through}"
        if isinstance(output, fx.Node) and any(self.residual(a) for a in output.all_input_nodes):
            return None, (f"it ends in {_describe(output, self.owner)} after its residual add: the identity would also skip "
                          "that op, which is not the block without its branch")
        return None, f"its output is not its input plus a branch (it ends in {_describe(output, self.owner)})"


def _read_forward(module: nn.Module, record: _Call) -> tuple[str | None, str | None]:
    errors = []
    for make_graph in (_fx_graph, _export_graph):
        try:
            graph, source = make_graph(module, record.args, record.kwargs)
        except Exception as exc:  # a module that one tracer cannot read may be read by the other
            errors.append(f"{make_graph.__name__.strip('_').replace('_graph', '')}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        output = next(n for n in graph.nodes if n.op == "output").args[0]
        if isinstance(output, (tuple, list)):
            if len(output) != 1:
                return None, f"it returns {len(output)} values; only a block that returns one tensor can become the identity"
            output = output[0]
        return _Reader(module, source, record.args[0].dtype).read(output)
    return None, "its forward cannot be traced (" + "; ".join(errors) + ")"


def _candidate_reason(module: nn.Module, record: _Call | None) -> str | None:
    """Why ``module`` cannot be a block whatever its forward computes (None if it may be one)."""
    if record is None:
        return "it is not called in a forward pass on the example inputs"
    if record.count > 1:
        return f"it is called {record.count} times in one forward pass (its weights are shared)"
    x, y = (record.args[0] if record.args else None), record.output
    if not isinstance(x, torch.Tensor):
        return "its first positional input is not a tensor"
    if not isinstance(y, torch.Tensor):
        return f"it returns {type(y).__name__}; only a block that returns one tensor can become the identity"
    if x.shape != y.shape or x.dtype != y.dtype:
        return f"it maps {tuple(x.shape)} {x.dtype} to {tuple(y.shape)} {y.dtype}; the identity needs the same shape and dtype"
    return None


def _perturbed(inputs: Any) -> Any:
    """``inputs`` with seeded standard-normal noise added to every floating tensor (integer ids kept)."""
    generator = torch.Generator().manual_seed(0)
    return map_tensors(inputs, lambda t: t + torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
                       if t.is_floating_point() else t)


def _replacement(tail: str | None, seen: list[torch.Tensor]) -> str:
    """``"identity"`` when the block's inputs ``seen`` all lie where ``tail`` is the identity, else ``tail``."""
    if tail is None:
        return "identity"
    low, high = _TAIL_DOMAIN[tail]
    inside = all(bool((x >= low).all()) and (high is None or bool((x <= high).all())) for x in seen)
    return "identity" if inside else tail


def _why(tail: str | None, replacement: str) -> str:
    if tail is None:
        return "output = input + branch"
    if replacement == "identity":
        return f"output = {tail}(input + branch); {tail} is the identity on its inputs here, so dropped = identity"
    return f"output = {tail}(input + branch); its inputs leave {tail}'s fixed points, so dropped = {tail}(input)"


def analyse_blocks(model: nn.Module, example_inputs: Any) -> tuple[list[Block], dict[str, str]]:
    """The removable blocks of ``model`` (in forward order) and, for every other module that could
    have been one (not the root, with parameters, not a plain torch layer), why it is not."""
    was_training = model.training
    model.eval()  # traced and exported as it runs when deployed (and no BatchNorm statistics move)
    try:
        return _analyse(model, example_inputs)
    finally:
        model.train(was_training)


def _analyse(model: nn.Module, example_inputs: Any) -> tuple[list[Block], dict[str, str]]:
    calls = _capture_calls(model, example_inputs)
    order = {module: i for i, module in enumerate(calls)}
    total, _, layer_macs, _ = tp.utils.count_ops_and_params(model, example_inputs, layer_wise=True)
    per_example = total / layer_macs[model] if layer_macs.get(model) else 1.0  # torch-pruning averages its total over the batch
    found: list[tuple[nn.Module, str, str | None]] = []
    rejected: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or _is_library_leaf(module) or next(module.parameters(), None) is None:
            continue
        record = calls.get(module)
        reason = _candidate_reason(module, record)
        tail = None
        if reason is None:
            tail, reason = _read_forward(module, record)
        if reason is None:
            found.append((module, name, tail))
        else:
            rejected[name] = reason
    for outer in [name for _, name, _ in found]:  # keep the innermost: dropping an outer block drops its inner ones too
        inner = [name for _, name, _ in found if name.startswith(outer + ".")]
        if inner:
            rejected[outer] = f"it holds removable blocks ({', '.join(inner)}); drop those instead"
    found = [item for item in found if item[1] not in rejected]
    noisy = _capture_calls(model, _perturbed(example_inputs)) if any(tail for _, _, tail in found) else {}
    blocks = []
    for module, name, tail in sorted(found, key=lambda item: order[item[0]]):
        x = calls[module].args[0]
        replacement = _replacement(tail, [x] + ([noisy[module].args[0]] if module in noisy else []))
        kept = 0.0  # what the replacement still computes, counted like the block (the whole batch)
        if replacement != "identity":
            kept = tp.utils.count_ops_and_params(_TAIL_MODULES[replacement](), x)[0] * len(x)
        macs = round(((layer_macs.get(module) or 0) - kept) * per_example)
        blocks.append(Block(name, type(module).__name__, _own_params(model, name), macs,
                            tail, replacement, _why(tail, replacement)))
    return blocks, rejected


def _own_params(model: nn.Module, name: str) -> int:
    """Parameters of submodule ``name`` that no module outside it also holds."""
    prefix = name + "."
    outside = {id(p) for n, m in model.named_modules() if n != name and not n.startswith(prefix) for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in model.get_submodule(name).parameters() if id(p) not in outside)


def discover_blocks(model: nn.Module, example_inputs: Any) -> list[Block]:
    """The residual blocks of ``model`` that can be removed whole, in forward order (see the module
    docstring for the rule). ``example_inputs`` are model inputs as :func:`evaluators.batches.call`
    takes them (a tensor, a tuple of positional inputs, a dict of keyword inputs)."""
    return analyse_blocks(model, example_inputs)[0]


# ---------------------------------------------------------------- dropping


def select_blocks(blocks: Sequence[Block], names: Iterable[str], rejected: dict[str, str] | None = None) -> list[Block]:
    """The blocks named ``names`` (in ``blocks``' order); a name that is not a removable block raises
    :class:`BlockError` with the reason (when ``rejected`` knows it) and the removable names."""
    by_name = {b.name: b for b in blocks}
    names = list(dict.fromkeys(names))
    for name in names:
        if name not in by_name:
            why = f": {rejected[name]}" if rejected and name in rejected else " (no module of that name is a candidate)"
            valid = ", ".join(by_name) or "none"
            raise BlockError(f"block {name!r} cannot be dropped{why}; removable blocks: {valid}")
    for outer in names:
        inner = [n for n in names if n.startswith(outer + ".")]
        if inner:
            raise BlockError(f"blocks {outer!r} and {inner[0]!r} nest; drop one of them, not both")
    chosen = set(names)
    return [b for b in blocks if b.name in chosen]


def replace_module(model: nn.Module, name: str, replacement: nn.Module) -> nn.Module:
    """Put ``replacement`` where submodule ``name`` is; returns the module that was there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = parent.get_submodule(child)
    setattr(parent, child, replacement) if not isinstance(parent, (nn.Sequential, nn.ModuleList)) else parent.__setitem__(int(child), replacement)
    return old


def dropped(block: Block) -> DroppedBlock:
    """The module that takes ``block``'s place."""
    return DroppedBlock(block.kind, None if block.replacement == "identity" else _TAIL_MODULES[block.replacement]())


def drop_blocks(model: nn.Module, names: Iterable[str], example_inputs: Any) -> nn.Module:
    """Remove the blocks ``names`` from ``model`` in place (each becomes a :class:`DroppedBlock`, so
    its parameters leave the state dict, torch.export and ONNX) and return the model. A name that is
    not a removable block raises :class:`BlockError` saying why, before anything changes."""
    names = list(names)
    if not names:
        return model
    blocks, rejected = analyse_blocks(model, example_inputs)
    for block in select_blocks(blocks, names, rejected):
        replace_module(model, block.name, dropped(block))
    return model


# ---------------------------------------------------------------- importance


@contextlib.contextmanager
def _swapped(model: nn.Module, name: str, replacement: nn.Module) -> Iterator[None]:
    old = replace_module(model, name, replacement)
    try:
        yield
    finally:
        replace_module(model, name, old)


def block_importance(model: nn.Module, calibration: Calibration, names: Iterable[str] | None = None,
                     criterion: str = "cosine") -> dict[str, float]:
    """How much each removable block (``names``, default all) matters on the calibration batches;
    the blocks with the lowest scores are the ones to drop first.

    - ``cosine``: 1 - the mean cosine similarity between a block's input and output, each example
      flattened (the block influence of ShortGPT, Men et al. 2024). Blocks that barely change their
      input score near 0. One forward pass over the batches.
    - ``loss``: the increase of the task's loss (``calibration.loss``) when the block alone is
      dropped. One forward pass per block, plus one.
    """
    if criterion not in IMPORTANCE_CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(IMPORTANCE_CRITERIA)}, but got {criterion!r}")
    if not calibration.batches:
        raise ValueError("calibration has no batches; block importance needs at least one")
    blocks, rejected = analyse_blocks(model, inputs_of(calibration.batches[0]))
    chosen = select_blocks(blocks, [b.name for b in blocks] if names is None else names, rejected)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if criterion == "cosine":
                return _cosine_influence(model, calibration, [b.name for b in chosen])
            base = _mean_loss(model, calibration)
            scores = {}
            for block in chosen:
                with _swapped(model, block.name, dropped(block)):
                    scores[block.name] = _mean_loss(model, calibration) - base
            return scores
    finally:
        model.train(was_training)


def _cosine_influence(model: nn.Module, calibration: Calibration, names: list[str]) -> dict[str, float]:
    sums = {name: [0.0, 0] for name in names}

    def hook(name):
        def record(module, args, output):
            x, y = args[0].flatten(1).float(), output.flatten(1).float()
            sums[name][0] += float(F.cosine_similarity(x, y, dim=1, eps=1e-8).sum())
            sums[name][1] += x.shape[0]
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        for batch in calibration.batches:
            forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: 1.0 - total / count for name, (total, count) in sums.items()}


def _mean_loss(model: nn.Module, calibration: Calibration) -> float:
    return sum(float(calibration.loss(model, batch)) for batch in calibration.batches) / len(calibration.batches)


def least_important(scores: dict[str, float], count: int) -> list[str]:
    """The ``count`` block names with the lowest scores (ties broken by name), in score order.

    >>> least_important({"a": 0.3, "b": 0.1, "c": 0.2}, 2)
    ['b', 'c']
    """
    if not 0 <= count <= len(scores):
        raise ValueError(f"count must satisfy 0 <= count <= {len(scores)} (the blocks scored), but got {count}")
    return sorted(scores, key=lambda n: (scores[n], n))[:count]
