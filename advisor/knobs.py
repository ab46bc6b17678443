"""The knobs table: the one source of truth for what a trial can change.

Each :class:`Knob` row names a field of one technique's config (``techniques/``), how a study
samples it, which values this hardware and model can run (the technique's ``options``), when
it matters, and how it is shown. ``Space`` (sampling, validation, the stored space), the
terminal columns, the dashboard, export and apply all read ``KNOBS``; a trial's
:class:`Knobs` builds each technique's config once, and the trial passes those down.

Adding a knob to a technique: give its config the field, add a row here. Knobs added after
the first release (``original=False``) are sampled, stored with a study's space and
required in exported files only where the space offers more than their default, so older
studies resume and older files load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from advisor.hardware import Hardware
from advisor.techniques import (
    accumulation,
    batcher,
    batching,
    checkpointing,
    compile,
    distillation,
    precision,
    pruning,
    quantization,
    schedule,
)
from advisor.techniques.accumulation import AccumulationConfig
from advisor.techniques.batcher import BatcherConfig
from advisor.techniques.batching import BatchingConfig, Lengths
from advisor.techniques.checkpointing import CheckpointConfig
from advisor.techniques.compile import CompileConfig
from advisor.techniques.distillation import DistillationConfig
from advisor.techniques.precision import PrecisionConfig
from advisor.techniques.pruning import PruningConfig
from advisor.techniques.quantization import QuantizationConfig
from advisor.techniques.schedule import ScheduleConfig
from advisor.workload import Inputs

C = TypeVar("C")


@dataclass(frozen=True)
class Probe:
    """What the techniques' ``options`` look at to say which values this setup runs well."""

    hw: Hardware
    model: nn.Module
    batch_size: int
    example: Inputs  # a few inputs: pruning and PT2E capture are tried on copies with them
    lr: float = schedule.DEFAULT_LR
    keep: tuple[str, ...] = ()
    lengths: Lengths | None = None
    serving: bool = False


@dataclass(frozen=True)
class Knob:
    """One row of the table."""

    name: str  # the Optuna parameter, the exported key, the ``Knobs`` attribute
    config: type  # the technique config it sets a field of
    field: str  # that field
    type: type  # str, int or float: what an exported file holds
    default: Any
    offer: Callable[[Probe], tuple[Any, Any]]  # (values, exclusions) the space offers here
    sample: str = "choice"  # "choice" among values, or a float range: "log" (low, high), "step" (low, high, step)
    when: Callable[[Mapping[str, Any]], bool] | None = None  # asked only when it can matter
    column: str = ""  # its terminal column ("": shown in another knob's cell, or nowhere)
    cell: Callable[[Knobs], str] | None = None  # that column's text (default: the value)
    text: Callable[[Knobs], str] | None = None  # its part of ``Knobs.describe()`` ("" : none)
    limits: tuple[float, float] | None = None  # a float a user gives must lie here (None: the space's range)
    original: bool = True  # see the module docstring
    needs: str = ""  # where the space offers no value: "{name} is {needs}", what a user does


_SERVING_ONLY = "a knob of serving studies only: add --serving-rate REQUESTS_PER_S to search it"


def _not_qat(values: Mapping[str, Any]) -> bool:
    return not QuantizationConfig(values["quantization"]).qat


def _prune_cell(k: Knobs) -> str:
    ratio = k.prune_ratio
    guided = " by-layer" if k.prune_alloc == "sensitivity" else ""
    if k.prune_kind in pruning.RATIO_KINDS and ratio:
        return f"{k.prune_kind} {ratio:g}{guided}"
    return str(k.prune_kind)


KNOBS: tuple[Knob, ...] = (
    Knob("precision", PrecisionConfig, "dtype", str, "fp32", lambda p: precision.options(p.hw),
         when=_not_qat, column="precision", text=lambda k: k.precision),
    Knob("accumulation", AccumulationConfig, "steps", int, 1, lambda p: accumulation.options(p.batch_size),
         when=lambda v: not v["max_tokens"],  # a token budget replaces accumulation
         column="accum", text=lambda k: f"accum={k.accumulation}"),
    Knob("checkpoint_every", CheckpointConfig, "every", int, 0, lambda p: checkpointing.options(p.model),
         when=_not_qat, column="ckpt", cell=lambda k: k.config(CheckpointConfig).label(),
         text=lambda k: f"ckpt={k.config(CheckpointConfig).label()}"),
    Knob("compile", CompileConfig, "mode", str, "none", lambda p: compile.options(p.hw),
         column="compile", text=lambda k: f"compile={k.compile}"),
    Knob("lr", ScheduleConfig, "lr", float, schedule.DEFAULT_LR, lambda p: schedule.options(p.lr),
         sample="log", column="lr", cell=lambda k: f"{float(k.lr):.2g}", text=lambda k: f"lr={k.lr:.2g}"),
    Knob("prune_kind", PruningConfig, "kind", str, "none",
         lambda p: pruning.options(p.hw, p.model, p.example, p.keep),
         column="prune", cell=_prune_cell, text=lambda k: f"prune={k.config(PruningConfig).label()}"),
    Knob("prune_ratio", PruningConfig, "ratio", float, 0.0, lambda p: (pruning.RATIO_RANGE, []),
         sample="step", when=lambda v: v["prune_kind"] in pruning.RATIO_KINDS,
         limits=(0.0, pruning.MAX_RATIO)),
    Knob("prune_alloc", PruningConfig, "alloc", str, "uniform",
         lambda p: pruning.alloc_options(p.hw, p.model, p.example, p.keep),
         when=lambda v: v["prune_kind"] == "structured", original=False,
         text=lambda k: "prune_alloc=sensitivity" if k.prune_alloc == "sensitivity" else "",
         needs="not offered: structured pruning is not offered for this model"),
    Knob("quantization", QuantizationConfig, "mode", str, "none",
         lambda p: quantization.options(p.hw, p.model, p.example, p.lengths is not None),
         column="quant", cell=lambda k: k.quantization + (f" p{k.quant_protect:g}" if k.quant_protect else ""),
         text=lambda k: f"quant={k.quantization}"),
    Knob("quant_protect", QuantizationConfig, "protect", float, 0.0,
         lambda p: quantization.protect_options(p.model), sample="step",
         when=lambda v: v["quantization"] in quantization.PER_LAYER, limits=(0.0, quantization.MAX_PROTECT),
         original=False, text=lambda k: f"protect={k.quant_protect:g}" if k.quant_protect else "",
         needs="not offered: the model has fewer than two layers the quantization modes quantize"),
    Knob("distill_alpha", DistillationConfig, "alpha", float, 0.0, lambda p: (distillation.ALPHA_RANGE, []),
         sample="step", limits=(0.0, 1.0), column="kd",
         cell=lambda k: k.config(DistillationConfig).label(" "),
         text=lambda k: f"kd={k.config(DistillationConfig).label('/')}"),
    Knob("distill_temperature", DistillationConfig, "temperature", float, 4.0,
         lambda p: (distillation.TEMPERATURE_RANGE, []), sample="step",
         when=lambda v: v["distill_alpha"] > 0, limits=(1.0, distillation.MAX_TEMPERATURE)),
    Knob("max_tokens", BatchingConfig, "max_tokens", int, 0,
         lambda p: batching.options(p.batch_size, p.lengths, p.model, p.example), original=False,
         column="tokens", cell=lambda k: str(k.max_tokens) if k.max_tokens else "fixed",
         text=lambda k: f"tokens={k.max_tokens}" if k.max_tokens else ""),
    Knob("serving_max_batch", BatcherConfig, "max_batch", int, 0,
         lambda p: (batcher.options(p.serving)[0], []), original=False,
         needs=_SERVING_ONLY, column="serve",
         cell=lambda k: k.config(BatcherConfig).label().replace("/", " "),
         text=lambda k: f"serve={k.config(BatcherConfig).label()}" if k.serving_max_batch else ""),
    Knob("serving_max_wait_ms", BatcherConfig, "max_wait_ms", float, 0.0,
         lambda p: (batcher.options(p.serving)[1], []), original=False,
         when=lambda v: v["serving_max_batch"] > 1,  # a batch of one never waits for company
         needs=_SERVING_ONLY),
)

# The order a study asks for them (kept, so a seeded sampler draws what it always drew);
# a knob not listed is asked after these, in table order.
ASK_ORDER = ("quantization", "prune_kind", "max_tokens", "accumulation", "compile", "lr",
             "distill_alpha", "prune_ratio", "distill_temperature", "precision", "checkpoint_every",
             "serving_max_batch", "serving_max_wait_ms")

# Knobs that refine another knob's choice (which layers it spares): a configuration to try
# that does not name them keeps their default, so ``--try quantization=int8-static`` tries
# whole-model int8, not a sampled refinement of it.
REFINING = ("quant_protect", "prune_alloc")

# Knobs that decide the model a trial deploys (``trial/compress.py``'s ``deployable``: what is
# pruned, how it is quantized and compiled, under which autocast, and in a serving study how
# requests are batched); the others change only how it is fine-tuned. Two trials with the same
# values of these deploy the same program with other weights, whose values change neither a
# kernel's time nor the weights' bytes (``trial/compress.py``'s ``structure``).
DEPLOYED = ("precision", "compile", "prune_kind", "prune_ratio", "prune_alloc", "quantization",
            "quant_protect", "serving_max_batch", "serving_max_wait_ms")
TRAINING_ONLY = ("accumulation", "checkpoint_every", "lr", "distill_alpha", "distill_temperature", "max_tokens")

# Rules between techniques: each raises ValueError for values that cannot go together.
RULES: tuple[Callable[[Mapping[str, Any]], None], ...] = (batching.check_knobs, quantization.check_knobs)


def table() -> tuple[Knob, ...]:
    return KNOBS


def row(name: str) -> Knob:
    for knob in KNOBS:
        if knob.name == name:
            return knob
    raise KeyError(name)


def names() -> tuple[str, ...]:
    return tuple(k.name for k in KNOBS)


def ask_order() -> Iterator[Knob]:
    listed = [row(n) for n in ASK_ORDER if n in names()]
    return iter(listed + [k for k in KNOBS if k.name not in ASK_ORDER])


class Knobs:
    """One point of the search space: a value per knob, and the technique configs they build.

    ``Knobs(quantization="int8-static")`` takes the defaults for the rest; each technique's
    config validates its own values (naming the known ones), then the table's rules check
    the combination. ``knobs.quantization`` is the value, ``knobs.config(QuantizationConfig)``
    the config a trial applies.
    """

    __slots__ = ("_configs", "_values")

    def __init__(self, **values: Any) -> None:
        extra = [name for name in values if name not in names()]
        if extra:
            raise TypeError(f"unknown knobs {extra}; the known ones are {sorted(names())}")
        full = {k.name: values.get(k.name, k.default) for k in KNOBS}
        configs: dict[type, Any] = {}
        for cls in dict.fromkeys(k.config for k in KNOBS):
            configs[cls] = cls(**{k.field: full[k.name] for k in KNOBS if k.config is cls})
        for rule in RULES:
            rule(full)
        object.__setattr__(self, "_values", full)
        object.__setattr__(self, "_configs", configs)

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(f"Knobs has no knob {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Knobs are immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Knobs) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(self._values.items()))

    def __repr__(self) -> str:
        return "Knobs(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"

    def __reduce__(self):
        return (_rebuild, (self._values,))

    def config(self, cls: type[C]) -> C:
        """The config of one technique (of class ``cls`` or a subclass), built from these knobs."""
        found = self._configs.get(cls)
        if found is None:
            found = next((c for c in self._configs.values() if isinstance(c, cls)), None)
        if found is None:
            raise KeyError(f"no knob builds a {cls.__name__}")
        return found

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Knobs:
        extra = sorted(set(values) - set(names()))
        if extra:
            raise ValueError(f"unknown knobs {extra}; the known ones are {sorted(names())}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dict(self._values)

    def describe(self) -> str:
        return " ".join(part for k in KNOBS if k.text and (part := k.text(self)))


def _rebuild(values: dict) -> Knobs:
    return Knobs(**values)


def columns(stored_space: Mapping | None) -> tuple[Knob, ...]:
    """The knobs with a terminal column in a study over ``stored_space`` (its ``to_dict``):
    every original one, and the later ones its space offers."""
    stored = stored_space or {}
    return tuple(k for k in KNOBS if k.column and (k.original or stored.get(k.name)))


def cell(knob: Knob, knobs: Knobs) -> str:
    return knob.cell(knobs) if knob.cell else str(getattr(knobs, knob.name))


def baseline(lr: float, serving: bool = False) -> Knobs:
    """The reference every trial is compared with: fp32 eager, nothing applied; under a
    serving load, a server that runs each request alone (no dynamic batching). ``lr`` may be
    an integer (``advisor.run(lr=1)``): settings take any number."""
    return Knobs(lr=float(lr), serving_max_batch=1 if serving else 0)

