"""What the terminal shows: the live progress line and the Pareto-front table.

Both read only what the study stores (trial params, the user attributes the runner wrote,
the baseline), so ``advisor run`` and ``advisor show`` print the same thing.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

import optuna
from optuna.trial import FrozenTrial, TrialState

from advisor import recommend
from advisor.objectives import OBJECTIVES, ratio
from advisor.recommend import Constraints
from advisor.space import Knobs

KNOB_COLUMNS = (("precision", "precision"), ("accumulation", "accum"),
                ("checkpoint_every", "ckpt"), ("compile", "compile"), ("lr", "lr"),
                ("prune_kind", "prune"), ("quantization", "quant"), ("distill_alpha", "kd"))
# Shown only for studies whose space offers token budgets (variable-length workloads).
TOKENS_COLUMN = (("max_tokens", "tokens"),)


def knob_columns(space: dict | None) -> tuple[tuple[str, str], ...]:
    space = space or {}
    return (KNOB_COLUMNS + (TOKENS_COLUMN if space.get("max_tokens") else ())
            + ((("serving_max_batch", "serve"),) if space.get("serving_max_batch") else ()))


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
    if name == "serving_max_batch":
        return f"b{value} w{float(knobs.get('serving_max_wait_ms', 0.0)):g}ms" if value else "off"
    if name == "max_tokens":
        return "fixed" if value == 0 else str(value)
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


def serving_study(study: optuna.Study) -> bool:
    """Whether the study measures latency under a request rate (``--serving-rate``)."""
    return bool(study.user_attrs.get("settings", {}).get("serving_rate"))


def measured_row(label: str, knobs: dict, result: dict, baseline: dict | None,
                 columns: tuple[tuple[str, str], ...] = KNOB_COLUMNS, serving: bool = False) -> list[str]:
    base = baseline["metrics"] if baseline else {}
    full = Knobs.from_dict(knobs).to_dict()  # conditional knobs a trial did not sample
    cells = [label] + [knob_cell(k, full[k], full) for k, _ in columns]
    for o in OBJECTIVES:
        spread = None
        if o.name == "latency_ms" and not serving:
            spread = result.get("latency", {}).get("spread")
        cells.append(objective_cell(o.name, result["metrics"][o.name], base.get(o.name), spread))
    if serving:
        served = result.get("serving", {})
        cells.append(f"{served.get('throughput_rps', 0):.0f}")
        cells.append(f"{100 * served.get('overload_share', 0):.1f}%"
                     + (" SATURATED" if served.get("saturated") else ""))
    cells.append(f"{result.get('train', {}).get('throughput', 0):.0f}")
    return cells


def headers(columns: tuple[tuple[str, str], ...] = KNOB_COLUMNS, serving: bool = False) -> list[str]:
    cols = ["trial"] + [short for _, short in columns]
    cols += ["p99 ms" if serving and o.name == "latency_ms" else f"{o.label} {o.unit}".strip()
             for o in OBJECTIVES]
    if serving:
        cols += ["served/s", "overload"]
    return [*cols, "train samples/s"]


def front(study: optuna.Study, constraints: Constraints) -> tuple[list[FrozenTrial], int]:
    """The Pareto front of the trials that meet ``constraints`` (most accurate first), and
    how many trials meet them."""
    baseline = study.user_attrs.get("baseline")
    items = recommend.feasible(recommend.candidates(study), baseline and baseline["metrics"], constraints)
    numbers = {c.number for c in recommend.pareto(items)}
    trials = [t for t in study.get_trials(deepcopy=False) if t.number in numbers]
    return sorted(trials, key=lambda t: (-t.values[0], t.values[1])), len(items)


def study_report(study: optuna.Study, goal: str = "balanced", constraints: Constraints | None = None,
                 rec: recommend.Recommendation | None = None) -> str:
    """Baseline, Pareto front with ratios to the baseline, the recommendation (``rec`` when
    the caller has it already), and failures."""
    attrs = study.user_attrs
    constraints = constraints or Constraints.from_dict(attrs.get("constraints", {}))
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
    serving = serving_study(study)
    columns = knob_columns(attrs.get("space"))
    if baseline:
        rows.append(measured_row("baseline", baseline["knobs"], baseline, None, columns, serving))
    shown, feasible = front(study, constraints)
    for t in shown:
        rows.append(measured_row(f"#{t.number}", t.params, t.user_attrs["result"], baseline, columns,
                                 serving))
    out.append(f"Pareto front: {len(shown)} of {feasible} trials that meet the constraints "
               f"({constraints.describe()}), of {len(done)} completed ({len(failed)} failed); "
               f"ratios are to the baseline"
               + ("" if serving else ", latency ± is half the p10-p90 spread"))
    if serving:
        s = attrs["settings"]
        out.append(f"Serving: {s['serving_rate']:g} requests/s (Poisson, {s['serving_requests']} "
                   f"requests on a simulated clock fed by measured batch times); p99 is request "
                   f"latency including the queue; overload = share of requests later than "
                   f"{s['serving_deadline_ms']:g} ms; the baseline serves each request alone")
    first = len(columns) + 1
    extra = 3 if serving else 1
    out.append(table(headers(columns, serving), rows, right=set(range(first, first + len(OBJECTIVES) + extra))))
    rec = rec or recommend.recommend_if_any(study, constraints, goal)
    if rec:
        out.append("")
        out.append(render_recommendation(rec))
    if failed:
        out.append("")
        out.append("Failed trials:")
        for t in failed:
            out.append(f"  #{t.number} {Knobs.from_dict(t.params).describe()}"
                       f" -> {failure_reason(t, trials)}")
    excluded = attrs.get("space", {}).get("excluded", [])
    if excluded:
        out.append("")
        out.append("Left out of the search space on this hardware:")
        for e in excluded:
            out.append(f"  {e['knob']}={e['value']}: {e['reason']}")
    return "\n".join(out)


def failure_reason(trial: FrozenTrial, trials: list[FrozenTrial]) -> str:
    """Why a trial failed: what its process reported, or, for a trial whose worker died,
    that its heartbeat stopped (and which trial retried its knobs)."""
    reason = trial.user_attrs.get("failure", {}).get("reason")
    if reason:
        return reason
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    retry = next((t.number for t in trials if t.number > trial.number and retried(t) == trial.number), None)
    if retry is not None:
        return f"its worker stopped sending heartbeats (killed or lost); retried as #{retry}"
    return "no reason recorded (its worker stopped without reporting one: killed, or lost)"


def render_recommendation(rec: recommend.Recommendation, hint: bool = True) -> str:
    """The recommendation as text: what, how it compares, why, what matters, caveats."""
    knobs = Knobs.from_dict(rec.params)
    head = "Recommended" if rec.feasible else "Nearest to the constraints (no trial meets them)"
    lines = [f"{head} (goal {rec.goal}): #{rec.number}  {knobs.describe()}"]
    cells = []
    ratios = rec.ratios()
    served = rec.result.get("serving")
    for o in OBJECTIVES:
        value = rec.metrics[o.name]
        label = "p99 latency" if served and o.name == "latency_ms" else o.label
        if o.name == "accuracy":
            cells.append(f"accuracy {value:.4g} ({100 * (value - rec.baseline[o.name]):+.2f} points)")
        else:
            r = ratios[o.name]
            cells.append(f"{label} {value:.3g} {o.unit} ({r:.2f}x)" if r is not None
                         else f"{label} {value:.3g} {o.unit}")
    lines.append("  " + "   ".join(cells))
    if served:
        lines.append(
            f"  serving at {served['rate']:g} requests/s: batches of up to {served['max_batch']}, "
            f"waiting at most {served['max_wait_ms']:g} ms; p50 {served['p50_ms']:.3g} ms, p99 "
            f"{served['p99_ms']:.3g} ms, {served['throughput_rps']:.0f} served/s, "
            f"{100 * served['overload_share']:.1f}% later than {served['deadline_ms']:g} ms"
            + (" (SATURATED: the rate exceeds what this model serves)" if served["saturated"] else ""))
    lines.append(f"  why: {rec.why}")
    for m in rec.misses:
        lines.append(f"  misses: {m.describe()}")
    for a in rec.advice:
        lines.append(f"  try: {a}")
    if rec.importance:
        parts = []
        for name, scores in rec.importance.items():
            if scores:
                label = next(o.label for o in OBJECTIVES if o.name == name)
                parts.append(f"{label}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in scores))
        if parts:
            lines.append(f"  what matters most (fANOVA share of each objective's variance over "
                         f"{rec.completed} trials; knobs not sampled in every trial, such as "
                         f"prune_ratio, are left out; rough below ~50 trials):")
            lines.extend(f"    {p}" for p in parts)
    for w in rec.warnings:
        lines.append(f"  warning: {w}")
    if hint:
        lines.append(f"  export it: advisor export --study {rec.study} --goal {rec.goal} -o recommended.yaml")
    return "\n".join(lines)


def studies_table(rdb, url: str) -> str:
    """The studies in a storage: name, workload, device, trial counts, baseline accuracy."""
    rows = []
    for summary in rdb.get_all_studies():
        attrs = summary.user_attrs
        trials = rdb.get_all_trials(summary._study_id, deepcopy=False)
        count = {state: sum(1 for t in trials if t.state == state)
                 for state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)}
        base = attrs.get("baseline", {}).get("metrics", {}).get("accuracy")
        rows.append([summary.study_name, attrs.get("workload", {}).get("model") or "-",
                     attrs.get("hardware", {}).get("device") or "-",
                     str(count[TrialState.COMPLETE]), str(count[TrialState.FAIL]),
                     str(count[TrialState.RUNNING]), f"{base:.4g}" if base is not None else "-"])
    if not rows:
        return f"no studies in {url}; start one with advisor run"
    return table(["study", "workload", "device", "completed", "failed", "running",
                  "baseline accuracy"], rows, right={3, 4, 5, 6})


def render_applied(applied) -> str:
    """Baseline and applied model measured now, beside the study's trial."""
    config = applied.config
    trial = config.provenance.get("trial")
    rows = []
    for o in OBJECTIVES:
        now, then = applied.result["metrics"][o.name], config.measured[o.name]
        base = applied.baseline["metrics"][o.name]
        if o.name == "accuracy":
            diff = f"{100 * (now - then):+.2f} points"
        else:
            diff = f"{now / then:.2f}x" if then else "-"
        label = "p99 latency" if o.name == "latency_ms" and "serving" in applied.result else o.label
        rows.append([f"{label} {o.unit}".strip(), f"{base:.4g}", f"{then:.4g}", f"{now:.4g}",
                     f"{ratio(now, base):.2f}x" if ratio(now, base) is not None else "-", diff])
    lines = [f"Applied {Knobs.from_dict(config.knobs.to_dict()).describe()}",
             f"(trial #{trial} of study {config.provenance.get('study')!r}, measured on "
             f"{config.provenance.get('device_name')})",
             table(["objective", "baseline now", f"study #{trial}", "applied now", "vs baseline",
                    "vs study"], rows, right={1, 2, 3, 4, 5})]
    lines += [f"note: {n}" for n in applied.notes]
    served = applied.result.get("serving")
    if served:
        lines.append(f"serve it behind a dynamic batcher: batches of up to {served['max_batch']}, "
                     f"waiting at most {served['max_wait_ms']:g} ms (at {served['rate']:g} requests/s "
                     f"now: p99 {served['p99_ms']:.3g} ms, {served['throughput_rps']:.0f} served/s, "
                     f"{100 * served['overload_share']:.1f}% later than {served['deadline_ms']:g} ms)")
    if applied.artifact is not None:
        lines.append(f"saved {applied.artifact}: {applied.artifact_format}")
    return "\n".join(lines)


def short_result(result: dict) -> str:
    m = result["metrics"]
    lat = f"p99 {m['latency_ms']:.3g} ms" if "serving" in result else f"lat {m['latency_ms']:.3g} ms"
    return (f"acc {m['accuracy']:.4g}  {lat}  "
            f"mem {m['memory_mib']:.3g} MiB  size {m['size_mib']:.3g} MiB")


def _locked(method):
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


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
        self._lock = threading.RLock()  # worker threads report at once

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

    @_locked
    def message(self, text: str) -> None:
        self._write_line(text)

    @_locked
    def start(self, index: int, label: str) -> None:
        self.current = f"[{index}/{self.total}] {label}"
        self._write_status(f"{self.current} | {self._clock()} | front {self.front} | starting")

    @_locked
    def tick(self, phase: str, elapsed: float) -> None:
        now = time.time()
        if now - self._last_draw < 0.5:
            return
        self._last_draw = now
        self._write_status(f"{self.current} | {self._clock()} | front {self.front} | "
                           f"{phase} {elapsed:.0f}s")

    @_locked
    def finish(self, summary: str, front: int | None = None) -> None:
        if front is not None:
            self.front = front
        self._write_line(f"{self.current} | {self._clock()} | front {self.front} | {summary}")
