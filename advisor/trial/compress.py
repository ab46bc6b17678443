"""The compression steps of a trial, in their fixed order, around the fine-tune.

    prune -> fine-tune (distillation, fake quantization) -> quantize -> compile/freeze -> measure

``student`` runs before the fine-tune: it prunes the baseline and, for QAT, inserts fake
quantization. ``deployable`` runs after it, on a copy (the trained model stays intact for
the training-memory measurement): it makes pruning permanent, quantizes, and compiles the
inference model. Latency, accuracy and size are all measured on what ``deployable``
returns, the model a user would ship.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from advisor.knobs import DEPLOYED, Knobs
from advisor.techniques import checkpointing, pruning, quantization
from advisor.techniques import compile as compile_technique
from advisor.techniques.batching import BatchingConfig
from advisor.techniques.compile import CompileConfig
from advisor.techniques.layers import NO_PLAN, LayerPlan
from advisor.techniques.pruning import PruningConfig
from advisor.techniques.quantization import QuantizationConfig
from advisor.workload import Inputs


def student(model: nn.Module, knobs: Knobs, example: Inputs, keep: tuple[str, ...] = (),
            plan: LayerPlan = NO_PLAN) -> tuple[nn.Module, dict]:
    """Prune ``model`` in place and, for QAT, trace it with fake quantization (but for the
    layers ``plan`` protects).

    Returns the model to fine-tune and what pruning did (parameter counts).
    """
    prune_cfg = knobs.config(PruningConfig)
    info = pruning.apply(model, prune_cfg, example, keep, ratios=dict(plan.prune_ratios))
    if knobs.config(QuantizationConfig).qat:
        # A mask traced into the QAT graph would leave its weights non-constant, which
        # inductor cannot freeze into int8 kernels: the zeros are made permanent first
        # (the fine-tune may then move some of them; the result reports the sparsity left).
        pruning.finalize(model, prune_cfg)
        return quantization.prepare_qat(model, example, knobs.config(BatchingConfig).enabled,
                                        protected=plan.protected), info
    return model, info


@dataclass
class Deployable:
    module: nn.Module  # what is saved: its state dict is the size objective's artifact
    run: nn.Module  # what is called: ``module`` compiled, behind an input cast
    autocast: bool  # whether the trial's training precision also autocasts inference
    info: dict = field(default_factory=dict)
    input_dtype: torch.dtype | None = None  # what ``run`` casts floating-point inputs to


class CastInputs(nn.Module):
    """Casts floating-point inputs to the dtype of half-precision weights."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def _cast(self, value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(self.dtype)
        return value

    def forward(self, *args, **kwargs):
        return self.inner(*(self._cast(a) for a in args), **{k: self._cast(v) for k, v in kwargs.items()})


def deployable(trained: nn.Module, knobs: Knobs, example: Inputs,
               calibration: Iterable[Inputs] = (), plan: LayerPlan = NO_PLAN) -> Deployable:
    """The model to ship, built from a copy of the fine-tuned ``trained`` model; the layers
    ``plan`` protects keep their precision."""
    model = pruning.clone(trained)
    checkpointing.remove(model)
    prune_cfg = knobs.config(PruningConfig)
    pruning.finalize(model, prune_cfg)
    sparsity = pruning.sparsity(model) if prune_cfg.kind == "unstructured" else None
    config = knobs.config(QuantizationConfig)
    layers = quantization.linear_bytes(model) if config.mode in quantization.TORCHAO else {}
    model = quantization.quantize(model, config, example, calibration, protected=plan.protected)
    if layers:
        # What the layers torchao quantized store now, against what they stored before.
        after = quantization.linear_bytes(model)
        changed = [n for n in layers if n in after and after[n] != layers[n]]
        layers = {"quantized_layers": len(changed),
                  "quantized_bytes": [sum(layers[n] for n in changed), sum(after[n] for n in changed)]}
    model.requires_grad_(False)
    # PT2E int8 runs int8 kernels only once inductor freezes it, and torchao's quantized
    # tensors run eagerly through Python dispatch (an int8-dynamic BERT measured 18x slower
    # than fp32 uncompiled): both are deployed compiled, as their libraries say to. The other
    # models are compiled for inference when the trial's compile knob asks for it.
    mode = deployed_mode(knobs, "cpu" if _on_cpu(model) else "cuda")
    run = compile_technique.deploy(model, mode) if mode != "none" else model
    if config.input_dtype is not None:
        run = CastInputs(run, config.input_dtype)
    info = {"compile": mode, "freezing": mode != "none", "quantization": config.mode,
            "sparsity": sparsity, **layers, **({"protected": list(plan.protected)} if plan else {})}
    return Deployable(module=model, run=run, autocast=config.mode == "none", info=info,
                      input_dtype=config.input_dtype)


def deployed_mode(knobs: Knobs, device: str) -> str:
    """The compile mode ``deployable`` deploys ``knobs``' model in on ``device`` ("cpu" or "cuda")."""
    config = knobs.config(QuantizationConfig)
    compile_mode = knobs.config(CompileConfig).mode
    needs_compile = config.pt2e or config.mode in quantization.TORCHAO
    mode = compile_mode if compile_mode != "none" else ("default" if needs_compile else "none")
    if needs_compile and mode.startswith("max-autotune") and device == "cpu":
        # On CPU, max-autotune's GEMM autotuning fails in inductor's int8 linear lowering
        # (torch 2.13, int8-dynamic on the zoo's BERT: "LoweringException: KeyError: 'buf81'"
        # in mkldnn_lowerings.qlinear_unary): a quantized model is deployed in default mode.
        # The knob still compiles the fine-tune; the result records the mode deployed.
        mode = "default"
    return mode


def structure(knobs: Knobs, device: str, plan: LayerPlan | None = None) -> tuple:
    """What decides the program ``deployable`` builds for ``knobs`` on ``device``, as a key:
    two trials with the same key deploy the same kernels over other weights, whose values
    change neither a kernel's time nor the weights' bytes. Of the knobs that can change that
    program (``knobs.DEPLOYED``), those that do not for these values are left out:

    - unstructured pruning zeroes weights in place: the deployed tensors stay dense, so it
      deploys the kernels and bytes of no pruning (on the search table, int8-static CNNs
      unpruned and at 0.3 and 0.5 measured medians of 5.2, 5.1 and 5.2 ms, equal sizes);
    - a quantized model (or half-precision weights) runs without the trial's autocast, so its
      training precision does not reach it;
    - the compile mode is the one deployed (``deployed_mode``): a PT2E or torchao model is
      compiled in default mode whatever the knob, but in a mode it names that runs there;
    - with the trial's per-layer ``plan`` (``techniques/layers.py``), the layers it protects
      and its per-unit pruning ratios stand for ``quant_protect`` and a guided ``prune_ratio``:
      two shares that keep the same layers deploy the same program. Without it (``None``: not
      known) the knobs' values stand for themselves."""
    values: dict = {name: getattr(knobs, name) for name in DEPLOYED}
    if knobs.prune_kind == "unstructured":
        values.update(prune_kind="none", prune_ratio=0.0, prune_alloc="uniform")
    if knobs.quantization != "none":
        values["precision"] = None
    values["compile"] = deployed_mode(knobs, device)
    if plan is not None:
        values["quant_protect"] = plan.protected
        if knobs.prune_kind == "structured" and knobs.prune_alloc == "sensitivity":
            values.update(prune_ratio=None, prune_alloc=plan.prune_ratios)
    elif not knobs.quant_protect:
        values["quant_protect"] = ()  # a share of 0 keeps no layer, as a plan that keeps none
    return tuple(values.items())


def compiled(knobs: Knobs) -> bool:
    """Whether the deployable model of ``knobs`` is compiled (``deployable``): building it
    then costs a compilation, which a trial would otherwise pay once."""
    config = knobs.config(QuantizationConfig)
    return (knobs.config(CompileConfig).mode != "none" or config.pt2e
            or config.mode in quantization.TORCHAO)


def _on_cpu(model: nn.Module) -> bool:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor is None or tensor.device.type == "cpu"
