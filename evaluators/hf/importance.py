"""Importance scores of Hugging Face units, computed on calibration batches: per attention head and
per MLP neuron (the criteria of the LLM pruning literature), and per layer (ShortGPT's block influence).

Head and neuron criteria (higher = more important), each a sum over the unit's weights — for a head
the q rows and output-projection columns of its width plus its share (``1 / group size``) of its
key/value head's k and v rows; for a neuron its rows of the MLP's input linears and its column of the
output linear:

- ``magnitude``: ``|W|`` (the L1 norm of the unit's weights); needs no data.
- ``taylor``: ``|W * dL/dW|``, the first-order estimate of the loss change when the weight goes
  (LLM-Pruner's element-wise Taylor), with the gradient of the task's loss summed over the batches.
- ``wanda``: ``|W| * ||x_j||_2``, each weight times the L2 norm over calibration tokens of the input
  feature it multiplies (Wanda, Sun et al. 2023).
- ``activation``: the L2 norm over calibration tokens of what the unit adds to the layer's output (its
  output-projection columns applied to its activations): Minitron's activation importance, taken
  after the projection so that a head silenced in its query or output weights scores zero. Computed
  from per-unit input covariances, ``sqrt(trace(W_u^T W_u C_u))``, without materialising outputs.

Layers: :func:`block_influence` is ShortGPT's ``BI_i = 1 - E_t[cos(x_i,t, x_i+1,t)]``, one minus the
mean cosine similarity, over (non-padding) tokens, of layer ``i``'s input and output hidden states.
A layer that barely changes its input scores near 0 and is the first to drop.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evaluators.batches import Batch, Calibration, forward, inputs_of, to_device
from evaluators.hf.models import layers_of
from evaluators.hf.pruning import HFPruningError, HFUnit

CRITERIA = ("magnitude", "taylor", "wanda", "activation")
DATA_CRITERIA = ("taylor", "wanda", "activation")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _sum_over_inputs(model: nn.Module, names: Iterable[str], batches: Sequence[Batch],
                     value: Callable[[str, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per linear ``name``: ``value(name, input)`` summed over the calibration ``batches`` (a forward
    pre-hook on each linear, eval mode, no gradients)."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def record(_module, args):
            v = value(name, args[0].detach().float())
            sums[name] = sums[name] + v if name in sums else v
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    device = _device(model)
    try:
        with _eval(model), torch.no_grad():
            for batch in batches:
                forward(model, to_device(batch, device))
    finally:
        for h in handles:
            h.remove()
    return sums


def _input_norms(model: nn.Module, names: Iterable[str], batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
    """Per linear ``name``: the squared L2 norm over all calibration tokens of each input feature."""
    return _sum_over_inputs(model, sorted(set(names)), batches, lambda _name, x: x.reshape(-1, x.shape[-1]).pow(2).sum(0))


def _input_covariances(model: nn.Module, widths: dict[str, tuple[int, int]], batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
    """Per linear ``name`` with ``(units, width)``: ``sum_t x_u,t^T x_u,t`` over calibration tokens for each
    block of ``width`` input features (``units`` blocks): a tensor ``(units, width, width)``."""
    def covariance(name: str, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, *widths[name])
        return torch.einsum("nuw,nuv->uwv", x, x)

    return _sum_over_inputs(model, list(widths), batches, covariance)


def _gradients(model: nn.Module, names: Iterable[str], calibration: Calibration) -> dict[str, torch.Tensor]:
    """Per linear ``name``: the gradient of the calibration loss, summed over the batches, w.r.t. its weight.
    Only those weights take gradients; every ``requires_grad`` flag and ``.grad`` is restored afterwards."""
    weights = {n: model.get_submodule(n).weight for n in set(names)}
    wanted = {id(w) for w in weights.values()}
    flags = {p: p.requires_grad for p in model.parameters()}
    saved = {n: w.grad for n, w in weights.items()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    for w in weights.values():
        w.grad = None
    device = _device(model)
    try:
        with _eval(model), torch.enable_grad():
            for batch in calibration.batches:
                calibration.loss(model, to_device(batch, device)).backward()
        return {n: (w.grad.detach().clone() if w.grad is not None else torch.zeros_like(w)) for n, w in weights.items()}
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for n, w in weights.items():
            w.grad = saved[n]


def _element_scores(criterion: str, weight: torch.Tensor, grad: torch.Tensor | None, norms: torch.Tensor | None) -> torch.Tensor:
    w = weight.detach().float().abs()
    if criterion == "magnitude":
        return w
    if criterion == "taylor":
        return (weight.detach().float() * grad.float()).abs()
    return w * norms.sqrt().to(w.device)[None, :]  # wanda


def _rows(scores: torch.Tensor, units: int) -> torch.Tensor:
    """Per unit, the sum of its block of rows (``units`` equal blocks)."""
    return scores.reshape(units, -1).sum(1)


def _cols(scores: torch.Tensor, units: int) -> torch.Tensor:
    return scores.reshape(scores.shape[0], units, -1).sum((0, 2))


def unit_scores(model: nn.Module, units: Sequence[HFUnit], criterion: str,
                calibration: Calibration | None = None) -> dict[str, torch.Tensor]:
    """Per unit name, one score per head (``heads`` units) or neuron (``neurons`` units) by ``criterion``
    (see the module docstring); ``calibration`` holds the batches (and, for ``taylor``, the loss).

    >>> from evaluators.hf.models import build_model
    >>> from evaluators.hf.pruning import discover
    >>> m = build_model({"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
    ...                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50}, "causal_lm")
    >>> {name: s.shape for name, s in unit_scores(m, discover(m)[:2], "magnitude").items()}
    {'model.layers.0.self_attn': torch.Size([4]), 'model.layers.0.mlp': torch.Size([48])}
    """
    if criterion not in CRITERIA:
        raise HFPruningError(f"criterion: unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    units = [u for u in units if u.kind != "layer"]
    if criterion in DATA_CRITERIA and (calibration is None or not calibration.batches):
        raise HFPruningError(f"criterion {criterion!r} needs calibration batches; give a Calibration, or use 'magnitude'")
    members = [m for u in units for m in u.members]
    norms = _input_norms(model, members, calibration.batches) if criterion == "wanda" else {}
    widths = {u.members[-1]: (u.size, u.head_dim if u.kind == "heads" else 1) for u in units}
    covariances = _input_covariances(model, widths, calibration.batches) if criterion == "activation" else {}
    grads = _gradients(model, members, calibration) if criterion == "taylor" else {}
    scores: dict[str, torch.Tensor] = {}
    for u in units:
        if criterion == "activation":
            out = u.members[-1]  # the output linear: its inputs are the heads' / neurons' outputs
            units, width = widths[out]
            w = model.get_submodule(out).weight.detach().float().reshape(-1, units, width)
            gram = torch.einsum("ouw,ouv->uwv", w, w)
            scores[u.name] = torch.einsum("uwv,uwv->u", gram, covariances[out]).clamp_min(0).sqrt()
            continue
        parts = {n: _element_scores(criterion, model.get_submodule(n).weight, grads.get(n), norms.get(n)) for n in u.members}
        if u.kind == "heads":
            q, k, v, o = u.members
            kv = _rows(parts[k], u.kv_heads) + _rows(parts[v], u.kv_heads)
            scores[u.name] = _rows(parts[q], u.size) + _cols(parts[o], u.size) + kv.repeat_interleave(u.group_size) / u.group_size
        else:
            *inputs, out = u.members
            scores[u.name] = sum(_rows(parts[n], u.size) for n in inputs) + _cols(parts[out], u.size)
    return scores


def _hidden(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else value[0]


def block_influence(model: nn.Module, batches: Iterable[Batch]) -> list[float]:
    """ShortGPT's block influence of every layer on ``batches`` (lower = the layer changes its input less).
    Tokens where the batch's ``attention_mask`` is 0 are left out.

    >>> from evaluators.hf.models import build_model
    >>> m = build_model({"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
    ...                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50})
    >>> len(block_influence(m, [{"input_ids": torch.randint(0, 50, (2, 8))}]))
    3
    """
    layers = layers_of(model)
    totals, counts = [0.0] * len(layers), [0] * len(layers)
    inputs: dict[int, torch.Tensor] = {}
    mask: list[torch.Tensor | None] = [None]

    def before(i: int) -> Callable:
        def record(_module, args, kwargs):
            inputs[i] = _hidden(args[0] if args else kwargs["hidden_states"]).detach()
        return record

    def after(i: int) -> Callable:
        def record(_module, _args, _kwargs, output):
            x, y = inputs.pop(i).float(), _hidden(output).detach().float()
            distance = 1 - F.cosine_similarity(x, y, dim=-1)  # (batch, tokens)
            keep = mask[0]
            if keep is not None and tuple(keep.shape) == tuple(distance.shape):
                distance = distance[keep]
            totals[i] += float(distance.sum())
            counts[i] += distance.numel()
        return record

    handles = [layer.register_forward_pre_hook(before(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(after(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = _device(model)
    try:
        with _eval(model), torch.no_grad():
            for batch in batches:
                batch = to_device(batch, device)
                inputs_ = inputs_of(batch)
                attention = inputs_.get("attention_mask") if isinstance(inputs_, dict) else None
                mask[0] = attention.bool() if isinstance(attention, torch.Tensor) and attention.dim() == 2 else None
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    if not all(counts):
        raise HFPruningError("block_influence needs at least one calibration batch with tokens")
    return [t / c for t, c in zip(totals, counts)]


def layers_to_drop(model: nn.Module, count: int, batches: Iterable[Batch]) -> list[int]:
    """The ``count`` layers of lowest block influence on ``batches`` (ShortGPT), in layer order."""
    n = len(layers_of(model))
    if not 0 <= count < n:
        raise HFPruningError(f"count: layers to drop must be in 0..{n - 1} (the model has {n} layers), but got {count}")
    scores = torch.tensor(block_influence(model, batches))
    return sorted(torch.argsort(scores, stable=True)[:count].tolist())
