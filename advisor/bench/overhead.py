"""Fixed cost per trial: ``overhead()`` runs a real study of the default workload in a
scratch directory and splits every trial's wall time, as the study process saw it, into
measured work (fine-tune, latency, evaluation, size, memory, profile) and fixed cost
(sampling, process start, loading the workload and data, collecting the result, storage
writes).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from advisor.bench.progress import Progress, silent
from advisor.study import RunOptions, run
from advisor.texttable import table

MEASURED = ("baseline_train", "prune", "train", "quantize", "latency", "paired", "evaluate", "size",
            "memory", "profile")
GOAL_PCT = 15.0


def overhead(trials: int = 6, seed: int = 0, model: str | None = None,
             progress: Progress = silent) -> dict:
    """Run ``trials`` trials of a fresh study; the per-trial split as a JSON-able dict."""
    with tempfile.TemporaryDirectory(prefix="advisor-bench-") as tmp:
        options = RunOptions(model=model, trials=trials, seed=seed,
                                  storage=f"sqlite:///{Path(tmp) / 'bench.db'}",
                                  cache_dir=str(Path(tmp) / "cache"), early_stop=False)
        result = run(options, progress(trials))
    rows = []
    for t in result.timings:
        phases = t["phases"]
        measured = sum(phases.get(k, 0.0) for k in MEASURED)
        wall = t["ask_s"] + t["process_s"] + t["store_s"]
        in_process = sum(phases.values())
        rows.append({
            "trial": t["number"],
            "compile": t["knobs"]["compile"],
            "ok": t["ok"],
            "wall_s": wall,
            "measured_s": measured,
            "fixed_s": wall - measured,
            "fixed_pct": 100.0 * (wall - measured) / wall,
            "ask_s": t["ask_s"],
            "start_s": phases.get("start", 0.0),
            "load_s": phases.get("load", 0.0),
            "collect_s": max(0.0, t["process_s"] - in_process),
            "store_s": t["store_s"],
        })
    pcts = [r["fixed_pct"] for r in rows]
    return {
        "trials": rows,
        "once_per_study": {
            "workload_and_data_s": result.setup_s.get("workload_and_data_s"),
            "trial_server_start_s": result.baseline.get("phases", {}).get("start"),
            "baseline_s": result.setup_s.get("baseline_s"),
        },
        "summary": {
            "median_fixed_pct": statistics.median(pcts),
            "max_fixed_pct": max(pcts),
            "median_wall_s": statistics.median(r["wall_s"] for r in rows),
            "median_fixed_s": statistics.median(r["fixed_s"] for r in rows),
            "goal_pct": GOAL_PCT,
            "goal_met": statistics.median(pcts) < GOAL_PCT,
        },
    }


def render(report: dict) -> str:
    cols = ["trial", "compile", "wall s", "measured s", "fixed s", "fixed %",
            "ask", "start", "load", "collect", "store"]
    rows = [[f"#{r['trial']}", r["compile"], f"{r['wall_s']:.2f}", f"{r['measured_s']:.2f}",
             f"{r['fixed_s']:.3f}", f"{r['fixed_pct']:.1f}", f"{r['ask_s']:.3f}",
             f"{r['start_s']:.3f}", f"{r['load_s']:.3f}", f"{r['collect_s']:.3f}",
             f"{r['store_s']:.3f}"] for r in report["trials"]]
    s, once = report["summary"], report["once_per_study"]
    lines = [
        "Time per trial of the default workload (seconds; fixed = ask + start + load + "
        "collect + store)",
        table(cols, rows, right=set(range(2, 11))),
        "",
        f"median fixed cost {s['median_fixed_s']:.3f} s = {s['median_fixed_pct']:.1f}% of a "
        f"median {s['median_wall_s']:.2f} s trial (max {s['max_fixed_pct']:.1f}%); goal "
        f"< {s['goal_pct']:.0f}%: {'met' if s['goal_met'] else 'NOT met'}",
        f"once per study: workload build + data cache {once['workload_and_data_s']:.2f} s, "
        f"trial server start (imports torch) {once['trial_server_start_s']:.2f} s, "
        f"baseline {once['baseline_s']:.2f} s",
    ]
    return "\n".join(lines)
