"""Benchmarks, each a table for people and a dict for JSON.

``overhead()`` runs a real study of the default workload in a scratch directory and splits
every trial's wall time, as the study process saw it, into measured work (fine-tune,
latency, evaluation, size, memory, profile) and fixed cost (sampling, process start,
loading the workload and data, collecting the result, storage writes).

``one_at_a_time()`` measures the baseline and then each technique alone at its common
setting, the way a tutorial would try techniques one by one.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import optuna
from optuna.trial import TrialState

from advisor import hardware, space, storage
from advisor import study as core
from advisor.errors import AdvisorError
from advisor.report import Progress, table
from advisor.workload import DEFAULT_MODEL, WorkloadRef, build

MEASURED = ("baseline_train", "prune", "train", "quantize", "latency", "evaluate", "size", "memory",
            "profile")
GOAL_PCT = 15.0


def overhead(trials: int = 6, seed: int = 0, model: str | None = None,
             progress: Progress | None = None) -> dict:
    """Run ``trials`` trials of a fresh study; the per-trial split as a JSON-able dict."""
    with tempfile.TemporaryDirectory(prefix="advisor-bench-") as tmp:
        options = core.RunOptions(model=model, trials=trials, seed=seed,
                                  storage=f"sqlite:///{Path(tmp) / 'bench.db'}",
                                  cache_dir=str(Path(tmp) / "cache"))
        result = core.run(options, progress or Progress(trials))
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


COMMON = (
    {"precision": "bf16"},
    {"accumulation": 4},
    {"checkpoint_every": 1},
    {"compile": "max-autotune"},
    {"prune_kind": "unstructured", "prune_ratio": 0.3},
    {"prune_kind": "structured", "prune_ratio": 0.5},
    {"quantization": "int8-dynamic"},
    {"quantization": "int8-static"},
    {"distill_alpha": 0.7, "distill_temperature": 4.0},
    {"prune_kind": "structured", "prune_ratio": 0.5, "quantization": "int8-static",
     "distill_alpha": 0.7, "distill_temperature": 4.0},
)


def one_at_a_time(model: str | None = None, device: str = "auto", *, study_dir: str | None = None,
                  progress: Progress | None = None, configs: list[dict] | None = None,
                  **settings) -> dict:
    """Baseline, then each technique at its common setting (``COMMON``), with ratios.

    ``configs`` replaces ``COMMON`` (each a partial dict of knob values). A value this
    hardware does not offer is reported with the space's reason (``max-autotune`` falls back
    to its ``-no-cudagraphs`` variant on CPU). ``settings`` are measurement settings.
    """
    hw = hardware.detect(device)
    workload = build(WorkloadRef(model=model or DEFAULT_MODEL, data=None, cwd=str(Path.cwd())))
    lr = settings.get("lr") or space.DEFAULT_LR
    with tempfile.TemporaryDirectory(prefix="advisor-knobs-") as tmp:
        root = Path(study_dir or tmp)
        ref = WorkloadRef(model=model or DEFAULT_MODEL, data=None, cwd=str(Path.cwd()))
        cache = root / "cache" / "knobs"
        core.prepare_cache(workload, ref, cache)
        search = space.build(hw, workload.model, workload.batch_size, core.probe_inputs(cache),
                             lr=lr, keep=workload.keep, lengths=core.sample_lengths(workload, cache))
        runnable, skipped = [], []
        for config in (configs if configs is not None else COMMON):
            config = dict(config)
            if config.get("compile") == "max-autotune" and "max-autotune" not in search.compile:
                config["compile"] = "max-autotune-no-cudagraphs"
            try:
                search.check_values(config)
            except AdvisorError as exc:
                skipped.append({"config": _label(config), "ok": False, "reason": f"not offered: {exc}"})
                continue
            runnable.append(config)
        base = space.Knobs(lr=lr).to_dict()
        url = f"sqlite:///{root / 'knobs.db'}"
        full = [{**base, **c} for c in runnable]
        options = core.RunOptions(model=model, device=device, trials=len(full), enqueue=full,
                                  storage=url, cache_dir=str(root / "cache"), study="knobs",
                                  sampler="random", seed=0, **settings)
        core.run(options, progress or Progress(len(full)))
        study = optuna.load_study(study_name="knobs", storage=storage.open_storage(url))
        baseline = study.user_attrs["baseline"]
        rows = [_knob_row("baseline (fp32 eager)", baseline, baseline, ok=True)]
        for t, config in zip(study.trials, runnable, strict=True):
            label = _label(config)
            if t.state == TrialState.COMPLETE:
                rows.append(_knob_row(label, t.user_attrs["result"], baseline, ok=True))
            else:
                rows.append({"config": label, "ok": False,
                             "reason": t.user_attrs.get("failure", {}).get("reason", str(t.state))})
    return {"hardware": hw.to_dict(), "workload": workload.name,
            "settings": study.user_attrs["settings"], "rows": rows + skipped}


def _label(config: dict) -> str:
    """``prune=structured:0.5 + quantization=int8-static + kd=T4/a0.7``: the knobs changed."""
    parts = []
    for name, value in config.items():
        if name == "prune_kind":
            ratio = config.get("prune_ratio")
            parts.append(f"prune={value}" + (f":{ratio:g}" if ratio else ""))
        elif name == "distill_alpha":
            parts.append(f"kd=T{config.get('distill_temperature', 4.0):g}/a{value:g}")
        elif name not in ("prune_ratio", "distill_temperature"):
            parts.append(f"{name}={value}")
    return " + ".join(parts)


def _knob_row(label: str, result: dict, baseline: dict, *, ok: bool) -> dict:
    def pair(value: float, base: float) -> dict:
        return {"value": value, "ratio": value / base if base else None}

    m, b = result["metrics"], baseline["metrics"]
    return {
        "config": label, "ok": ok,
        "throughput": pair(result["train"]["throughput"], baseline["train"]["throughput"]),
        "memory_mib": pair(m["memory_mib"], b["memory_mib"]),
        "latency_ms": pair(m["latency_ms"], b["latency_ms"]),
        "latency_spread": result["latency"]["spread"],
        "latency_batch1_ms": pair(result["latency_batch1"]["median_ms"],
                                  baseline["latency_batch1"]["median_ms"]),
        "size_mib": pair(m["size_mib"], b["size_mib"]),
        "compile_s": result["compile_s"],
        "accuracy": m["accuracy"], "accuracy_delta": m["accuracy"] - b["accuracy"],
    }


def render_knobs(report: dict) -> str:
    def cell(p: dict, fmt: str = ".3g") -> str:
        return f"{p['value']:{fmt}} ({p['ratio']:.2f}x)" if p["ratio"] is not None else f"{p['value']:{fmt}}"

    cols = ["config", "train samples/s", "memory MiB", "latency ms", "batch-1 ms", "size MiB",
            "compile s", "accuracy"]
    rows = []
    for r in report["rows"]:
        if not r["ok"]:
            rows.append([r["config"], f"FAILED: {r['reason']}", "", "", "", "", "", ""])
            continue
        rows.append([r["config"], cell(r["throughput"], ".0f"), cell(r["memory_mib"]),
                     f"{cell(r['latency_ms'])} ±{r['latency_spread'] * 50:.0f}%",
                     cell(r["latency_batch1_ms"]), cell(r["size_mib"]), f"{r['compile_s']:.1f}",
                     f"{r['accuracy']:.4f} ({r['accuracy_delta']:+.4f})"])
    hw, s = report["hardware"], report["settings"]
    head = (f"One knob at a time: {report['workload']} on {hw['device']} ({hw['name']}), "
            f"torch {hw['torch_version']}; {s['trial_steps']} fine-tune steps per trial, "
            f"latency at batch {s['latency_batch']}; ratios to the baseline")
    return head + "\n" + table(cols, rows, right=set(range(1, 8)))


# The same work for every worker count: plain and compressed trials of the default workload.
WORKER_CONFIGS = (
    {}, {"precision": "bf16"}, {"accumulation": 4}, {"prune_kind": "structured", "prune_ratio": 0.5},
    {"quantization": "int8-dynamic"}, {"distill_alpha": 0.7, "distill_temperature": 4.0},
    {"prune_kind": "unstructured", "prune_ratio": 0.3}, {"checkpoint_every": 1},
)


def workers(trials: int = 8, counts: tuple[int, ...] = (1, 2), progress: Progress | None = None,
            **settings) -> dict:
    """Trials per hour of the default workload with 1 and 2 local workers, doing the same
    trials (``WORKER_CONFIGS``, eager, so no run pays a compiler the other does not), and the
    share of the workers' time spent waiting on the storage (asking and telling, including
    the wait for the lock that serializes them)."""
    base = space.Knobs().to_dict()
    configs = [{**base, **WORKER_CONFIGS[i % len(WORKER_CONFIGS)]} for i in range(trials)]
    rows = []
    for n in counts:
        with tempfile.TemporaryDirectory(prefix="advisor-workers-") as tmp:
            root = Path(tmp)
            options = core.RunOptions(trials=trials, workers=n, enqueue=configs, sampler="random", seed=0,
                                      storage=f"sqlite:///{root / 'workers.db'}",
                                      cache_dir=str(root / "cache"), study="workers", **settings)
            result = core.run(options, progress or Progress(trials))
        busy = sum(t["ask_s"] + t["process_s"] + t["store_s"] for t in result.timings)
        waiting = sum(t["ask_s"] + t["store_s"] for t in result.timings)
        rows.append({
            "workers": n, "trials": len(result.timings), "completed": result.completed,
            "loop_s": result.loop_s, "trials_per_hour": 3600 * len(result.timings) / result.loop_s,
            "storage_wait_share": waiting / (n * result.loop_s), "busy_share": busy / (n * result.loop_s),
            "median_trial_s": statistics.median(t["process_s"] for t in result.timings),
        })
    first = rows[0]["trials_per_hour"]
    for r in rows:
        r["speedup"] = r["trials_per_hour"] / first
    return {"hardware": hardware.detect("auto").to_dict(), "rows": rows}


def render_workers(report: dict) -> str:
    cols = ["workers", "trials", "loop s", "trials/hour", "speedup", "median trial s",
            "waiting on storage", "workers busy"]
    rows = [[str(r["workers"]), str(r["trials"]), f"{r['loop_s']:.1f}", f"{r['trials_per_hour']:.0f}",
             f"{r['speedup']:.2f}x", f"{r['median_trial_s']:.2f}", f"{100 * r['storage_wait_share']:.1f}%",
             f"{100 * r['busy_share']:.0f}%"] for r in report["rows"]]
    hw = report["hardware"]
    head = (f"Local workers on {hw['device']} ({hw['name']}, {hw['cores']} cores), default workload, "
            f"the same eager trials per run; each worker on its own cores")
    return head + "\n" + table(cols, rows, right=set(range(8)))
