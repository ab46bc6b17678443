"""Fitting a user's model and data to the pipeline, exactly: Hugging Face's conventions.

Applied once, when a workload is built (``workload.build``), so the study, every trial and
``advisor apply`` see the same model and data:

- a sample that is one dict holding its target under ``Workload.target`` (``"labels"`` is
  found without being named) is split into ``(inputs, target)``;
- ``next_token`` is detected for Hugging Face causal language models (their ``labels`` are
  the inputs, and the model predicts position t + 1 at position t);
- ``transformers``' ``Conv1D`` (GPT-2's projections: a Linear whose weight is stored
  transposed) becomes the ``nn.Linear`` it is, so pruning and every torchao mode reach it;
  the outputs are bit-for-bit those of ``addmm`` on the transposed weight;
- ``config.use_cache`` is turned off: a returned key/value cache is what ``torch.export``
  cannot capture, and no training step or single forward pass reads it.

Once the data is cached, dict inputs with a right-padded 0/1 ``attention_mask`` make the
workload variable-length, as if ``Workload.lengths`` named the mask (``trial/cache.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from torch import nn

from advisor.errors import AdvisorError

TARGET_KEY = "labels"  # where Hugging Face datasets and models keep the target
MASK_KEY = "attention_mask"


def workload(w: Any) -> None:
    """Adapt a checked ``Workload`` in place (its data, model and ``next_token``)."""
    key = _target_key(w)
    if key is not None:
        w.target = key
        w.train, w.val = TargetSplit(w.train, key, "train"), TargetSplit(w.val, key, "val")
    if w.next_token is None:
        w.next_token = is_causal_lm(w.model)
    linearize(w.model)
    if getattr(getattr(w.model, "config", None), "use_cache", None):
        w.model.config.use_cache = False


def _target_key(w: Any) -> str | None:
    sample = w.train[0]
    one_dict = isinstance(sample, Mapping)
    if w.target is None:
        if not one_dict:
            return None
        if TARGET_KEY in sample:
            return TARGET_KEY
        raise AdvisorError(
            f"a sample of Workload.train is one dict (keys {list(sample)[:8]}) with no target: "
            f"name the key that holds the target in Workload.target, or give (inputs, target) pairs")
    if not one_dict:
        raise AdvisorError(
            f"Workload.target names the key of samples that are one dict; Workload.train's samples "
            f"are {type(sample).__name__}s: give dicts, or drop Workload.target for (inputs, target) pairs")
    if w.target not in sample:
        raise AdvisorError(f"Workload.target is {w.target!r}, but a sample of Workload.train has keys "
                           f"{list(sample)[:8]}; name the key that holds the target")
    return w.target


class TargetSplit:
    """A map-style dataset of one-dict samples, seen as ``(inputs, target)`` pairs."""

    def __init__(self, data: Any, key: str, split: str) -> None:
        self.data, self.key, self.split = data, key, split

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[dict, Any]:
        sample = self.data[i]
        if not isinstance(sample, Mapping) or self.key not in sample:
            got = list(sample) if isinstance(sample, Mapping) else type(sample).__name__
            raise AdvisorError(f"sample {i} of Workload.{self.split} must be a dict with the target "
                               f"key {self.key!r} (Workload.target); got {got}")
        inputs = {k: v for k, v in sample.items() if k != self.key}
        return inputs, sample[self.key]


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal language model (GPT-2, Llama...): its class is one that
    ``AutoModelForCausalLM`` builds."""
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers moved it
        return False
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def linearize(model: nn.Module) -> int:
    """Replace every ``transformers.pytorch_utils.Conv1D`` with an equal ``nn.Linear``;
    returns how many. Tied parameters stay tied (the replacement shares nothing with them:
    a Conv1D's weight is its own)."""
    if "transformers" not in sys.modules:
        return 0
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                inputs, outputs = child.weight.shape  # Conv1D stores [in, out]
                linear = nn.Linear(inputs, outputs, bias=child.bias is not None,
                                   device=child.weight.device, dtype=child.weight.dtype)
                linear.weight = nn.Parameter(child.weight.detach().t().contiguous(),
                                             requires_grad=child.weight.requires_grad)
                if child.bias is not None:
                    linear.bias = child.bias
                setattr(parent, name, linear)
                count += 1
    return count
