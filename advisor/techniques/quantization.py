"""Quantization of the deployable model: lower-precision weights, int8, int4 and float8.

- ``bf16`` / ``fp16``: weights (and the inputs) cast to half precision.
- ``int8-dynamic`` / ``int8-weight-only`` / ``int4-weight-only`` / ``float8``: torchao's
  ``quantize_`` configs. They replace ``nn.Linear`` weights only (a Linear whose weight is
  tied to another module's, like an LM head, keeps the one shared tensor rather than be
  stored twice); int4 and float8 have kernels on CUDA only (float8 from compute capability
  8.9). The deployable model is compiled, as torchao's quantized tensors are meant to run.
- ``int8-static``: PT2E (``torchao.quantization.pt2e``) with the x86 inductor quantizer,
  calibrated on batches of training data. It quantizes convolutions too, and is deployed
  through inductor with ``freezing``, the form that runs int8 kernels (its eager q/dq
  reference graph is slower than fp32).
- ``qat-int8``: the same quantizer's fake quantization is inserted before the fine-tune,
  which then trains through it; the trained graph is converted like ``int8-static``.

``protect`` keeps the layers most sensitive to the mode in the baseline's precision: the
study measures each layer's sensitivity once (``trial/sensitivity.py``) and
``techniques/layers.py`` picks the layers, by loss per parameter, within a budget of
``protect`` of the quantizable parameters. PT2E leaves them out through the quantizer's
per-module config, torchao through ``quantize_``'s filter.

Both PT2E modes capture the model with ``techniques/capture.py`` (models whose outputs
``torch.export`` refuses go through their logits; variable-length batches get a dynamic
sequence dimension).

``torch.ao.quantization`` is deprecated, so it is not used. The converted PT2E graph keeps
the fp32 weights it no longer reads as attributes; ``quantize`` drops them, so the saved
artifact (and the size objective) holds what the deployed model really needs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from advisor.errors import first_line
from advisor.hardware import Hardware
from advisor.techniques import ANY, Exclusion, capture, unknown
from advisor.techniques.precision import HALF_DTYPES
from advisor.workload import Inputs, call_model

KNOB = "quantization"
MODES = ("none", "bf16", "fp16", "int8-dynamic", "int8-weight-only", "int8-static", "qat-int8",
         "int4-weight-only", "float8")
TORCHAO = ("int8-dynamic", "int8-weight-only", "int4-weight-only", "float8")
PT2E = ("int8-static", "qat-int8")
PER_LAYER = ("int8-dynamic", "int8-weight-only", "int8-static", "qat-int8", "int4-weight-only", "float8")
PROTECT_KNOB = "quant_protect"
MAX_PROTECT = 0.5
PROTECT_RANGE = (0.0, MAX_PROTECT, 0.1)  # (low, high, step) the space samples


@dataclass(frozen=True)
class QuantizationConfig:
    mode: str = "none"
    protect: float = 0.0  # share of the quantizable parameters the most sensitive layers may keep

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise unknown(KNOB, self.mode, MODES)
        if isinstance(self.protect, bool) or not isinstance(self.protect, (int, float)) \
                or not 0.0 <= self.protect <= MAX_PROTECT:
            raise ValueError(f"{PROTECT_KNOB} must be a number from 0 to {MAX_PROTECT}; got {self.protect!r}")
        if self.protect and self.mode not in PER_LAYER:
            raise ValueError(f"{PROTECT_KNOB} keeps layers out of int8, int4 or float8 quantization; "
                             f"quantization {self.mode!r} takes {PROTECT_KNOB} 0")

    @property
    def family(self) -> str:
        """The layers' sensitivity measured for this mode: PT2E's two modes share one."""
        return "pt2e" if self.mode in PT2E else self.mode

    @property
    def pt2e(self) -> bool:
        """Quantized through PT2E: deployed compiled with freezing."""
        return self.mode in PT2E

    @property
    def calibrated(self) -> bool:
        """Static quantization: activation ranges come from calibration batches."""
        return self.mode == "int8-static"

    @property
    def qat(self) -> bool:
        return self.mode == "qat-int8"

    @property
    def input_dtype(self) -> torch.dtype | None:
        """The dtype floating inputs are cast to, when the weights are in half precision."""
        if self.mode in HALF_DTYPES:
            return HALF_DTYPES[self.mode]
        if self.mode in ("int4-weight-only", "float8"):
            return torch.bfloat16
        return None


def check_knobs(values) -> None:
    """QAT fine-tunes a traced fp32 graph: no autocast, no checkpointed blocks inside it."""
    if QuantizationConfig(values["quantization"]).qat and (
            values["precision"] != "fp32" or values["checkpoint_every"]):
        raise ValueError("qat-int8 fine-tunes a traced fp32 graph with fake quantization: it "
                         "takes precision fp32 and checkpoint_every 0")


# -- PT2E ---------------------------------------------------------------------------------

def _x86_quantizer(qat: bool, protected: Iterable[str] = ()):
    """The x86 inductor quantizer, leaving the ``protected`` modules (by name) in fp32."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=qat))
    for name in protected:
        # A model captured through capture.Logits holds the workload's model as ``inner``.
        for prefix in ("", "inner."):
            quantizer.set_module_name_qconfig(prefix + name, None)
    return quantizer


def prepare_qat(model: nn.Module, example: Inputs, lengths: bool = False,
                protected: Iterable[str] = ()) -> nn.Module:
    """The model with fake quantization inserted (but for the ``protected`` layers), to
    fine-tune in place of ``model``; ``lengths``: the fine-tune's batches vary in length (a
    token budget trims them)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    model.train()
    captured = capture.export(model, example, lengths)
    prepared = prepare_qat_pt2e(capture.graph_of(captured), _x86_quantizer(qat=True, protected=protected))
    # .train()/.eval() then switch the traced graph's batch norm and dropout, as the
    # trainer and measurements expect of any module.
    capture.allow_train_eval(prepared)
    prepared = capture.rewrap(prepared, captured)
    # The first forward sizes the observers' per-channel scales (from one element to one
    # per channel); a graph compiled before that fails its shape guards.
    with torch.no_grad():
        call_model(prepared, example)
    return prepared


def quantize(model: nn.Module, config: QuantizationConfig, example: Inputs,
             calibration: Iterable[Inputs] = (), protected: Iterable[str] = (),
             graph: bool = False) -> nn.Module:
    """The deployable quantized model (``model`` itself may be changed or reused), with the
    ``protected`` layers (by name) left as they are; ``graph``: for a PT2E mode, ``model``
    is already ``capture.export``'s graph of the model."""
    protected = frozenset(protected)
    model.eval()
    mode = config.mode
    if mode == "none":
        return model
    if mode in HALF_DTYPES:
        return model.to(HALF_DTYPES[mode])
    if mode in TORCHAO:
        from torchao.quantization import quantize_

        if mode in ("int4-weight-only", "float8"):
            model = model.to(torch.bfloat16)
        tied = tied_parameters(model)
        quantize_(model, _torchao_config(mode),
                  filter_fn=lambda m, fqn: _quantizable(m, tied) and fqn not in protected)
        return model
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    # qat-int8: prepare_qat traced the model before the fine-tune, which trained it.
    captured = model if config.qat or graph else capture.export(model, example)
    prepared = capture.graph_of(captured)
    if not config.qat:
        prepared = prepare_pt2e(prepared, _x86_quantizer(qat=False, protected=protected))
    move_exported_model_to_eval(prepared)
    if config.calibrated:
        with torch.no_grad():
            for inputs in calibration:
                call_model(capture.rewrap(prepared, captured), inputs)
    converted = convert_pt2e(prepared)
    drop_unused_tensors(converted)
    return capture.rewrap(converted, captured)


def layers(model: nn.Module, config: QuantizationConfig) -> list[str]:
    """The names of the layers ``config``'s mode quantizes: the ones ``protect`` may keep."""
    if config.mode in PT2E:
        # What the x86 quantizer annotates. ``nn.MultiheadAttention``'s projections stay
        # fp32 under it (its out_proj's forward never runs; the attention op reads the weight).
        return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                and not isinstance(m, NonDynamicallyQuantizableLinear)]
    if config.mode in TORCHAO:
        tied = tied_parameters(model)
        return [n for n, m in model.named_modules() if _quantizable(m, tied)]
    return []


def _quantizable(module: nn.Module, tied: set[int]) -> bool:
    """A Linear torchao may replace: not tied to another module, and not the output
    projection of ``nn.MultiheadAttention`` (a ``NonDynamicallyQuantizableLinear``, whose
    weight the attention kernel reads directly)."""
    return isinstance(module, nn.Linear) and id(module.weight) not in tied and \
        not isinstance(module, NonDynamicallyQuantizableLinear)


def tied_parameters(model: nn.Module) -> set[int]:
    """Ids of the parameters more than one module holds (an LM head tied to the token
    embedding). torchao would quantize the Linear's side only and the tensor would then be
    stored twice, so tied layers keep their one shared tensor."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return {pid for pid, n in owners.items() if n > 1}


def linear_bytes(model: nn.Module) -> dict[str, int]:
    """Each ``nn.Linear``'s own tensors as ``torch.save`` stores them, by name (after a
    torchao mode: the quantized weights with their scales), to show what quantizing saved."""
    sizes = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            buffer = io.BytesIO()
            torch.save(module.state_dict(), buffer)
            sizes[name] = buffer.tell()
    return sizes


def _torchao_config(mode: str):
    import torchao.quantization as tq

    if mode == "int8-dynamic":
        return tq.Int8DynamicActivationInt8WeightConfig()
    if mode == "int8-weight-only":
        return tq.Int8WeightOnlyConfig()
    if mode == "int4-weight-only":
        return tq.Int4WeightOnlyConfig(group_size=128)
    return tq.Float8DynamicActivationFloat8WeightConfig()


def drop_unused_tensors(graph_module: nn.Module) -> list[str]:
    """Delete the parameters and buffers the graph no longer reads (PT2E keeps the fp32
    originals of the weights it replaced with int8 constants); returns their names."""
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    dropped = []
    for name in list(graph_module.state_dict(keep_vars=True)):
        if name in used:
            continue
        owner, _, leaf = name.rpartition(".")
        delattr(graph_module.get_submodule(owner) if owner else graph_module, leaf)
        dropped.append(name)
    return dropped


# -- availability -------------------------------------------------------------------------

def options(hw: Hardware, model: nn.Module, example: Inputs,
            lengths: bool = False) -> tuple[list[str], list[Exclusion]]:
    """Modes this device and model can run, and why the others are left out; ``lengths``:
    the workload is variable-length, so QAT's captured graph must take other lengths too."""
    offered, excluded = ["none"], []

    def take(mode: str, reason: str) -> None:
        if reason:
            excluded.append(Exclusion(KNOB, mode, reason))
        else:
            offered.append(mode)

    cuda = hw.device == "cuda"
    capability = hw.capability or (0, 0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    no_linear = "torchao's configs quantize nn.Linear layers only; the model has none" if not linears else ""
    take("bf16", "" if hw.bf16 else f"{hw.device} has no fast bf16 kernels")
    take("fp16", "" if hw.fp16_fast else (f"{hw.device} has no fast fp16 kernels (no AMX-FP16; fp16 weights "
                                          f"ran 1.2-1.35x slower than fp32)"))
    for mode in ("int8-dynamic", "int8-weight-only"):
        take(mode, no_linear or _torchao_failure(model, example, mode))
    if cuda:
        reason = ("PT2E int8 targets the x86 inductor backend (CPU); on CUDA use "
                  "int8-dynamic, int4-weight-only or float8")
        take("int8-static", reason)
        take("qat-int8", reason)
    else:
        reason = _export_failure(model, example)
        take("int8-static", reason)
        take("qat-int8", reason or (_export_failure(model, example, lengths=True) if lengths else ""))
    wide = [m for m in linears if m.in_features % 128 == 0]
    take("int4-weight-only",
         "needs CUDA" if not cuda else
         "" if wide else "needs nn.Linear layers with in_features a multiple of 128; the model has none")
    take("float8",
         "needs CUDA" if not cuda else
         f"needs compute capability 8.9+; this GPU has {capability[0]}.{capability[1]}"
         if capability < (8, 9) else no_linear)
    return offered, excluded


def protect_options(model: nn.Module) -> tuple[tuple, list[Exclusion]]:
    """The ``quant_protect`` range, where the model has two or more layers to choose from."""
    count = sum(isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, NonDynamicallyQuantizableLinear)
                for m in model.modules())
    if count < 2:
        return (), [Exclusion(PROTECT_KNOB, ANY, f"keeping sensitive layers out of quantization needs two "
                                                 f"or more Linear or Conv2d layers; the model has {count}")]
    return PROTECT_RANGE, []


def _torchao_failure(model: nn.Module, example: Inputs, mode: str) -> str:
    """Why ``mode`` cannot run ``model`` ("" when a quantized CPU copy runs the example)."""
    try:
        with torch.no_grad():
            call_model(quantize(copy.deepcopy(model).cpu(), QuantizationConfig(mode), example), example)
    except Exception as exc:  # the reason is the library's, reported as a space exclusion
        return f"torchao's {mode} fails on the model: {type(exc).__name__}: {first_line(exc)}"
    return ""


def _export_failure(model: nn.Module, example: Inputs, lengths: bool = False) -> str:
    """Why PT2E cannot capture ``model`` ("" when ``torch.export`` can), on a CPU copy;
    with ``lengths``, with a dynamic sequence dimension."""
    # torch logs and prints the graph it failed on; the one-line reason is what is kept.
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            capture.export(copy.deepcopy(model).cpu().eval(), example, lengths)
    except Exception as exc:  # the reason is the library's, reported as a space exclusion
        what = "with a dynamic sequence length " if lengths else ""
        return f"torch.export cannot capture the model {what}for PT2E: {type(exc).__name__}: {first_line(exc)}"
    finally:
        logging.disable(logging.NOTSET)
    return ""
