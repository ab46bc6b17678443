"""What the terminal shows: the live progress line, the Pareto-front table, the
recommendation, the studies of a storage and an applied configuration.

The tables read a study's record (``study/record.py``) only, so ``advisor run`` and
``advisor show`` print the same thing; :class:`Progress` shows a run's events as they come.
Only the screens (``cli/``, ``api.py``, the dashboard) import this module.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

import optuna

from advisor import knobs as table_of_knobs
from advisor import recommend
from advisor import serving as serving_module
from advisor.constraints import Constraints
from advisor.knobs import Knob, Knobs
from advisor.objectives import CONFIDENCE, OBJECTIVES, paired, ratio
from advisor.study import warm
from advisor.study.loop import Events
from advisor.study.record import StudyRecord, StudySummary
from advisor.texttable import table
from advisor.trial.runner import Outcome


def knob_columns(space: dict | None) -> tuple[Knob, ...]:
    """The knobs with a column in a study over the stored ``space`` (``knobs.columns``)."""
    return table_of_knobs.columns(space)


def knob_cell(name: str, value: object, knobs: dict | None = None) -> str:
    """One knob's cell, the other knobs (partial ``params``) at their given or default values."""
    return table_of_knobs.cell(table_of_knobs.row(name), Knobs.from_dict({**(knobs or {}), name: value}))


def objective_cell(name: str, value: float, base: float | None, spread: float | None = None,
                   pair: dict | None = None) -> str:
    text = f"{value:.4g}" if name == "accuracy" else f"{value:.3g}"
    if pair is not None:
        # The ratio timed interleaved with the baseline, with its confidence interval: it holds
        # when the machine's load changes between this trial and the baseline's own run.
        return f"{text} ({pair['ratio']:.2f}x, {pair['low']:.2f}-{pair['high']:.2f})"
    if spread is not None:
        text += f" ±{spread * 50:.0f}%"  # half the p10-p90 range, as a percentage of the median
    r = ratio(value, base) if base is not None else None
    if r is None:
        return text
    # Accuracy moves by fractions of a percent: two decimals would print 0.997 as 1.00x.
    return f"{text} ({r:.3f}x)" if name == "accuracy" else f"{text} ({r:.2f}x)"


def measured_row(label: str, knobs: dict, result: dict, baseline: dict | None,
                 columns: tuple[Knob, ...], serving: bool = False) -> list[str]:
    base = baseline["metrics"] if baseline else {}
    full = Knobs.from_dict(knobs)  # conditional knobs a trial did not sample at their defaults
    cells = [label] + [table_of_knobs.cell(k, full) for k in columns]
    for o in OBJECTIVES:
        spread = None
        if o.name == "latency_ms" and not serving:
            spread = result.get("latency", {}).get("spread")
        cells.append(objective_cell(o.name, result["metrics"][o.name], base.get(o.name), spread,
                                    paired(result, o.name)))
    if serving:
        served = result.get("serving", {})
        cells.append(f"{served.get('throughput_rps', 0):.0f}")
        cells.append(f"{100 * served.get('overload_share', 0):.1f}%"
                     + (" SATURATED" if served.get("saturated") else ""))
    cells.append(f"{result.get('train', {}).get('throughput', 0):.0f}")
    return cells


def headers(columns: tuple[Knob, ...], serving: bool = False) -> list[str]:
    cols = ["trial"] + [k.column for k in columns]
    cols += ["p99 ms" if serving and o.name == "latency_ms" else f"{o.label} {o.unit}".strip()
             for o in OBJECTIVES]
    if serving:
        cols += ["served/s", "overload"]
    return [*cols, "train samples/s"]


def study_report(study: optuna.Study | StudyRecord, goal: str = "balanced",
                 constraints: Constraints | None = None, rec: recommend.Recommendation | None = None) -> str:
    """Baseline, Pareto front with ratios to the baseline, the recommendation (``rec`` when
    the caller has it already), and failures."""
    record = StudyRecord.of(study)
    judged = record.front(constraints)
    baseline = record.baseline
    out = []
    hw = record.hardware
    if hw:
        out.append(f"Study {record.name!r} on {hw.get('device')} ({hw.get('name')}), "
                   f"torch {hw.get('torch_version')}")
    given = (baseline or {}).get("as_given")
    if given:
        out.append(f"Your trained model as given: accuracy {given['accuracy']:.4g}; the baseline below is "
                   f"it fine-tuned {record.settings.get('trial_steps')} steps with the default knobs, as "
                   f"each trial is: {baseline['metrics']['accuracy']:.4g}")
    rows = []
    serving = record.serving is not None
    columns = knob_columns(record.space)
    if baseline:
        rows.append(measured_row("baseline", baseline["knobs"], baseline, None, columns, serving))
    for t in judged.front:
        rows.append(measured_row(f"#{t.number}", t.params, t.result, baseline, columns, serving))
    done = [t for t in record.trials if t.state == "complete"]
    out.append(f"Pareto front: {len(judged.front)} of {len(judged.feasible)} trials that meet the "
               f"constraints ({judged.constraints.describe()}), of {len(done)} completed "
               f"({len(record.failed)} failed"
               + (f", {len(record.stopped)} stopped early" if record.stopped else "")
               + "); ratios are to the baseline"
               + ("; a p99 ratio is the two servers simulated on times measured interleaved with the "
                  f"baseline's model in the trial's process, with its {100 * CONFIDENCE:.0f}% interval"
                  if serving else
                  "; a latency ratio is timed interleaved with the baseline's model in "
                  f"the trial's process, with its {100 * CONFIDENCE:.0f}% interval (± where a trial "
                  "has none: half the p10-p90 spread)"))
    if serving:
        s = record.settings
        out.append(f"Serving: {s['serving_rate']:g} requests/s (Poisson, {s['serving_requests']} "
                   f"requests on a simulated clock, each batch taking one of the times measured "
                   f"at its size; the first {100 * serving_module.WARMUP:.0f}% are a warm-up, left "
                   f"out); p99 is request latency including the queue, which holds what the model "
                   f"serves within the deadline; overload = share of requests dropped or later than "
                   f"{s['serving_deadline_ms']:g} ms; the baseline serves each request alone")
    first = len(columns) + 1
    extra = 3 if serving else 1
    out.append(table(headers(columns, serving), rows, right=set(range(first, first + len(OBJECTIVES) + extra))))
    if record.warm:
        tried = ", ".join(f"#{t.number} ({t.warm_from})" for t in record.warm)
        out.append(f"Warm start: {tried} tried the knobs of those earlier studies' trials first, "
                   "measured anew here")
    rec = rec or recommend.recommend_if_any(record, judged.constraints, goal)
    if rec:
        out.append("")
        out.append(render_recommendation(rec))
    table_ = (baseline or {}).get("sensitivity")
    if table_:
        out.append("")
        out.extend(sensitivity_lines(table_))
    if record.failed:
        out.append("")
        out.append("Failed trials:")
        for t in record.failed:
            out.append(f"  #{t.number} {t.describe()} -> {record.failure_reason(t)}")
    if record.stopped:
        out.append("")
        out.append("Stopped early (at a rung of the fine-tune; study/rungs.py, --no-early-stop turns it off):")
        for t in record.stopped:
            why = t.stopped.get("reason") or "interrupted while the study decided"
            out.append(f"  #{t.number} {t.describe()} -> step {t.stopped.get('step', '?')}: {why}")
    if record.excluded:
        out.append("")
        out.append("Left out of the search space on this hardware:")
        for e in record.excluded:
            out.append(f"  {e['knob']}={e['value']}: {e['reason']}")
    return "\n".join(out)


SHOWN_LAYERS = 12  # rows of each sensitivity table the report prints (the dashboard draws all)


def sensitivity_lines(sensitivity: dict) -> list[str]:
    """The study's per-layer sensitivity (``trial/sensitivity.py``) as two ranked tables."""
    out = [f"Per-layer sensitivity (measured once, with the baseline's weights, on {sensitivity['samples']} "
           f"training samples; the loss's rise from {sensitivity['loss']:.4g} with that layer alone "
           f"compressed; {sensitivity['seconds']:.1f} s):"]
    rows = sensitivity["layers"]
    families = sorted({f for row in rows for f in row["quant"]})
    if rows:
        ranked = sorted(rows, key=lambda row: max(row["quant"].values()), reverse=True)
        cells = [[row["name"], row["kind"], str(row["params"]),
                  f"{100 * row['time_share']:.0f}%" if row.get("time_share") is not None else "-",
                  *(f"{row['quant'][f]:+.3g}" if f in row["quant"] else "-" for f in families)]
                 for row in ranked[:SHOWN_LAYERS]]
        names = ["int8-static/qat" if f == "pt2e" else f for f in families]
        out.append(table(["layer", "kind", "params", "time", *names], cells, right=set(range(2, 4 + len(names)))))
        if len(rows) > SHOWN_LAYERS:
            out.append(f"  ... {len(rows) - SHOWN_LAYERS} more layers (advisor dashboard draws them all)")
    units = (sensitivity.get("pruning") or {}).get("units") or []
    if units:
        shown = ("0.3", "0.5", "0.8")
        ranked = sorted(units, key=lambda u: u["ratios"]["0.5"]["loss"], reverse=True)
        cells = [[u["name"], u["kind"], *(f"{u['ratios'][r]['loss']:+.3g}" for r in shown),
                  str(u["ratios"]["0.5"]["removed"])] for u in ranked[:SHOWN_LAYERS]]
        out.append("Structured pruning units, pruned alone (loss rise at each ratio; parameters removed at 0.5):")
        out.append(table(["unit", "kind", *shown, "removed at 0.5"], cells, right={2, 3, 4, 5}))
    return out


def layer_lines(result: dict, knobs: Knobs) -> list[str]:
    """What a trial chose per layer (``techniques/layers.py``), if anything."""
    plan = result.get("layers") or {}
    out = []
    if knobs.quant_protect:
        kept = ", ".join(plan.get("protected") or []) or "none (no layer's quantization raised the loss enough)"
        out.append(f"  kept out of {knobs.quantization} (quant_protect {knobs.quant_protect:g}): {kept}")
    if plan.get("prune_ratios"):
        ratios = ", ".join(f"{name} {r:g}" for name, r in plan["prune_ratios"].items())
        out.append(f"  structured pruning by layer (prune_ratio {knobs.prune_ratio:g} spread by "
                   f"sensitivity): {ratios}")
    return out


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
            r, pair = ratios[o.name], paired(rec.result, o.name)
            if pair is not None:
                cells.append(f"{label} {value:.3g} {o.unit} ({r:.2f}x, {pair['low']:.2f}-{pair['high']:.2f})")
            else:
                cells.append(f"{label} {value:.3g} {o.unit} ({r:.2f}x)" if r is not None
                             else f"{label} {value:.3g} {o.unit}")
    lines.append("  " + "   ".join(cells))
    lines.extend(layer_lines(rec.result, knobs))
    confirmed = rec.confirmation
    if confirmed is not None:
        selection, held_out = confirmed["samples"]
        grain = f", where one sample is {100 / selection:.2g} points" if confirmed["per_sample"] else ""
        lines.append(
            f"  confirmed on the {held_out} validation samples no choice was made on (the accuracy "
            f"above is on the other {selection}{grain}): "
            f"{confirmed['accuracy']:.4g} ({100 * (confirmed['accuracy'] - confirmed['baseline']):+.2f} "
            f"points against the baseline's {confirmed['baseline']:.4g} there)")
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
    rows = [[s.name, s.model or "-", s.device or "-", str(s.counts["complete"]), str(s.counts["pruned"]),
             str(s.counts["fail"]), str(s.counts["running"]),
             f"{s.baseline_accuracy:.4g}" if s.baseline_accuracy is not None else "-"]
            for s in StudySummary.all(rdb)]
    if not rows:
        return f"no studies in {url}; start one with advisor run"
    return table(["study", "workload", "device", "completed", "stopped early", "failed", "running",
                  "baseline accuracy"], rows, right={3, 4, 5, 6, 7})


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
        pair = paired(applied.result, o.name)  # timed interleaved with the baseline's model
        versus = (paired_ratio(pair) if pair else
                  f"{ratio(now, base):.2f}x" if ratio(now, base) is not None else "-")
        rows.append([f"{label} {o.unit}".strip(), f"{base:.4g}", f"{then:.4g}", f"{now:.4g}", versus, diff])
    lines = [f"Applied {config.knobs.describe()}",
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
    if applied.shipped is not None:
        lines.append(f"saved {applied.shipped.path}: {applied.shipped.describe()}")
        lines += shipped_lines(applied)
    return "\n".join(lines)


def paired_ratio(pair: dict) -> str:
    """``0.45x [0.43-0.47]``: a paired ratio and its interval."""
    return f"{pair['ratio']:.2f}x [{pair['low']:.2f}-{pair['high']:.2f}]"


def shipped_lines(applied) -> list[str]:
    """The shipped file as measured in a fresh process, against the study's trial and the
    model this run measured: the paired latency ratios (each timed interleaved with the
    baseline's model) and accuracy. A note where the file's latency interval misses the
    study's (this run's, for a config without the study's), or its accuracy this run's by
    more than 0.2 points."""
    fresh, here = applied.shipped_measured, applied.result
    if not fresh:
        return []
    study = applied.config.paired
    trial = f"study #{applied.config.provenance.get('trial')}"

    def inside(a: dict, b: dict) -> bool:  # the two intervals overlap
        return a["low"] <= b["high"] and b["low"] <= a["high"]

    rows, notes = [], []
    for key, name in (("latency", "latency (paired ratio)"), ("latency_batch1", "batch-1 latency (paired ratio)")):
        mine, theirs = here.get("paired", {}).get(key), fresh["paired"][key]
        rows.append([name, *([paired_ratio(study[key]) if key in study else "-"] if study else []),
                     paired_ratio(mine) if mine else "-", paired_ratio(theirs)])
        against, label = (study.get(key), "the study's") if study else (mine, "this run's")
        if against and not inside(against, theirs):
            notes.append(f"note: the shipped file's {name.split(' (')[0]} ratio is outside {label} interval")
    blank = [""] if study else []
    rows.append(["latency ms", *blank, f"{here['latency']['median_ms']:.4g}",
                 f"{fresh['latency']['median_ms']:.4g}"])
    confirmation = here.get("confirmation", {}).get("accuracy")
    for name, mine, theirs in (("accuracy (selection part)", here["metrics"]["accuracy"], fresh["accuracy"]),
                               ("accuracy (confirmation part)", confirmation, fresh["confirmation"])):
        if mine is None or theirs is None:
            continue
        rows.append([name, *blank, f"{mine:.4f}", f"{theirs:.4f} ({100 * (theirs - mine):+.2f} points)"])
        if abs(theirs - mine) > 0.002:
            notes.append(f"note: the shipped file's {name} differs from this run's by more than 0.2 points")
    head = ("The shipped file, loaded in a fresh process as above, against the study's trial and the model "
            "this run measured:" if study else
            "The shipped file, loaded in a fresh process as above, against the model this run measured:")
    columns = ["", *([trial] if study else []), "this run", "shipped file, fresh process"]
    return [head, table(columns, rows, right=set(range(1, len(columns)))), *notes]


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


class Progress(Events):
    """One live status line on a terminal, one permanent line per finished trial: the
    terminal's view of a run's events."""

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

    def baseline_started(self, training: bool) -> None:
        self.start(0, "training and measuring the baseline" if training else "measuring the baseline")

    def baseline_finished(self, result: dict) -> None:
        self.finish(f"baseline: {short_result(result)}")

    def warm_started(self, origins: list[str]) -> None:
        self.message(warm.describe(origins))

    def trial_started(self, index: int, number: int, knobs: Knobs) -> None:
        self.start(index, f"#{number} {knobs.describe()}")

    def trial_finished(self, number: int, outcome: Outcome, front: int | None) -> None:
        if outcome.ok:
            self.finish(short_result(outcome.result), front)
        elif outcome.stopped:
            self.finish(outcome.reason)
        else:
            self.finish("interrupted" if outcome.reason == "interrupted" else f"FAILED: {outcome.reason}")
