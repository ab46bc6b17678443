"""A variable-length workload: a small transformer classifying token sequences of 8 to 256.

The data is made here, no download: each sequence's length is long-tailed (log-normal,
median 32 tokens, clipped to 8..256, so most are short and a few fill the width), its
tokens are drawn mostly at random from a 64-token vocabulary with one of four token groups
over-represented, and the label is that group. Inputs are Hugging Face style dicts
(``input_ids`` and ``attention_mask``, right-padded to 256), and ``Workload.lengths`` names
the mask, so the search space offers token-budget batching::

    advisor run --model advisor.examples.textcls:build
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

import advisor
from advisor.examples.vit import Block  # pre-norm encoder block; takes a padding mask

VOCAB, GROUPS, WIDTH = 64, 4, 256
FIRST = 4  # tokens 0..3 are reserved (0 is padding); the rest split into GROUPS groups
SHORTEST, MEDIAN, SIGMA = 8, 32, 1.0


class TextClassifier(nn.Module):
    """Token and position embeddings, ``depth`` blocks, mean over the tokens, linear head.

    Nothing reads a padded position into a token's output (attention masks padding as a
    key, the pool averages tokens only), so trimming padding changes no output.
    """

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4, classes: int = GROUPS,
                 max_len: int = WIDTH) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Each position's final state, ``[batch, width, features]``."""
        keep = attention_mask.bool()
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.position(positions)
        for block in self.blocks:
            x = block(x, keep)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.tokens(input_ids, attention_mask)
        weights = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(pooled)


def sequences(n: int, seed: int, width: int = WIDTH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)``: ``n`` right-padded sequences."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(MEDIAN * np.exp(SIGMA * rng.standard_normal(n))), SHORTEST, width).astype(int)
    labels = rng.integers(0, GROUPS, n)
    per_group = (VOCAB - FIRST) // GROUPS
    ids = np.zeros((n, width), dtype=np.int64)
    for i, (length, label) in enumerate(zip(lengths, labels, strict=True)):
        noise = rng.integers(FIRST, VOCAB, length)
        signal = FIRST + label * per_group + rng.integers(0, per_group, length)
        ids[i, :length] = np.where(rng.random(length) < 0.3, signal, noise)
    mask = (np.arange(width) < lengths[:, None]).astype(np.int64)
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels)


class Sequences(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.ids, self.mask, self.labels = sequences(n, seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.labels[i]


def build() -> advisor.Workload:
    torch.manual_seed(0)
    return advisor.Workload(model=TextClassifier(), train=Sequences(1024, seed=0), val=Sequences(256, seed=1),
                            batch_size=32, name="textcls", lengths="attention_mask")
