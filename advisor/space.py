"""The search space: each knob's values on this hardware, and what was left out and why.

``build`` asks each knob of the table (``advisor/knobs.py``) what this device and model can
run; :class:`Space` turns an Optuna trial into :class:`~advisor.knobs.Knobs`, checks values a
user asks to try, and is stored with the study (``to_dict``) so a resumed run can tell it
searches the same space.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from torch import nn

from advisor import knobs as table
from advisor.errors import AdvisorError
from advisor.hardware import Hardware
from advisor.knobs import Knob, Knobs, Probe
from advisor.techniques import ANY, Exclusion, batching, checkpointing
from advisor.techniques.batching import Lengths
from advisor.techniques.schedule import DEFAULT_LR
from advisor.trial.cache import StudyCache
from advisor.trial.spec import Settings
from advisor.workload import Inputs, Workload


@dataclass(frozen=True)
class Space:
    """Per knob, its choices, or for a float knob its range: ``(low, high)`` (log-uniform)
    or ``(low, high, step)``. ``space.quantization`` reads one knob's values."""

    values: Mapping[str, tuple]
    excluded: tuple[Exclusion, ...]
    blocks: str

    def __post_init__(self) -> None:
        # A knob added after the first release and not given is not offered here.
        missing = [k.name for k in table.table() if k.original and k.name not in self.values]
        if missing:
            raise ValueError(f"a space needs values for the knobs {missing}")
        full = {k.name: tuple(self.values.get(k.name, ())) for k in table.table()}
        object.__setattr__(self, "values", full)

    def __getattr__(self, name: str) -> tuple:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"Space has no attribute {name!r}")

    def offers(self, knob: Knob) -> bool:
        """Whether a study over this space asks for ``knob`` at all: an original knob always
        (even with one choice), a later one only where more than its default is offered."""
        values = tuple(self.values.get(knob.name, ()))
        return knob.original or values not in ((), (knob.default,))

    def narrowed(self, **values: tuple) -> Space:
        """This space with some knobs' values replaced (a benchmark's reduced grid)."""
        return Space({**self.values, **values}, self.excluded, self.blocks)

    def as_stored(self, stored: Mapping | None) -> Space:
        """This space without the later knobs a study's ``stored`` space (its ``to_dict``)
        does not search: a study begun before a knob existed resumes without it."""
        if stored is None:
            return self
        later = {k.name: () for k in table.table() if not k.original and k.name not in stored}
        return self.narrowed(**later) if later else self

    def suggest(self, trial: optuna.Trial) -> Knobs:
        """A trial's knobs. Some are conditional: a knob that cannot matter is not sampled
        (the ratio of "none", the temperature of alpha 0) and qat-int8 fixes fp32 without
        checkpointing, so the sampler never spends trials telling equal configs apart."""
        chosen: dict[str, Any] = {}
        for knob in table.ask_order():
            if not self.offers(knob) or (knob.when is not None and not knob.when(chosen)):
                chosen[knob.name] = knob.default
                continue
            values = self.values[knob.name]
            if knob.sample == "choice":
                chosen[knob.name] = trial.suggest_categorical(knob.name, values)
            elif knob.sample == "log":
                chosen[knob.name] = trial.suggest_float(knob.name, *values, log=True)
            else:
                low, high, step = values
                chosen[knob.name] = trial.suggest_float(knob.name, low, high, step=step)
        return Knobs(**chosen)

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
        """Knob values a user asks to try, checked against this space; the refining knobs
        (``knobs.REFINING``) they leave out are set to their defaults."""
        for name, value in values.items():
            if name not in table.names():
                raise AdvisorError(f"unknown knob {name!r}; the knobs are {', '.join(table.names())}")
            knob = table.row(name)
            if not self.values[name]:
                if value:  # not searched here: the default, which every other trial has, is fine
                    raise AdvisorError(f"{name} is {knob.needs or 'not searched in this study'}")
                continue
            if knob.sample != "choice":
                low, high = knob.limits or self.values[name][:2]
                if isinstance(value, bool) or not (isinstance(value, (int, float)) and low <= value <= high):
                    raise AdvisorError(f"{name} must be between {low:g} and {high:g}; got {value!r}")
            elif value not in self.values[name]:
                reasons = [e.reason for e in self.excluded if e.knob == name and e.value in (value, ANY)]
                why = f" ({reasons[0]})" if reasons else ""
                raise AdvisorError(
                    f"{name} must be one of {list(self.values[name])} here; got {value!r}{why}")
        floats = {k.name for k in table.table() if k.type is float}
        try:
            Knobs(**{k: float(v) if k in floats else v for k, v in values.items()})
        except (ValueError, TypeError) as exc:
            raise AdvisorError(str(exc)) from None
        given = {k.name: values.get(k.name, k.default) for k in table.table()}
        refined = {name: table.row(name).default for name in table.REFINING
                   if name not in values and self.offers(table.row(name))
                   and (table.row(name).when is None or table.row(name).when(given))}
        return {**values, **refined}

    def to_dict(self) -> dict:
        def stored(knob: Knob) -> list:
            values = self.values[knob.name]  # a float range as (low, high): its step is the table's
            return list(values[:2] if knob.sample != "choice" else values)

        out: dict[str, Any] = {k.name: stored(k) for k in table.table() if k.original}
        out["blocks"] = self.blocks
        out["excluded"] = [e.to_dict() for e in self.excluded]
        # Later knobs only where offered, so spaces stored before them compare equal.
        out.update({k.name: stored(k) for k in table.table() if not k.original and self.offers(k)})
        return out


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
    probe = Probe(hw=hw, model=model, batch_size=batch_size, example=example, lr=lr, keep=keep,
                  lengths=lengths, serving=serving)
    values, excluded = {}, []
    for knob in table.table():
        offered, left_out = knob.offer(probe)
        values[knob.name] = tuple(offered)
        excluded += left_out
    path, blocks = checkpointing.find_blocks(model)
    return Space(values=values, excluded=tuple(excluded),
                 blocks=f"{path}: {len(blocks)} blocks" if blocks else "none")



def of_workload(hw: Hardware, workload: Workload, cache: StudyCache, settings: Settings) -> Space:
    """:func:`build` for a workload whose cache is prepared, under a study's settings."""
    return build(hw, workload.model, workload.batch_size, cache.probe_inputs(), lr=settings.lr,
                 keep=workload.keep, serving=settings.serving_rate > 0,
                 lengths=cache.lengths(workload.lengths))
