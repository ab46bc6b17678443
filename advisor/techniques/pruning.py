"""Pruning: structured (channels removed for real), unstructured (zeros), or 2:4 sparsity.

- ``structured``: attention modules lose their lowest-L1 heads whole (``heads.py``), then
  Torch-Pruning's DepGraph removes the lowest-L1 channels and neurons elsewhere (MLP hidden
  units, convolution channels) and everything that depends on them, so parameters, saved
  size and latency really drop. A model with attention keeps its width (the residual stream).
  The output layer and the layers the workload names in ``Workload.keep`` are never pruned.
- ``unstructured``: global L1 magnitude (``torch.nn.utils.prune``). The zeros stay zeros
  through the fine-tune (the mask is kept until ``finalize``), but a dense tensor of zeros
  is as large and as slow as any other: the saved artifact, and so the size objective,
  shows that.
- ``2:4``: two of every four weights along the input dimension of each ``nn.Linear`` are
  zeroed, then stored as ``torch.sparse.to_sparse_semi_structured`` tensors, the form that
  sparse tensor cores (compute capability 8.0+) run faster. Offered only there.

A trial prunes the baseline before its fine-tune, which recovers accuracy.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.utils import prune as torch_prune

from advisor.errors import AdvisorError, first_line
from advisor.hardware import Hardware
from advisor.techniques import Exclusion, heads, unknown
from advisor.workload import Inputs, call_model, logits_of

KNOB = "prune_kind"
KINDS = ("none", "unstructured", "structured", "2:4")
ALLOCS = ("uniform", "sensitivity")  # how a structured ratio is spread over the layers (techniques/layers.py)
MAX_RATIO = 0.8
MAX_UNIT_RATIO = 0.9  # one unit's ratio when a global ratio is spread by sensitivity (layers.py)
RATIO_KINDS = ("unstructured", "structured")  # the kinds that take a ratio
RATIO_RANGE = (0.1, MAX_RATIO, 0.1)  # (low, high, step) the space samples
PROBE_RATIO = 0.5
_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class PruningFailed(AdvisorError):
    """The pruning library could not prune this model; the message carries its reason."""


@dataclass(frozen=True)
class PruningConfig:
    kind: str = "none"
    ratio: float = 0.0  # fraction of channels (structured) or weights (unstructured) removed
    alloc: str = "uniform"  # structured: the same ratio everywhere, or per unit by sensitivity

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise unknown(KNOB, self.kind, KINDS)
        if self.alloc not in ALLOCS:
            raise unknown("prune_alloc", self.alloc, ALLOCS)
        if self.alloc != "uniform" and self.kind != "structured":
            raise ValueError(f"prune_alloc spreads a structured pruning ratio over the layers; prune_kind "
                             f"{self.kind!r} takes prune_alloc 'uniform'")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) \
                or not 0.0 <= self.ratio <= MAX_RATIO:
            raise ValueError(f"prune_ratio must be a number from 0 to {MAX_RATIO}; got {self.ratio!r}")

    @property
    def active(self) -> bool:
        return self.kind != "none" and (self.kind == "2:4" or self.ratio > 0)

    def label(self) -> str:
        return self.kind if self.kind not in RATIO_KINDS else f"{self.kind}:{self.ratio:g}"


def output_layers(model: nn.Module, example: Inputs) -> list[nn.Module]:
    """The prunable layer that runs last in a forward pass: the one producing the output."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
             for m in model.modules() if isinstance(m, _PRUNABLE)]
    try:
        with torch.no_grad():
            call_model(model, example)
    finally:
        for h in hooks:
            h.remove()
    return order[-1:]


def kept_layers(model: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    """The modules ``Workload.keep`` names, or one line saying which name is unknown."""
    modules = dict(model.named_modules())
    out = []
    for name in names:
        if name not in modules:
            known = [n for n, m in modules.items() if isinstance(m, _PRUNABLE)]
            raise AdvisorError(
                f"Workload.keep names layer {name!r}, which the model does not have; its "
                f"prunable layers are {', '.join(known[:10]) or 'none'}")
        out.append(modules[name])
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def apply(model: nn.Module, config: PruningConfig, example: Inputs, keep: tuple[str, ...] = (),
          ratios: Mapping[str, float] | None = None) -> dict:
    """Prune ``model`` in place; returns the parameter counts before and after. ``ratios``
    (structured only): a ratio per unit (``units``), by name, in place of ``config.ratio``.

    Raises :class:`PruningFailed` with the library's reason when it cannot prune the model
    or the pruned model no longer produces outputs of the same shape.
    """
    before = count_parameters(model)
    if not (config.active or (config.kind == "structured" and ratios)):
        return {"parameters_before": before, "parameters_after": before}
    kept = kept_layers(model, keep)
    was_training = model.training
    model.eval()  # the example is a probe, not a training batch: no dropout, no statistics
    try:
        ignored = output_layers(model, example) + kept
        with torch.no_grad():
            expected = logits_of(call_model(model, example)).shape
        details = {}
        if config.kind == "structured":
            details = _structured(model, config.ratio, example, ignored, ratios or {})
        elif config.kind == "unstructured":
            _unstructured(model, config.ratio, ignored)
        else:
            _two_four(model, ignored)
        with torch.no_grad():
            got = logits_of(call_model(model, example)).shape
    except PruningFailed:
        raise
    except Exception as exc:
        raise PruningFailed(f"{config.kind} pruning failed in Torch-Pruning/torch: "
                            f"{type(exc).__name__}: {first_line(exc)}"
                            ) from None
    finally:
        model.train(was_training)
    if got != expected:
        raise PruningFailed(
            f"{config.kind} pruning changed the model's output shape from {tuple(expected)} to "
            f"{tuple(got)}; name the output layers in Workload.keep")
    return {"parameters_before": before, "parameters_after": count_parameters(model), **details}


def _structured(model: nn.Module, ratio: float, example: Inputs, ignored: list[nn.Module],
                ratios: Mapping[str, float]) -> dict:
    """Whole attention heads first (``heads.py``), then Torch-Pruning's channels everywhere
    else. Attention projections are left to the first step, and with them the model width
    (the residual stream every block adds to): the MLPs' hidden channels, convolutions'
    channels and other layers' outputs are what Torch-Pruning removes. A unit ``ratios``
    names takes its own ratio (Torch-Pruning's ``pruning_ratio_dict`` for channel groups)."""
    import torch_pruning as tp

    attention = heads.find(model)
    before = sum(a.heads for a in attention if not a.skipped)
    removed = sum(heads.prune(a, ratios.get(a.name, ratio)) for a in attention)
    whole = _whole(model, attention)
    modules = dict(model.named_modules())
    by_layer = {modules[name]: r for name, r in ratios.items()
                if name in modules and not any(a.name == name for a in attention)}
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio, pruning_ratio_dict=by_layer or None, ignored_layers=ignored + whole,
        forward_fn=lambda m, x: logits_of(call_model(m, x)))
    pruner.step()
    skipped = sorted({a.skipped for a in attention if a.skipped})
    return {"heads_before": before, "heads_after": before - removed,
            **({"heads_kept_whole": skipped} if skipped else {})}


def removed(model: nn.Module, example: Inputs, keep: tuple[str, ...], ratios: Mapping[str, float]) -> int:
    """The parameters structured pruning with a ratio per unit removes, found on a copy."""
    copied = copy.deepcopy(model)
    info = apply(copied, PruningConfig("structured", 0.0), example, keep, ratios=ratios)
    return info["parameters_before"] - info["parameters_after"]


def _whole(model: nn.Module, attention: list[heads.Attention]) -> list[nn.Module]:
    """The layers Torch-Pruning leaves whole: attention projections (heads go whole instead)."""
    whole = [p for a in attention for p in a.projections]
    return whole + [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]


def units(model: nn.Module, example: Inputs, keep: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """What structured pruning removes channels from, as ``(name, kind)``: each attention
    module whose heads can go (``"heads"``) and each Torch-Pruning channel group other than
    the output's and the kept layers', named by its root layer (``"channels"``). A ratio per
    unit, by these names, is what ``apply``'s ``ratios`` takes."""
    import torch_pruning as tp

    model.eval()
    attention = heads.find(model)
    found = [(a.name, "heads") for a in attention if not a.skipped and a.heads > 1]
    ignored = output_layers(model, example) + kept_layers(model, keep) + _whole(model, attention)
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=example, forward_fn=lambda m, x: logits_of(call_model(m, x)),
        ignored_params=[])
    names = {id(m): n for n, m in model.named_modules()}
    skip = {id(m) for layer in ignored for m in layer.modules()}
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=list(_PRUNABLE)):
        root = group[0].dep.target.module
        if id(root) in names and id(root) not in skip:
            found.append((names[id(root)], "channels"))
    return found


def _targets(model: nn.Module, ignored: list[nn.Module], kinds=_PRUNABLE) -> list[tuple[nn.Module, str]]:
    """The weights masks may go on. ``nn.MultiheadAttention``'s output projection is left
    out: the attention reads its weight directly, never through the Linear's forward, where
    the mask is applied, so a masked weight would be one tensor reused across steps."""
    skip = {id(m) for m in ignored}
    return [(m, "weight") for m in model.modules() if isinstance(m, kinds) and id(m) not in skip
            and not isinstance(m, NonDynamicallyQuantizableLinear)]


def _unstructured(model: nn.Module, ratio: float, ignored: list[nn.Module]) -> None:
    targets = _targets(model, ignored)
    if not targets:
        raise PruningFailed("unstructured pruning found no Linear or Conv weights to prune")
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=ratio)


def _two_four(model: nn.Module, ignored: list[nn.Module]) -> None:
    targets = [(m, n) for m, n in _targets(model, ignored, (nn.Linear,)) if _fits_two_four(m)]
    if not targets:
        raise PruningFailed("2:4 sparsity needs nn.Linear layers whose sides are multiples of 64; "
                            "the model has none outside the output layer")
    for module, name in targets:
        weight = getattr(module, name).detach()
        groups = weight.abs().reshape(-1, 4)
        keep = groups.topk(2, dim=1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
        torch_prune.custom_from_mask(module, name, mask.reshape(weight.shape))


def _fits_two_four(module: nn.Linear) -> bool:
    return module.in_features % 64 == 0 and module.out_features % 64 == 0


def finalize(model: nn.Module, config: PruningConfig) -> None:
    """Make the pruning permanent in the deployable model: drop masks, pack 2:4 weights."""
    for module in model.modules():
        if torch_prune.is_pruned(module) and hasattr(module, "weight_mask"):
            torch_prune.remove(module, "weight")
            if config.kind == "2:4" and isinstance(module, nn.Linear):
                from torch.sparse import to_sparse_semi_structured

                module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()),
                                             requires_grad=False)


def clone(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works while masks are attached: a masked ``weight`` is
    recomputed from ``weight_orig * weight_mask`` (a non-leaf tensor deepcopy refuses)."""
    held = [(m, m.__dict__.pop("weight")) for m in model.modules()
            if hasattr(m, "weight_mask") and "weight" in m.__dict__]
    try:
        copied = copy.deepcopy(model)
    finally:
        for module, weight in held:
            module.weight = weight
    for module in copied.modules():
        if hasattr(module, "weight_mask"):
            module.weight = module.weight_orig * module.weight_mask
    return copied


def sparsity(model: nn.Module) -> float:
    """Fraction of zeros in the Linear and Conv weights."""
    total = zeros = 0
    for module in model.modules():
        if isinstance(module, _PRUNABLE):
            w = module.weight.detach()
            if w.layout != torch.strided or w.is_sparse:
                continue
            total += w.numel()
            zeros += int((w == 0).sum())
    return zeros / total if total else 0.0


def options(hw: Hardware, model: nn.Module, example: Inputs,
            keep: tuple[str, ...] = ()) -> tuple[list[str], list[Exclusion]]:
    """Kinds this model and device can use; structured and 2:4 are tried on a copy first."""
    offered, excluded = ["none"], []
    for kind in ("unstructured", "structured"):
        reason = _probe(model, PruningConfig(kind, PROBE_RATIO), example, keep)
        if reason:
            excluded.append(Exclusion(KNOB, kind, reason))
        else:
            offered.append(kind)
    if hw.device != "cuda" or (hw.capability or (0, 0)) < (8, 0):
        excluded.append(Exclusion(KNOB, "2:4", "2:4 sparsity is fast only on sparse tensor cores "
                                               "(CUDA compute capability 8.0+)"))
    else:
        reason = _probe(model, PruningConfig("2:4"), example, keep)
        if reason:
            excluded.append(Exclusion(KNOB, "2:4", reason))
        else:
            offered.append("2:4")
    return offered, excluded


def alloc_options(hw: Hardware, model: nn.Module, example: Inputs,
                  keep: tuple[str, ...] = ()) -> tuple[tuple[str, ...], list[Exclusion]]:
    """How a structured ratio may be spread: by sensitivity where structured pruning is
    offered and the model has two or more units to spread it over."""
    if _probe(model, PruningConfig("structured", PROBE_RATIO), example, keep):
        return ("uniform",), []
    count = len(units(copy.deepcopy(model).cpu(), example, keep))
    if count < 2:
        return ("uniform",), [Exclusion("prune_alloc", "sensitivity", f"spreading a pruning ratio by "
                                        f"sensitivity needs two or more prunable units; the model has {count}")]
    return ALLOCS, []


def _probe(model: nn.Module, config: PruningConfig, example: Inputs, keep: tuple[str, ...]) -> str:
    """Why ``config`` cannot prune ``model`` ("" when it can), found on a CPU copy."""
    try:
        with warnings.catch_warnings():
            # Torch-Pruning's notes on the model (unwrapped parameters...) belong in a trial's
            # log, not on the terminal when a study opens.
            warnings.filterwarnings("ignore", module="torch_pruning")
            apply(copy.deepcopy(model).cpu(), config, example, keep)
    except PruningFailed as exc:
        return str(exc)
    return ""
