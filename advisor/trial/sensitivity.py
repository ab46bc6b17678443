"""Per-layer sensitivity, measured once per study with the baseline's weights.

For each layer an offered quantization mode would quantize, the loss on a few fixed batches
of training data is measured with that layer alone quantized, against the loss with none
(both deterministic, so the difference is the layer's, not noise): torchao's modes for real
(``quantize_`` on that layer of a copy), PT2E's int8 simulated with its numerics
(``_pt2e_alone``). Each layer's parameters
and its measured share of the fp32 forward time go with it. Where structured pruning is
offered, each of its units (``pruning.units``: an attention module's heads, a channel group)
is pruned alone at each ratio the space samples, with the loss rise and the parameters it
removed; and the whole model at each ratio, for the parameters a uniform ratio removes.
The table is stored with the study's baseline; ``techniques/layers.py`` turns a trial's
knobs into per-layer choices from it.

Training data only: the table decides which layers stay in full precision, so it must not
see the data trials are selected on.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from advisor.techniques import pruning, quantization
from advisor.techniques.pruning import PruningConfig
from advisor.techniques.quantization import QuantizationConfig
from advisor.trial.mapped import MappedSplit
from advisor.workload import Inputs, call_model, to_device

BATCHES = 4  # training batches the loss is measured on
TIMING_REPEATS = 10  # fp32 forwards the layers' time shares are the medians of


STRUCTURED = "structured"  # in ``measure``'s modes: measure the structured pruning units too


def ratios(high: float = pruning.MAX_RATIO) -> list[float]:
    """The ratios the space samples for pruning, up to ``high`` in its steps."""
    low, _, step = pruning.RATIO_RANGE
    return [round(low + i * step, 10) for i in range(round((high - low) / step) + 1)]


def families(offered: Iterable[str]) -> tuple[str, ...]:
    """The quantization modes among ``offered`` whose layers are measured, one per family
    (PT2E's two modes quantize alike: their family is measured once, as ``int8-static``)."""
    found: dict[str, str] = {}
    for mode in offered:
        if mode in quantization.PER_LAYER:
            family = QuantizationConfig(mode).family
            found.setdefault(family, "int8-static" if family == "pt2e" else mode)
    return tuple(found.values())


def measure(model: nn.Module, loss, train: MappedSplit, modes: Iterable[str], device: torch.device,
            batch: int, keep: tuple[str, ...] = (), on_layer: Callable[[], None] | None = None) -> dict:
    """The sensitivity table of ``model`` (the baseline, fp32, eval) for ``modes`` (one per
    quantization family, see :func:`families`, and ``STRUCTURED`` for pruning's units, which
    leave the ``keep`` layers whole): JSON-able, stored with the study's baseline."""
    began = time.perf_counter()
    modes = list(modes)
    model.eval()
    batches = _batches(train, batch, device)
    inputs = [x for x, _ in batches]
    base = _loss(model, loss, batches)
    modules = dict(model.named_modules())
    rows: dict[str, dict] = {}
    for mode in (m for m in modes if m != STRUCTURED):
        config = QuantizationConfig(mode)
        names = quantization.layers(model, config)
        if config.pt2e:
            ranges = _input_ranges(model, names, inputs)
            # A layer whose forward never runs (its weight read by another module) cannot be
            # quantized alone, nor kept out by name: it is not a choice, so not in the table.
            names = [n for n in names if n in ranges]
        for name in names:
            row = rows.setdefault(name, {"name": name, "kind": type(modules[name]).__name__,
                                         "params": sum(p.numel() for p in modules[name].parameters()),
                                         "quant": {}})
            if config.pt2e:
                with _pt2e_alone(modules[name], ranges[name]):
                    rise = _loss(model, loss, batches) - base
            else:
                rise = _loss(_quantize_one(model, config, name, names, inputs), loss, batches) - base
            row["quant"][config.family] = rise
            if on_layer:
                on_layer()
    shares = time_shares(model, inputs[0], list(rows), device)
    for name, row in rows.items():
        row["time_share"] = shares.get(name)
    out = {"loss": base, "batches": len(batches), "samples": sum(len(t) for _, t in batches),
           "modes": modes, "layers": list(rows.values())}
    if STRUCTURED in modes:
        out["pruning"] = _pruning(model, loss, batches, keep, base)
    return {**out, "seconds": time.perf_counter() - began}


def _pruning(model: nn.Module, loss, batches: list, keep: tuple[str, ...], base: float) -> dict:
    """Structured pruning's units, each pruned alone at each ratio up to
    ``pruning.MAX_UNIT_RATIO`` (the loss rise and the parameters removed), and the parameters
    the whole model loses at each uniform ratio the space samples."""
    example = batches[0][0]
    before = pruning.count_parameters(model)

    def pruned(ratio: float, ratios: dict[str, float] | None = None) -> nn.Module:
        copied = copy.deepcopy(model)
        pruning.apply(copied, PruningConfig(STRUCTURED, ratio), example, keep, ratios=ratios)
        return copied.eval()

    units = []
    for name, kind in pruning.units(copy.deepcopy(model), example, keep):
        at = {}
        for ratio in ratios(pruning.MAX_UNIT_RATIO):
            copied = pruned(0.0, {name: ratio})
            at[f"{ratio:g}"] = {"loss": _loss(copied, loss, batches) - base,
                                "removed": before - pruning.count_parameters(copied)}
        units.append({"name": name, "kind": kind, "ratios": at})
    uniform = {f"{r:g}": before - pruning.count_parameters(pruned(r)) for r in ratios()}
    return {"parameters": before, "units": units, "uniform": uniform}


def _quantize_one(model: nn.Module, config: QuantizationConfig, name: str, names: list[str],
                  inputs: list[Inputs]) -> nn.Module:
    """A copy of the model with layer ``name`` alone quantized in torchao ``config``'s mode."""
    others = [n for n in names if n != name]
    return quantization.quantize(copy.deepcopy(model), config, inputs[0], calibration=inputs, protected=others)


@torch.no_grad()
def _input_ranges(model: nn.Module, names: list[str], inputs: list[Inputs]) -> dict[str, tuple[float, float]]:
    """Each layer's input range (min, max) over the batches: what a static observer calibrates."""
    modules = dict(model.named_modules())
    ranges: dict[str, tuple[float, float]] = {}

    def observe(name):
        def hook(_m, args):
            low, high = float(args[0].min()), float(args[0].max())
            old = ranges.get(name, (low, high))
            ranges[name] = (min(old[0], low), max(old[1], high))
        return hook

    handles = [modules[n].register_forward_pre_hook(observe(n)) for n in names]
    try:
        for x in inputs:
            call_model(model, x)
    finally:
        for h in handles:
            h.remove()
    return ranges


@contextlib.contextmanager
def _pt2e_alone(layer: nn.Module, input_range: tuple[float, float]):
    """``layer`` computing as the x86 inductor quantizer's int8 makes it, for the duration: its
    weight rounded per output channel to symmetric int8, its input per tensor to affine uint8
    over the calibrated range (simulated in fp32 with ``torch.fake_quantize_*``: running the
    PT2E flow once per layer cost about 0.6 s a layer, the whole study's trials' worth on a
    small model). Weights and hooks are restored on exit."""
    weight = layer.weight.detach().clone()
    low, high = min(input_range[0], 0.0), max(input_range[1], 0.0)
    scale = max((high - low) / 255, 1e-8)
    zero = int(min(255, max(0, round(-low / scale))))
    w_scale = (weight.abs().flatten(1).amax(1) / 127).clamp(min=1e-8)
    with torch.no_grad():
        layer.weight.copy_(torch.fake_quantize_per_channel_affine(
            weight, w_scale, torch.zeros_like(w_scale, dtype=torch.int32), 0, -128, 127))
    handle = layer.register_forward_pre_hook(
        lambda _m, args: (torch.fake_quantize_per_tensor_affine(args[0], scale, zero, 0, 255), *args[1:]))
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            layer.weight.copy_(weight)


@torch.no_grad()
def _loss(model: nn.Module, loss, batches: list[tuple[Inputs, torch.Tensor]]) -> float:
    return float(np.mean([float(loss(call_model(model, x), t)) for x, t in batches]))


def _batches(train: MappedSplit, batch: int, device: torch.device) -> list[tuple[Inputs, torch.Tensor]]:
    """A fixed subset of the training data, ``BATCHES`` batches of ``batch`` samples."""
    idx = np.random.default_rng(1).permutation(len(train))[:batch * BATCHES]
    out = []
    for i in range(0, len(idx), batch):
        x, t = train.batch(idx[i:i + batch])
        out.append((to_device(x, device), to_device(t, device)))
    return out


@torch.no_grad()
def time_shares(model: nn.Module, inputs: Inputs, names: list[str], device: torch.device) -> dict[str, float]:
    """Each named layer's share of the model's fp32 forward time: per layer, the median over
    ``TIMING_REPEATS`` forwards of the time between its forward hooks, over the median time
    of a whole forward measured the same way (synchronized on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    modules = dict(model.named_modules())
    spent: dict[str, list[float]] = {n: [] for n in names}
    started: dict[str, float] = {}

    def before(name):
        def hook(_m, _i):
            sync()
            started[name] = time.perf_counter()
        return hook

    def after(name):
        def hook(_m, _i, _o):
            sync()
            spent[name].append(time.perf_counter() - started[name])
        return hook

    handles = [h for n in names for h in (modules[n].register_forward_pre_hook(before(n)),
                                          modules[n].register_forward_hook(after(n)))]
    totals = []
    try:
        for i in range(TIMING_REPEATS + 2):
            sync()
            t0 = time.perf_counter()
            call_model(model, inputs)
            sync()
            if i >= 2:  # two warm-up forwards
                totals.append(time.perf_counter() - t0)
            else:
                for values in spent.values():
                    values.clear()
    finally:
        for h in handles:
            h.remove()
    total = statistics.median(totals)
    return {n: statistics.median(v) / total for n, v in spent.items() if v}
