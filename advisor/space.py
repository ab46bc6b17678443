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
# Serving knobs, offered when a study measures under a request rate (advisor/serving.py).
SERVING_MAX_BATCH = (1, 2, 4, 8, 16, 32, 64)
SERVING_MAX_WAIT_MS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0)


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
    # The dynamic batcher of a serving study; 0 = the study measures no serving load.
    serving_max_batch: int = 0
    serving_max_wait_ms: float = 0.0

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
        if isinstance(self.serving_max_batch, bool) or not isinstance(self.serving_max_batch, int) \
                or self.serving_max_batch < 0:
            raise ValueError(f"serving_max_batch must be an integer >= 0; got {self.serving_max_batch!r}")
        if isinstance(self.serving_max_wait_ms, bool) or not isinstance(self.serving_max_wait_ms, (int, float)) \
                or not 0 <= self.serving_max_wait_ms < math.inf:
            raise ValueError(f"serving_max_wait_ms must be a number >= 0; got {self.serving_max_wait_ms!r}")
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
                + (f" tokens={self.max_tokens}" if self.max_tokens else "")
                + (f" serve={self.serving_label()}" if self.serving_max_batch else ""))

    def serving_label(self) -> str:
        if not self.serving_max_batch:
            return "off"
        return f"b{self.serving_max_batch}/w{self.serving_max_wait_ms:g}ms"

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
    # (low, high, step) of the stepped float knobs; a benchmark narrows them to a grid.
    prune_ratio: tuple[float, float, float] = (*PRUNE_RATIO, STEP)
    distill_alpha: tuple[float, float, float] = (*ALPHA, STEP)
    distill_temperature: tuple[float, float, float] = (*TEMPERATURE, 0.5)
    # Empty unless the study measures under a request rate.
    serving_max_batch: tuple[int, ...] = ()
    serving_max_wait_ms: tuple[float, ...] = ()

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
            "distill_alpha": _stepped(trial, "distill_alpha", self.distill_alpha),
        }
        if kind in RATIO_KINDS:
            values["prune_ratio"] = _stepped(trial, "prune_ratio", self.prune_ratio)
        if values["distill_alpha"] > 0:
            values["distill_temperature"] = _stepped(trial, "distill_temperature",
                                                     self.distill_temperature)
        if quant != "qat-int8":
            values["precision"] = trial.suggest_categorical("precision", self.precision)
            values["checkpoint_every"] = trial.suggest_categorical("checkpoint_every",
                                                                   self.checkpoint_every)
        if self.serving_max_batch:
            batch = trial.suggest_categorical("serving_max_batch", self.serving_max_batch)
            values["serving_max_batch"] = batch
            # A batch of one never waits for company: the wait cannot matter.
            values["serving_max_wait_ms"] = (
                trial.suggest_categorical("serving_max_wait_ms", self.serving_max_wait_ms)
                if batch > 1 else 0.0)
        return Knobs(**values)

    def grid(self) -> list[Knobs]:
        """Every configuration ``suggest`` can return, for a finite space (``lr`` fixed, as
        ``(lr, lr)``): a depth-first walk over ``suggest``'s own choices, so the grid and
        the sampled space cannot drift apart."""
        if self.lr[0] != self.lr[1]:
            raise ValueError("grid() needs a fixed lr: build the space with lr=(x, x)")
        found, pending = [], [()]
        while pending:
            walk = _Walk(pending.pop())
            found.append(self.suggest(walk))
            # Each decision past the forced prefix opens its other branches.
            for depth in range(len(walk.forced), len(walk.taken)):
                for other in range(1, walk.widths[depth]):
                    pending.append((*tuple(walk.taken[:depth]), other))
        return found

    def check_values(self, values: dict) -> dict:
        """Knob values a user asks to try, checked against this space."""
        names = [f.name for f in fields(Knobs)]
        ranges = {"lr": self.lr, "prune_ratio": (0.0, PRUNE_RATIO[1]), "distill_alpha": ALPHA,
                  "distill_temperature": TEMPERATURE}
        checked = dict(values)
        if not self.serving_max_batch:
            for name in ("serving_max_batch", "serving_max_wait_ms"):
                if checked.get(name):
                    raise AdvisorError(f"{name} is a knob of serving studies only: add "
                                       f"--serving-rate REQUESTS_PER_S to search it")
                checked.pop(name, None)  # the default, 0, is what every plain trial has
        for name, value in checked.items():
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
            "prune_ratio": list(self.prune_ratio[:2]),
            "quantization": list(self.quantization),
            "distill_alpha": list(self.distill_alpha[:2]),
            "distill_temperature": list(self.distill_temperature[:2]),
            "blocks": self.blocks,
            "excluded": [e.to_dict() for e in self.excluded],
            # Only spaces that offer these carry them, so spaces stored before them compare equal.
            **({"max_tokens": list(self.max_tokens)} if len(self.max_tokens) > 1 else {}),
            **({"serving_max_batch": list(self.serving_max_batch),
                "serving_max_wait_ms": list(self.serving_max_wait_ms)} if self.serving_max_batch else {}),
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


def baseline(lr: float, serving: bool = False) -> Knobs:
    """The reference every trial is compared with: fp32 eager, nothing applied; under a
    serving load, a server that runs each request alone (no dynamic batching)."""
    return Knobs(lr=lr, serving_max_batch=1 if serving else 0)


def _stepped(trial: optuna.Trial, name: str, bounds: tuple[float, float, float]) -> float:
    low, high, step = bounds
    return trial.suggest_float(name, low, high, step=step)


class _Walk:
    """A stand-in trial for ``Space.grid``: takes the ``forced`` choice indices, then the
    first choice of every later decision, recording how many choices each one had."""

    def __init__(self, forced: tuple[int, ...]) -> None:
        self.forced, self.taken, self.widths = forced, [], []

    def _pick(self, choices: list) -> object:
        depth = len(self.taken)
        index = self.forced[depth] if depth < len(self.forced) else 0
        self.taken.append(index)
        self.widths.append(len(choices))
        return choices[index]

    def suggest_categorical(self, name: str, choices: tuple) -> object:
        return self._pick(list(choices))

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        if step is None:
            if low != high:
                raise ValueError(f"{name} is continuous: give it a step or a fixed value")
            return self._pick([low])
        count = round((high - low) / step) + 1
        return self._pick([round(low + i * step, 10) for i in range(count)])


def build(hw: Hardware, model: nn.Module, batch_size: int, example: Inputs, *,
          lr: float = DEFAULT_LR, keep: tuple[str, ...] = (), lengths: Lengths | None = None,
          serving: bool = False) -> Space:
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
        serving_max_batch=SERVING_MAX_BATCH if serving else (),
        serving_max_wait_ms=SERVING_MAX_WAIT_MS if serving else (),
    )
