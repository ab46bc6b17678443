"""Mixed precision: autocast to bf16 or fp16, with loss scaling for fp16.

Uses ``torch.autocast(device_type, dtype)`` and ``torch.amp.GradScaler(device)`` (the
device-generic APIs; ``torch.cuda.amp`` is deprecated). The same autocast wraps the
deployable model's inference, so latency is measured as the model would be served.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from advisor.hardware import Hardware
from advisor.techniques import Exclusion, unknown

KNOB = "precision"
CHOICES = ("fp32", "bf16", "fp16")
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionConfig:
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.dtype not in CHOICES:
            raise unknown(KNOB, self.dtype, CHOICES)


def autocast(config: PrecisionConfig, device_type: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``config`` (a no-op for fp32)."""
    if config.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=HALF_DTYPES[config.dtype])


def grad_scaler(config: PrecisionConfig, device_type: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling against gradient underflow; bf16 has fp32's range."""
    if config.dtype != "fp16":
        return None
    return torch.amp.GradScaler(device_type)


def options(hw: Hardware) -> tuple[list[str], list[Exclusion]]:
    offered, excluded = ["fp32"], []
    if hw.bf16:
        offered.append("bf16")
    else:
        excluded.append(Exclusion(KNOB, "bf16", f"{hw.device} has no fast bf16 kernels"))
    if hw.fp16_fast:
        offered.append("fp16")
    else:
        excluded.append(Exclusion(
            KNOB, "fp16",
            f"{hw.device} has no fast fp16 kernels (no AMX-FP16; without it a fp16 fine-tune "
            "step ran 10-100x slower than fp32)"))
    return offered, excluded
