"""Hugging Face Transformers models: load or build them (:mod:`.models`), prune heads, MLP neurons
and whole layers (:mod:`.pruning`), score them (:mod:`.importance`), save and reload the pruned
model with ``from_pretrained`` (:mod:`.checkpoint`), and the text tasks they train on (:mod:`.tasks`).

Importing this package registers the ``secateurs_<family>`` model types with transformers' Auto
classes, so that ``AutoModel...from_pretrained`` loads a model whose layers were pruned differently,
and the depth handler of their layers (:mod:`.depth`). Their heads and MLP neurons are unit kinds of
the pruning core (:mod:`evaluators.units.hf`), and the tasks are built-in ones (``hf_causal_lm``,
``hf_text_classification``).
"""
from __future__ import annotations

from evaluators.hf import checkpoint  # noqa: F401  (registers the secateurs_* model types)
from evaluators.hf import depth  # noqa: F401  (registers the depth handler of Hugging Face layers)
