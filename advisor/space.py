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
from advisor.techniques import Exclusion, accumulation, checkpointing, compile, precision
from advisor.techniques.accumulation import AccumulationConfig
from advisor.techniques.checkpointing import CheckpointConfig
from advisor.techniques.compile import CompileConfig
from advisor.techniques.precision import PrecisionConfig

DEFAULT_LR = 1e-3


@dataclass(frozen=True)
class Knobs:
    """One point of the search space: the techniques a trial applies."""

    precision: str = "fp32"
    accumulation: int = 1
    checkpoint_every: int = 0
    compile: str = "none"
    lr: float = DEFAULT_LR

    def __post_init__(self) -> None:
        # Each technique's config validates its own value and names the known ones.
        PrecisionConfig(self.precision)
        AccumulationConfig(self.accumulation)
        CheckpointConfig(self.checkpoint_every)
        CompileConfig(self.compile)
        if not (isinstance(self.lr, float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive float; got {self.lr!r}")

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
                f"compile={self.compile} lr={self.lr:.2g}")


@dataclass(frozen=True)
class Space:
    precision: tuple[str, ...]
    accumulation: tuple[int, ...]
    checkpoint_every: tuple[int, ...]
    compile: tuple[str, ...]
    lr: tuple[float, float]
    excluded: tuple[Exclusion, ...]
    blocks: str

    def suggest(self, trial: optuna.Trial) -> Knobs:
        return Knobs(
            precision=trial.suggest_categorical("precision", self.precision),
            accumulation=trial.suggest_categorical("accumulation", self.accumulation),
            checkpoint_every=trial.suggest_categorical("checkpoint_every", self.checkpoint_every),
            compile=trial.suggest_categorical("compile", self.compile),
            lr=trial.suggest_float("lr", *self.lr, log=True),
        )

    def check_values(self, values: dict) -> dict:
        """Knob values a user asks to try, checked against this space."""
        names = [f.name for f in fields(Knobs)]
        for name, value in values.items():
            if name not in names:
                raise AdvisorError(f"unknown knob {name!r}; the knobs are {', '.join(names)}")
            if name == "lr":
                low, high = self.lr
                if not (isinstance(value, (int, float)) and low <= value <= high):
                    raise AdvisorError(f"lr must be between {low:g} and {high:g}; got {value!r}")
            elif value not in getattr(self, name):
                reasons = [e.reason for e in self.excluded if e.knob == name and e.value == value]
                why = f" ({reasons[0]})" if reasons else ""
                raise AdvisorError(
                    f"{name} must be one of {list(getattr(self, name))} here; got {value!r}{why}")
        return dict(values)

    def to_dict(self) -> dict:
        return {
            "precision": list(self.precision),
            "accumulation": list(self.accumulation),
            "checkpoint_every": list(self.checkpoint_every),
            "compile": list(self.compile),
            "lr": list(self.lr),
            "blocks": self.blocks,
            "excluded": [e.to_dict() for e in self.excluded],
        }


def build(hw: Hardware, model: nn.Module, batch_size: int, lr: float = DEFAULT_LR) -> Space:
    """The space this hardware and model can run well, with what it left out and why."""
    prec, ex_prec = precision.options(hw)
    acc, ex_acc = accumulation.options(batch_size)
    ckpt, ex_ckpt = checkpointing.options(model)
    comp, ex_comp = compile.options(hw)
    path, blocks = checkpointing.find_blocks(model)
    return Space(
        precision=tuple(prec),
        accumulation=tuple(acc),
        checkpoint_every=tuple(ckpt),
        compile=tuple(comp),
        lr=(lr / 10, lr * 3),
        excluded=tuple(ex_prec + ex_acc + ex_ckpt + ex_comp),
        blocks=f"{path}: {len(blocks)} blocks" if blocks else "none",
    )
