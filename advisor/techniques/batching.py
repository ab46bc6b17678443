"""Token-budget batching: each step's samples, sorted by length and packed under a token
budget, with the padding of each micro-batch trimmed to its longest sample.

A workload is variable-length when it names the input holding its attention mask
(``Workload.lengths``): 1 for a token, 0 for padding, padded on the right. Each sample's
length is its mask's row sum. ``max_tokens`` 0 keeps fixed-size batches as given (padded to
the full width); above 0, every optimizer step is cut into micro-batches whose padded size
(``count x longest``) is at most ``max_tokens``, and each micro-batch is trimmed to its
longest sample.

Fairness: an optimizer step always takes the workload's ``batch_size`` samples, drawn the
way fixed-size batches draw them (one seeded permutation per epoch, ``batch_size`` at a
time, so with the same seed step *k* trains on the very samples fixed step *k* does when
the batch size divides the data), and each micro-batch's loss is weighted by its share of
the step's samples. For a loss that is a mean over its batch's samples (the default
cross-entropy is) the step's gradient is then the fixed batch's mean gradient: the knob
changes how a step is computed, never what it learns. Only the last step of an epoch,
which takes the ``n mod batch_size`` samples left, is smaller (fixed-size batches skip
those). The token budget replaces gradient accumulation, which it takes as 1.

Packing sorts the step's samples longest first and fills each micro-batch greedily, so
micro-batches hold samples of similar length; the longest come first, so the step's peak
memory is reached, and any out-of-memory error raised, at its first micro-batch.

The space offers budgets (``options``) sized from the data, and only when trimming the
padding of a probe batch changes none of the model's outputs: a model that reads padded
positions would learn from other inputs once trimmed, and is left at fixed-size batches
with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from advisor.errors import AdvisorError
from advisor.techniques import ANY, Exclusion
from advisor.workload import call_model, describe_exception, logits_of

KNOB = "max_tokens"
# Budgets offered: the powers of two at or above these multiples of a step's real tokens
# (batch_size x the mean length), at least the longest sample, at most a whole padded step.
SCALES = (0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class BatchingConfig:
    max_tokens: int = 0  # 0: fixed-size batches as given

    def __post_init__(self) -> None:
        value = self.max_tokens
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{KNOB} must be an integer >= 0 (0: fixed-size batches); got {value!r}")

    @property
    def enabled(self) -> bool:
        return self.max_tokens > 0


def check_knobs(values) -> None:
    """A token budget cuts each step into micro-batches itself: it replaces accumulation."""
    if values["max_tokens"] > 0 and values["accumulation"] != 1:
        raise ValueError(f"{KNOB} > 0 splits each step into micro-batches by tokens: it "
                         f"takes accumulation 1")


@dataclass(frozen=True)
class Lengths:
    """Each training sample's length in tokens, and the padded width they all share."""

    tokens: np.ndarray
    width: int
    key: str | int | None = None  # the input holding the mask (Workload.lengths)


def lengths_from_mask(mask: np.ndarray, where: str = "the attention mask",
                      chunk: int = 4096) -> Lengths:
    """Lengths from a right-padded ``[samples, width]`` mask of ones then zeros (read in
    chunks of rows, so a memory-mapped mask is never copied whole).

    A sample with no token at all counts as one, so a trimmed batch is never empty.
    """
    if mask.ndim != 2:
        raise ValueError(f"{where} must hold one row per sample ([width] each); got samples of "
                         f"shape {list(mask.shape[1:])}")
    sums = []
    for start in range(0, len(mask), chunk):
        values = np.asarray(mask[start:start + chunk]).astype(np.int64)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"{where} must hold only 0 (padding) and 1 (token); got values "
                             f"{sorted(np.unique(values).tolist())[:6]}")
        late = (np.diff(values, axis=1) > 0).any(axis=1)
        if late.any():
            raise ValueError(f"{where} must be padded on the right (ones, then zeros); sample "
                             f"{start + int(np.argmax(late))} has a token after padding")
        sums.append(values.sum(axis=1))
    tokens = np.concatenate(sums) if sums else np.zeros(0, dtype=np.int64)
    return Lengths(np.maximum(tokens, 1), int(mask.shape[1]))


def lengths_of(split: Any, key: str | int) -> Lengths:
    """The samples' lengths from the mask input ``key`` of a data-cache split (``MappedSplit``)."""
    try:
        lengths = lengths_from_mask(split.input_leaf(key), f"the attention mask (input {key!r})")
        return Lengths(lengths.tokens, lengths.width, key)
    except (ValueError, AdvisorError) as exc:
        raise AdvisorError(f"Workload.lengths: {exc}") from None


def pack(indices: np.ndarray, tokens: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Split ``indices`` into micro-batches, longest first, each with ``count x longest``
    at most ``max_tokens``; every index lands in exactly one."""
    order = np.asarray(indices)[np.argsort(-tokens[indices], kind="stable")]
    batches, start = [], 0
    while start < len(order):
        longest = int(tokens[order[start]])
        if longest > max_tokens:
            raise ValueError(f"sample {int(order[start])} has {longest} tokens, more than "
                             f"{KNOB} {max_tokens}; raise {KNOB} to at least {longest}")
        count = max_tokens // longest
        batches.append(order[start:start + count])
        start += count
    return batches


class TokenBudgetSampler:
    """Steps of ``batch_size`` samples (every sample once per epoch, reshuffled each epoch,
    seeded), each packed into micro-batches under ``max_tokens``."""

    def __init__(self, tokens: np.ndarray, max_tokens: int, batch_size: int, seed: int) -> None:
        self.tokens = np.asarray(tokens)
        self.max_tokens, self.batch_size = max_tokens, batch_size
        longest = int(self.tokens.max())
        if longest > max_tokens:
            raise ValueError(f"sample {int(self.tokens.argmax())} has {longest} tokens, more than "
                             f"{KNOB} {max_tokens}; raise {KNOB} to at least {longest}")
        self.n = len(self.tokens)
        # The same stream as fixed-size batches (trial.train.Sampler): same seed, same steps.
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(self.n)
        self.pos = 0

    def next_step(self) -> list[np.ndarray]:
        """The next optimizer step's micro-batches (index arrays, longest first)."""
        if self.pos >= self.n:
            self.order = self.rng.permutation(self.n)
            self.pos = 0
        step = self.order[self.pos:self.pos + self.batch_size]
        self.pos += len(step)
        return pack(step, self.tokens, self.max_tokens)

    def longest_step(self) -> list[np.ndarray]:
        """The step whose micro-batch costs the most memory: the longest samples, as many as
        the budget packs at their width. Every micro-batch holds at most ``max_tokens``
        positions, so the widest full one has the largest attention (count x width^2)."""
        longest = int(self.tokens.max())
        count = min(self.batch_size, max(1, self.max_tokens // longest))
        return [np.argsort(-self.tokens, kind="stable")[:count]]

    def epoch(self) -> list[list[np.ndarray]]:
        """The steps left in this epoch (all of them on a fresh sampler)."""
        steps = [self.next_step()]
        while self.pos < self.n:
            steps.append(self.next_step())
        return steps


def trim(value: Any, longest: int, width: int) -> Any:
    """Cut dim 1 of every tensor (of a Tensor, tuple or dict) whose dim 1 is the padded
    ``width`` down to ``longest``; other tensors pass whole."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[1] == width and longest < width:
            return value.narrow(1, 0, longest).contiguous()
        return value
    if isinstance(value, Mapping):
        return {k: trim(v, longest, width) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(trim(v, longest, width) for v in value)
    return value


def options(batch_size: int, lengths: Lengths | None, model: nn.Module | None = None,
            example: Any = None) -> tuple[list[int], list[Exclusion]]:
    """``[0]`` and the budgets worth trying on this data, or ``[0]`` with the reason.

    With ``model`` and ``example`` (a few inputs), budgets are offered only if trimming
    the example's padding changes none of the model's outputs (see :func:`trim_changes`).
    """
    if lengths is None:
        return [0], [Exclusion(KNOB, ANY, "the workload declares no per-sample lengths "
                                          "(Workload.lengths names its attention mask): "
                                          "fixed-size batches only")]
    tokens = lengths.tokens
    if int(tokens.min()) == lengths.width:
        return [0], [Exclusion(KNOB, ANY, f"every training sample fills the padded width "
                                          f"{lengths.width}: there is no padding to trim")]
    if model is not None and example is not None and lengths.key is not None:
        problem = trim_changes(model, example, lengths.key, lengths.width)
        if problem:
            return [0], [Exclusion(KNOB, ANY, problem)]
    floor = _pow2(int(tokens.max()))
    ceiling = max(floor, batch_size * lengths.width)
    budgets = sorted({min(ceiling, max(floor, _pow2(round(s * batch_size * float(tokens.mean())))))
                      for s in SCALES})
    return [0, *budgets], []


TOLERANCE = 1e-3  # of the outputs' largest magnitude: float reassociation is ~1e-6


@torch.no_grad()
def trim_changes(model: nn.Module, example: Any, key: str | int, width: int) -> str | None:
    """Why trimming padding would change what ``model`` computes on ``example``, or None.

    The example's samples that carry padding are run padded and trimmed to their longest
    (in eval mode); each sample's outputs must agree on its token positions (for outputs
    with a position dimension) or whole (for pooled outputs). A model that reads padding
    (no attention mask, a pool over every position) would learn from something else when
    trimmed, so it is not offered budgets.
    """
    mask = example[key]
    rows = torch.nonzero(mask.sum(1) < width).flatten()
    if len(rows) == 0:
        return None
    batch = mask.shape[0]

    def select(value):
        if isinstance(value, torch.Tensor):
            return value[rows.to(value.device)] if value.dim() and value.shape[0] == batch else value
        if isinstance(value, Mapping):
            return {k: select(v) for k, v in value.items()}
        return type(value)(select(v) for v in value)

    padded = select(example)
    sub_tokens = padded[key].sum(1).clamp(min=1)
    longest = int(sub_tokens.max())
    was_training = model.training
    model.eval()
    try:
        full = logits_of(call_model(model, padded))
        cut = logits_of(call_model(model, trim(padded, longest, width)))
    except Exception as exc:
        return f"the model fails on inputs trimmed to their longest sample: {describe_exception(exc)}"
    finally:
        model.train(was_training)
    full = trim(full, longest, width)
    if full.shape != cut.shape:
        return (f"trimming changes the shape of the model's outputs ({list(full.shape)} padded, "
                f"{list(cut.shape)} trimmed)")
    if full.dim() >= 2 and full.shape[1] == longest and longest < width:
        # Per-position outputs: compare each sample's token positions only.
        keep = (torch.arange(longest, device=full.device) < sub_tokens.to(full.device)[:, None])
        full, cut = full[keep], cut[keep]
    scale = max(1.0, float(full.abs().max())) if full.numel() else 1.0
    diff = float((full.float() - cut.float()).abs().max()) if full.numel() else 0.0
    if diff > TOLERANCE * scale:
        return (f"trimming padding changes the model's outputs (by up to {diff:.2g} on a probe "
                f"batch): it reads padded positions; mask them (attention, pooling) to be "
                f"offered token budgets")
    return None


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
