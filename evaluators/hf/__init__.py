"""Hugging Face Transformers models: load or build them (:mod:`.models`), prune heads, MLP neurons
and whole layers (:mod:`.pruning`), score them (:mod:`.importance`), save and reload the pruned
model with ``from_pretrained`` (:mod:`.checkpoint`), and the text tasks they train on (:mod:`.tasks`).

Importing this package registers the ``secateurs_<family>`` model types with transformers' Auto
classes, so that ``AutoModel...from_pretrained`` loads a model whose layers were pruned differently.
"""
from __future__ import annotations

from evaluators.hf import checkpoint  # noqa: F401  (registers the secateurs_* model types)
