"""torch.compile modes; the compile time is measured and charged to the trial.

On CPU, ``reduce-overhead`` (CUDA graphs) has nothing to do and ``max-autotune`` is offered
as its ``-no-cudagraphs`` variant. The deployable (inference) model is compiled apart from the
training one, with inductor's ``freezing`` (``deploy``). Inductor's on-disk cache is shared between trials
(``TORCHINDUCTOR_CACHE_DIR``, set by the runner), so a graph compiled once is reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch._inductor.config as inductor_config
from torch import nn
from torch._inductor import list_mode_options

from advisor.hardware import Hardware
from advisor.techniques import Exclusion, unknown

KNOB = "compile"
MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileConfig:
    mode: str = "none"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise unknown(KNOB, self.mode, MODES)

    @property
    def cudagraphs(self) -> bool:
        return self.mode in ("reduce-overhead", "max-autotune")


def apply(model: nn.Module, config: CompileConfig) -> nn.Module:
    """The compiled model (compilation itself happens lazily, on the first call)."""
    if config.mode == "none":
        return model
    return torch.compile(model, mode=config.mode)


# Distinct batch sizes one deployable model may be compiled for: the latency batch, batch 1
# and a serving study's padded sizes (1 to 64 in powers of two).
DEPLOY_SHAPES = 16


def deploy(model: nn.Module, mode: str) -> nn.Module:
    """The inference model compiled in ``mode`` with inductor's ``freezing``: weights become
    constants, so it folds and prepacks them (and lowers PT2E int8 to int8 kernels).

    Static shapes (``dynamic=False``): each batch size gets its own graph, as a server keeps
    a few static shapes warm. The dynamic graph inductor makes by default at the third batch
    size was measured to fail on frozen PT2E int8 convolutions (torch 2.13: "expected size
    32==32, stride 1==64" at every batch but the first two)."""
    import torch._dynamo.config as dynamo_config

    if hasattr(dynamo_config, "recompile_limit"):  # past it, dynamo would run the model eagerly
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, DEPLOY_SHAPES)
    return _Frozen(torch.compile(model, dynamic=False, options=list_mode_options(mode) or None))


class _Frozen(nn.Module):
    """Calls a compiled model with inductor's ``freezing`` on. Compilation is lazy (first
    call, and each recompile), so the setting must hold around the calls; passing it in
    ``torch.compile(options=...)`` was measured to leave PT2E's int8 convolutions unlowered
    (``UnsupportedOperatorException: onednn.qconv_prepack``)."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args, **kwargs):
        with inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


def options(hw: Hardware) -> tuple[list[str], list[Exclusion]]:
    if not hw.compiler:
        return ["none"], [Exclusion(KNOB, m, hw.compiler_note) for m in MODES if m != "none"]
    if hw.device == "cuda":
        offered = ["none", "default", "reduce-overhead", "max-autotune"]
        return offered, [Exclusion(KNOB, "max-autotune-no-cudagraphs",
                                   "max-autotune with CUDA graphs is offered instead")]
    return ["none", "default", "max-autotune-no-cudagraphs"], [
        Exclusion(KNOB, "reduce-overhead", "CUDA graphs need a CUDA device"),
        Exclusion(KNOB, "max-autotune", "uses CUDA graphs; max-autotune-no-cudagraphs is offered"),
    ]
