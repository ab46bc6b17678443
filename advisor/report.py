"""What the terminal shows: the live progress line and the Pareto-front table.

Both read only what the study stores (trial params, the user attributes the runner wrote,
the baseline), so ``advisor run`` and ``advisor show`` print the same thing.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import optuna
from optuna.trial import FrozenTrial, TrialState

from advisor.objectives import OBJECTIVES, ratio
from advisor.space import Knobs

KNOB_COLUMNS = (("precision", "precision"), ("accumulation", "accum"),
                ("checkpoint_every", "ckpt"), ("compile", "compile"), ("lr", "lr"),
                ("prune_kind", "prune"), ("quantization", "quant"), ("distill_alpha", "kd"))


def table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """A plain-text table; columns in ``right`` are right-aligned."""
    right = right or set()
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def knob_cell(name: str, value: object, knobs: dict | None = None) -> str:
    knobs = knobs or {}
    if name == "prune_kind":
        ratio = knobs.get("prune_ratio")
        return f"{value} {ratio:g}" if value in ("structured", "unstructured") and ratio else str(value)
    if name == "distill_alpha":
        if not value:
            return "off"
        return f"T{knobs.get('distill_temperature', 4.0):g} a{float(value):g}"
    if name == "lr":
        return f"{float(value):.2g}"
    if name == "checkpoint_every":
        return "off" if value == 0 else f"1/{value}"
    return str(value)


def objective_cell(name: str, value: float, base: float | None, spread: float | None = None) -> str:
    text = f"{value:.4g}" if name == "accuracy" else f"{value:.3g}"
    if spread is not None:
        text += f" ±{spread * 50:.0f}%"  # half the p10-p90 range, as a percentage of the median
    r = ratio(value, base) if base is not None else None
    if r is None:
        return text
    # Accuracy moves by fractions of a percent: two decimals would print 0.997 as 1.00x.
    return f"{text} ({r:.3f}x)" if name == "accuracy" else f"{text} ({r:.2f}x)"


def measured_row(label: str, knobs: dict, result: dict, baseline: dict | None) -> list[str]:
    base = baseline["metrics"] if baseline else {}
    full = Knobs.from_dict(knobs).to_dict()  # conditional knobs a trial did not sample
    cells = [label] + [knob_cell(k, full[k], full) for k, _ in KNOB_COLUMNS]
    for o in OBJECTIVES:
        spread = result.get("latency", {}).get("spread") if o.name == "latency_ms" else None
        cells.append(objective_cell(o.name, result["metrics"][o.name], base.get(o.name), spread))
    cells.append(f"{result.get('train', {}).get('throughput', 0):.0f}")
    return cells


def headers() -> list[str]:
    cols = ["trial"] + [short for _, short in KNOB_COLUMNS]
    cols += [f"{o.label} {o.unit}".strip() for o in OBJECTIVES]
    return [*cols, "train samples/s"]


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    front = [t for t in study.best_trials if "result" in t.user_attrs]
    return sorted(front, key=lambda t: (-t.values[0], t.values[1]))


def study_report(study: optuna.Study) -> str:
    """Baseline, Pareto front with ratios to the baseline, and failures, as text."""
    attrs = study.user_attrs
    baseline = attrs.get("baseline")
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    out = []
    hw = attrs.get("hardware", {})
    if hw:
        out.append(f"Study {study.study_name!r} on {hw.get('device')} ({hw.get('name')}), "
                   f"torch {hw.get('torch_version')}")
    rows = []
    if baseline:
        rows.append(measured_row("baseline", baseline["knobs"], baseline, None))
    front = front_trials(study)
    for t in front:
        rows.append(measured_row(f"#{t.number}", t.params, t.user_attrs["result"], baseline))
    out.append(f"Pareto front: {len(front)} of {len(done)} completed trials "
               f"({len(failed)} failed); ratios are to the baseline, latency ± is half the "
               f"p10-p90 spread")
    first = len(KNOB_COLUMNS) + 1
    out.append(table(headers(), rows, right=set(range(first, first + len(OBJECTIVES) + 1))))
    if failed:
        out.append("")
        out.append("Failed trials:")
        for t in failed:
            failure = t.user_attrs.get("failure", {})
            out.append(f"  #{t.number} {Knobs.from_dict(t.params).describe()}"
                       f" -> {failure.get('reason', 'no reason recorded')}")
    excluded = attrs.get("space", {}).get("excluded", [])
    if excluded:
        out.append("")
        out.append("Left out of the search space on this hardware:")
        for e in excluded:
            out.append(f"  {e['knob']}={e['value']}: {e['reason']}")
    return "\n".join(out)


def short_result(result: dict) -> str:
    m = result["metrics"]
    return (f"acc {m['accuracy']:.4g}  lat {m['latency_ms']:.3g} ms  "
            f"mem {m['memory_mib']:.3g} MiB  size {m['size_mib']:.3g} MiB")


class Progress:
    """One live status line on a terminal, one permanent line per finished trial."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total = total
        self.began = time.time()
        self.front = 0
        self.current = ""
        self._last_draw = 0.0

    def _clock(self) -> str:
        s = int(time.time() - self.began)
        return f"{s // 60:02d}:{s % 60:02d}"

    def _write_status(self, text: str) -> None:
        if self.tty:
            width = 119
            self.stream.write("\r\033[K" + text[:width])
            self.stream.flush()

    def _write_line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        self._write_line(text)

    def start(self, index: int, label: str) -> None:
        self.current = f"[{index}/{self.total}] {label}"
        self._write_status(f"{self.current} | {self._clock()} | front {self.front} | starting")

    def tick(self, phase: str, elapsed: float) -> None:
        now = time.time()
        if now - self._last_draw < 0.5:
            return
        self._last_draw = now
        self._write_status(f"{self.current} | {self._clock()} | front {self.front} | "
                           f"{phase} {elapsed:.0f}s")

    def finish(self, summary: str, front: int | None = None) -> None:
        if front is not None:
            self.front = front
        self._write_line(f"{self.current} | {self._clock()} | front {self.front} | {summary}")
