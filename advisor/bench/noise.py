"""Latency ratios under noise: the same configurations measured as trials several times on a
quiet machine, then as many times again while CPU-bound processes run on the same cores.

Each trial reports two ratios to the baseline: the paired one (the trial's process times the
baseline's model interleaved with its own, ``trial/measure.time_paired``) and the unpaired
one the advisor used to print (the trial's median over the baseline's, measured once per
study in another process). The goals: every paired ratio under load within 10% of its quiet
value, and on a quiet machine the repeats' paired ratios within 3% of each other
(coefficient of variation).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from advisor import space
from advisor.bench.knobs import label
from advisor.bench.offered import workload_space
from advisor.bench.progress import Progress, silent
from advisor.knobs import Knobs
from advisor.study import RunOptions, load, run
from advisor.techniques.schedule import DEFAULT_LR
from advisor.texttable import table

CONFIGS = (
    {},  # the baseline's knobs: a ratio of 1 is the truth
    {"quantization": "int8-static"},
    {"prune_kind": "structured", "prune_ratio": 0.5, "quantization": "int8-static"},
)
# PT2E int8 targets the x86 CPU backend; where the space does not offer it (CUDA), torchao's
# int8 with dynamic activations takes its place.
INT8_FALLBACK = "int8-dynamic"
LOAD_GOAL = 0.10  # a paired ratio under load within 10% of its quiet value
CV_GOAL = 0.03  # quiet repeats' paired ratios within 3% of each other


@contextlib.contextmanager
def cpu_load(processes: int) -> Iterator[None]:
    """``processes`` busy Python processes on this process's cores, for the duration."""
    spin = "import os\nwhile True:\n    os.getpid()"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(processes)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def noise(model: str | None = None, device: str = "auto", *, repeats: int = 5,
          load_processes: int | None = None, study_dir: str | None = None,
          progress: Progress = silent, **settings) -> dict:
    """Each of ``CONFIGS`` as ``repeats`` trials on the machine as it is (it should be quiet),
    then ``repeats`` more under ``load_processes`` busy processes (default: one per core)."""
    lr = settings.get("lr") or DEFAULT_LR
    base = Knobs(lr=lr).to_dict()
    busy = load_processes or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="advisor-noise-") as tmp:
        root = Path(study_dir or tmp)
        configs = offered_configs(workload_space(model, device, root / "cache" / "space", lr)[2])
        queued = [{**base, **c} for c in configs for _ in range(repeats)]
        url = f"sqlite:///{root / 'noise.db'}"
        options = dict(model=model, device=device, trials=len(queued), enqueue=queued, storage=url,
                       cache_dir=str(root / "cache"), study="noise", sampler="random", seed=0,
                       early_stop=False, **settings)
        run(RunOptions(**options), progress(len(queued)))
        with cpu_load(busy):
            run(RunOptions(**options), progress(len(queued)))
        record = load("noise", url)
    baseline = record.baseline
    trials = record.trials
    rows = []
    for i, config in enumerate(configs):
        row = {"config": label(config) or "baseline's knobs", "knobs": config}
        for condition, offset in (("quiet", 0), ("loaded", len(queued))):
            mine = [trials[offset + i * repeats + r] for r in range(repeats)]
            row[condition] = _condition(mine, baseline)
        q, lo = row["quiet"]["paired"], row["loaded"]["paired"]
        row["load_shift"] = abs(lo["median"] / q["median"] - 1) if q["median"] and lo["median"] else None
        rows.append(row)
    return {"hardware": record.hardware, "workload": record.workload.get("name"),
            "settings": record.settings, "repeats": repeats, "load_processes": busy,
            "baseline_latency_ms": baseline["metrics"]["latency_ms"], "rows": rows,
            "goals": _goals(rows)}


def offered_configs(search: space.Space) -> list[dict]:
    """``CONFIGS`` as this space can run them: int8-static becomes ``INT8_FALLBACK`` where it
    is not offered (a space offering neither refuses the study with its own reason)."""
    if "int8-static" in search.quantization or INT8_FALLBACK not in search.quantization:
        return [dict(c) for c in CONFIGS]
    return [{**c, "quantization": INT8_FALLBACK} if c.get("quantization") == "int8-static" else dict(c)
            for c in CONFIGS]


def _condition(trials, baseline: dict) -> dict:
    """The repeats' paired and unpaired ratios, with their median and spread."""
    failed = [t.failure.get("reason", t.state) for t in trials if t.result is None]
    done = [t for t in trials if t.result is not None]
    paired = [t.result["paired"]["latency"] for t in done]
    unpaired = [t.metrics["latency_ms"] / baseline["metrics"]["latency_ms"] for t in done]
    return {"failed": failed, "paired": _summary([p["ratio"] for p in paired]),
            "intervals": [[p["low"], p["high"]] for p in paired],
            "unpaired": _summary(unpaired),
            "latency_ms": [t.metrics["latency_ms"] for t in done]}


def _summary(values: list[float]) -> dict:
    if not values:
        return {"values": [], "median": None, "cv": None}
    mean = statistics.fmean(values)
    cv = statistics.pstdev(values) / mean if len(values) > 1 and mean else 0.0
    return {"values": values, "median": statistics.median(values), "cv": cv}


def _goals(rows: list[dict]) -> dict:
    shifts = [r["load_shift"] for r in rows]
    cvs = [r["quiet"]["paired"]["cv"] for r in rows]
    return {"load_within": {"goal": LOAD_GOAL, "worst": max((s for s in shifts if s is not None), default=None),
                            "met": all(s is not None and s <= LOAD_GOAL for s in shifts)},
            "quiet_cv": {"goal": CV_GOAL, "worst": max((c for c in cvs if c is not None), default=None),
                         "met": all(c is not None and c <= CV_GOAL for c in cvs)}}


def render(report: dict) -> str:
    def ratios(summary: dict) -> str:
        if summary["median"] is None:
            return "-"
        return f"{summary['median']:.3f}x (cv {100 * summary['cv']:.1f}%)"

    cols = ["config", "quiet paired", "loaded paired", "shift", "quiet unpaired", "loaded unpaired", "failed"]
    rows = []
    for r in report["rows"]:
        shift = f"{100 * r['load_shift']:.1f}%" if r["load_shift"] is not None else "-"
        failed = len(r["quiet"]["failed"]) + len(r["loaded"]["failed"])
        rows.append([r["config"], ratios(r["quiet"]["paired"]), ratios(r["loaded"]["paired"]), shift,
                     ratios(r["quiet"]["unpaired"]), ratios(r["loaded"]["unpaired"]), str(failed)])
    hw, s, g = report["hardware"], report["settings"], report["goals"]
    head = (f"Latency ratios to the baseline under noise: {report['workload']} on {hw.get('device')} "
            f"({hw.get('name')}), torch {hw.get('torch_version')}; {report['repeats']} trials per "
            f"configuration quiet, then {report['repeats']} with {report['load_processes']} busy "
            f"processes on the same cores; {hw.get('threads', '?')} threads per trial; latency at batch "
            f"{s['latency_batch']}; median of the "
            f"repeats (coefficient of variation); unpaired = the trial's median over the baseline's, "
            f"measured once before the quiet trials")
    lines = [head, table(cols, rows, right=set(range(1, 7)))]
    for name, text in (("load_within", "every paired ratio under load within {goal:.0%} of its quiet value"),
                       ("quiet_cv", "quiet repeats' paired ratios within {goal:.0%} of each other")):
        worst = g[name]["worst"]
        lines.append(f"goal: {text.format(goal=g[name]['goal'])}: "
                     f"{'met' if g[name]['met'] else 'NOT met'} (worst {100 * worst:.1f}%)" if worst is not None
                     else f"goal: {text.format(goal=g[name]['goal'])}: no data")
    return "\n".join(lines)
