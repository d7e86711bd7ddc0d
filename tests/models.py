"""Tiny models several tests share, defined once: a test that needs "a model taking token ids and a
mask" or "a tiny Llama with grouped-query attention" takes it from here (the small CNN and MLP come
from ``evaluators.models``, the text models from ``evaluators.zoo``, Hugging Face models are built
from the configs below with ``evaluators.hf.models.build_model``). A model that is the subject of
one test (a shape a unit kind or the block finder must handle) stays beside that test."""
from __future__ import annotations

import torch
from torch import nn


class TokenClassifier(nn.Module):
    """Token ids and an attention mask in, class logits out (as Hugging Face classifiers take them):
    an embedding, mask-weighted mean pooling, an optional hidden ``fc`` layer, a ``head``.

    >>> ids = torch.randint(1, 20, (2, 5))
    >>> TokenClassifier()(ids, torch.ones_like(ids)).shape
    torch.Size([2, 2])
    """

    def __init__(self, vocab_size: int = 20, dim: int = 8, hidden: int | None = 16, num_classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.fc = nn.Linear(dim, hidden) if hidden else None
        self.head = nn.Linear(hidden or dim, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(torch.relu(self.fc(pooled)) if self.fc is not None else pooled)


# Hugging Face configs (hidden 64, a few layers): 8 query heads over 4 key-value groups for Llama
LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
         "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 64}
BERT = {"model_type": "bert", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "max_position_embeddings": 64}
VIT = {"model_type": "vit", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
       "image_size": 32, "patch_size": 8}


def tiny_hf(config: dict, head: str, **overrides) -> nn.Module:
    """A Hugging Face model of ``config`` (e.g. :data:`LLAMA`, with ``overrides``) and ``head``
    (``causal_lm``, ``sequence_classification``, ...), fresh weights from seed 0, in eval mode."""
    from evaluators.hf.models import build_model

    torch.manual_seed(0)
    return build_model({**config, **overrides}, head).eval()
