"""The search space: the knobs, their values on this hardware, and what was left out and why.

A trial's configuration is a :class:`Knobs`; :class:`Space` turns an Optuna trial into one.
The space is hardware- and model-aware: each technique module says which of its values this
device and model can run well, and the exclusions are stored with the study.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import optuna
from torch import nn

from advisor.errors import AdvisorError
from advisor.hardware import Hardware
from advisor.techniques import (
    ANY,
    Exclusion,
    accumulation,
    batching,
    checkpointing,
    compile,
    distillation,
    precision,
    pruning,
    quantization,
)
from advisor.techniques.accumulation import AccumulationConfig
from advisor.techniques.batching import BatchingConfig, Lengths
from advisor.techniques.checkpointing import CheckpointConfig
from advisor.techniques.compile import CompileConfig
from advisor.techniques.distillation import DistillationConfig
from advisor.techniques.precision import PrecisionConfig
from advisor.techniques.pruning import PruningConfig
from advisor.techniques.quantization import QuantizationConfig
from advisor.workload import Inputs

DEFAULT_LR = 1e-3
STEP = 0.1
PRUNE_RATIO = (0.1, pruning.MAX_RATIO)
RATIO_KINDS = ("unstructured", "structured")
ALPHA = (0.0, 1.0)
TEMPERATURE = (1.0, distillation.MAX_TEMPERATURE)


@dataclass(frozen=True)
class Knobs:
    """One point of the search space: the techniques a trial applies."""

    precision: str = "fp32"
    accumulation: int = 1
    checkpoint_every: int = 0
    compile: str = "none"
    lr: float = DEFAULT_LR
    prune_kind: str = "none"
    prune_ratio: float = 0.0  # ignored by "none" and "2:4" (which is always half the weights)
    quantization: str = "none"
    distill_alpha: float = 0.0
    distill_temperature: float = 4.0  # ignored while distill_alpha is 0
    max_tokens: int = 0  # 0: fixed-size batches; else token-budget micro-batches (batching.py)

    def __post_init__(self) -> None:
        # Each technique's config validates its own value and names the known ones.
        PrecisionConfig(self.precision)
        AccumulationConfig(self.accumulation)
        CheckpointConfig(self.checkpoint_every)
        CompileConfig(self.compile)
        PruningConfig(self.prune_kind, self.prune_ratio)
        QuantizationConfig(self.quantization)
        DistillationConfig(self.distill_alpha, self.distill_temperature)
        if BatchingConfig(self.max_tokens).enabled and self.accumulation != 1:
            raise ValueError("max_tokens > 0 splits each step into micro-batches by tokens: it "
                             "takes accumulation 1")
        if not (isinstance(self.lr, float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive float; got {self.lr!r}")
        if self.quantization == "qat-int8" and (self.precision != "fp32" or self.checkpoint_every):
            raise ValueError("qat-int8 fine-tunes a traced fp32 graph with fake quantization: it "
                             "takes precision fp32 and checkpoint_every 0")

    @classmethod
    def from_dict(cls, values: dict) -> Knobs:
        known = {f.name for f in fields(cls)}
        extra = sorted(set(values) - known)
        if extra:
            raise ValueError(f"unknown knobs {extra}; the known ones are {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        ckpt = "off" if self.checkpoint_every == 0 else f"1/{self.checkpoint_every}"
        return (f"{self.precision} accum={self.accumulation} ckpt={ckpt} "
                f"compile={self.compile} lr={self.lr:.2g} prune={self.prune_label()} "
                f"quant={self.quantization} kd={self.distill_label()}"
                + (f" tokens={self.max_tokens}" if self.max_tokens else ""))

    def prune_label(self) -> str:
        if self.prune_kind in ("none", "2:4"):
            return self.prune_kind
        return f"{self.prune_kind}:{self.prune_ratio:g}"

    def distill_label(self) -> str:
        if self.distill_alpha == 0:
            return "off"
        return f"T{self.distill_temperature:g}/a{self.distill_alpha:g}"


@dataclass(frozen=True)
class Space:
    precision: tuple[str, ...]
    accumulation: tuple[int, ...]
    checkpoint_every: tuple[int, ...]
    compile: tuple[str, ...]
    lr: tuple[float, float]
    prune_kind: tuple[str, ...]
    quantization: tuple[str, ...]
    excluded: tuple[Exclusion, ...]
    blocks: str
    max_tokens: tuple[int, ...] = (0,)  # more than (0,) only for a variable-length workload

    def suggest(self, trial: optuna.Trial) -> Knobs:
        """A trial's knobs. Some are conditional: a knob that cannot matter is not sampled
        (the ratio of "none", the temperature of alpha 0) and qat-int8 fixes fp32 without
        checkpointing, so the sampler never spends trials telling equal configs apart."""
        quant = trial.suggest_categorical("quantization", self.quantization)
        kind = trial.suggest_categorical("prune_kind", self.prune_kind)
        # Asked only where budgets are offered, so other studies sample what they always did;
        # a budget replaces accumulation.
        tokens = trial.suggest_categorical("max_tokens", self.max_tokens) if len(self.max_tokens) > 1 else 0
        values = {
            "quantization": quant, "prune_kind": kind, "max_tokens": tokens,
            "accumulation": trial.suggest_categorical("accumulation", self.accumulation) if not tokens else 1,
            "compile": trial.suggest_categorical("compile", self.compile),
            "lr": trial.suggest_float("lr", *self.lr, log=True),
            "distill_alpha": trial.suggest_float("distill_alpha", *ALPHA, step=STEP),
        }
        if kind in RATIO_KINDS:
            values["prune_ratio"] = trial.suggest_float("prune_ratio", *PRUNE_RATIO, step=STEP)
        if values["distill_alpha"] > 0:
            values["distill_temperature"] = trial.suggest_float("distill_temperature", *TEMPERATURE,
                                                                step=0.5)
        if quant != "qat-int8":
            values["precision"] = trial.suggest_categorical("precision", self.precision)
            values["checkpoint_every"] = trial.suggest_categorical("checkpoint_every",
                                                                   self.checkpoint_every)
        return Knobs(**values)

    def check_values(self, values: dict) -> dict:
        """Knob values a user asks to try, checked against this space."""
        names = [f.name for f in fields(Knobs)]
        ranges = {"lr": self.lr, "prune_ratio": (0.0, PRUNE_RATIO[1]), "distill_alpha": ALPHA,
                  "distill_temperature": TEMPERATURE}
        for name, value in values.items():
            if name not in names:
                raise AdvisorError(f"unknown knob {name!r}; the knobs are {', '.join(names)}")
            if name in ranges:
                low, high = ranges[name]
                if isinstance(value, bool) or not (isinstance(value, (int, float)) and low <= value <= high):
                    raise AdvisorError(f"{name} must be between {low:g} and {high:g}; got {value!r}")
            elif value not in getattr(self, name):
                reasons = [e.reason for e in self.excluded if e.knob == name and e.value in (value, ANY)]
                why = f" ({reasons[0]})" if reasons else ""
                raise AdvisorError(
                    f"{name} must be one of {list(getattr(self, name))} here; got {value!r}{why}")
        try:
            Knobs(**{k: float(v) if k in ranges else v for k, v in values.items()})
        except ValueError as exc:
            raise AdvisorError(str(exc)) from None
        return dict(values)

    def to_dict(self) -> dict:
        return {
            "precision": list(self.precision),
            "accumulation": list(self.accumulation),
            "checkpoint_every": list(self.checkpoint_every),
            "compile": list(self.compile),
            "lr": list(self.lr),
            "prune_kind": list(self.prune_kind),
            "prune_ratio": list(PRUNE_RATIO),
            "quantization": list(self.quantization),
            "distill_alpha": list(ALPHA),
            "distill_temperature": list(TEMPERATURE),
            "blocks": self.blocks,
            "excluded": [e.to_dict() for e in self.excluded],
            **({"max_tokens": list(self.max_tokens)} if len(self.max_tokens) > 1 else {}),
        }


def same_search(stored: dict | None, current: dict) -> bool:
    """Whether a study recorded over the space ``stored`` may go on over ``current``.

    The ``max_tokens`` exclusions follow from the workload's data, which the study checks
    apart: a study recorded before the knob existed has none and resumes.
    """
    def without(space: dict | None) -> dict | None:
        if space is None:
            return None
        kept = [e for e in space.get("excluded", []) if e.get("knob") != batching.KNOB]
        return {**space, "excluded": kept}

    return without(stored) == without(current)


def build(hw: Hardware, model: nn.Module, batch_size: int, example: Inputs, *,
          lr: float = DEFAULT_LR, keep: tuple[str, ...] = (), lengths: Lengths | None = None) -> Space:
    """The space this hardware and model can run well, with what it left out and why.

    ``example`` is a small batch of inputs: pruning and PT2E capture are tried on copies
    of the model with it, so a kind or mode the model cannot take is never sampled.
    ``lengths`` (a variable-length workload's) sizes the token budgets offered.
    """
    prec, ex_prec = precision.options(hw)
    acc, ex_acc = accumulation.options(batch_size)
    ckpt, ex_ckpt = checkpointing.options(model)
    comp, ex_comp = compile.options(hw)
    kinds, ex_prune = pruning.options(hw, model, example, keep)
    quant, ex_quant = quantization.options(hw, model, example)
    tokens, ex_tokens = batching.options(batch_size, lengths, model, example)
    path, blocks = checkpointing.find_blocks(model)
    return Space(
        precision=tuple(prec),
        accumulation=tuple(acc),
        checkpoint_every=tuple(ckpt),
        compile=tuple(comp),
        lr=(lr / 10, lr * 3),
        prune_kind=tuple(kinds),
        quantization=tuple(quant),
        excluded=tuple(ex_prec + ex_acc + ex_ckpt + ex_comp + ex_prune + ex_quant + ex_tokens),
        blocks=f"{path}: {len(blocks)} blocks" if blocks else "none",
        max_tokens=tuple(tokens),
    )
