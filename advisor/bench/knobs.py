"""One technique at a time: the baseline, then each technique alone at its common setting,
the way a tutorial would try techniques one by one (``one_at_a_time()``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from advisor.bench.offered import split_offered, workload_space
from advisor.bench.progress import Progress, silent
from advisor.knobs import Knobs
from advisor.space import Space
from advisor.study import RunOptions, load, run
from advisor.techniques.schedule import DEFAULT_LR
from advisor.texttable import table

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
                  progress: Progress = silent,
                  configs: list[dict] | Callable[[Space], list[dict]] | None = None,
                  **settings) -> dict:
    """Baseline, then each technique at its common setting (``COMMON``), with ratios.

    ``configs`` replaces ``COMMON`` (each a partial dict of knob values), or makes them from
    the workload's search space. A value this
    hardware does not offer is reported with the space's reason (``max-autotune`` falls back
    to its ``-no-cudagraphs`` variant on CPU). ``settings`` are measurement settings.
    """
    lr = settings.get("lr") or DEFAULT_LR
    with tempfile.TemporaryDirectory(prefix="advisor-knobs-") as tmp:
        root = Path(study_dir or tmp)
        hw, workload, search = workload_space(model, device, root / "cache" / "knobs", lr)
        wanted = configs(search) if callable(configs) else configs if configs is not None else COMMON
        runnable, left_out = split_offered(wanted, search)
        skipped = [{"config": label(config), "ok": False, "reason": f"not offered: {why}"}
                   for config, why in left_out]
        base = Knobs(lr=lr).to_dict()
        url = f"sqlite:///{root / 'knobs.db'}"
        full = [{**base, **c} for c in runnable]
        options = RunOptions(model=model, device=device, trials=len(full), enqueue=full,
                             storage=url, cache_dir=str(root / "cache"), study="knobs",
                             sampler="random", seed=0, early_stop=False, **settings)
        run(options, progress(len(full)))
        record = load("knobs", url)
        baseline = record.baseline
        rows = [_knob_row("baseline (fp32 eager)", baseline, baseline, ok=True)]
        for t, config in zip(record.trials, runnable, strict=True):
            name = label(config)
            if t.result is not None:
                rows.append(_knob_row(name, t.result, baseline, ok=True))
            else:
                rows.append({"config": name, "ok": False, "reason": t.failure.get("reason", t.state)})
    return {"hardware": hw.to_dict(), "workload": workload.name, "settings": record.settings,
            "rows": rows + skipped, "excluded": [e.to_dict() for e in search.excluded]}


def label(config: dict) -> str:
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
    def pair(value: float, base: float, paired: dict | None = None) -> dict:
        if paired:  # timed interleaved with the baseline's model (the baseline itself has none)
            return {"value": value, "ratio": paired["ratio"], "low": paired["low"], "high": paired["high"]}
        return {"value": value, "ratio": value / base if base else None}

    m, b = result["metrics"], baseline["metrics"]
    paired = result.get("paired", {})
    return {
        "config": label, "ok": ok,
        "throughput": pair(result["train"]["throughput"], baseline["train"]["throughput"]),
        "memory_mib": pair(m["memory_mib"], b["memory_mib"]),
        "latency_ms": pair(m["latency_ms"], b["latency_ms"], paired.get("latency")),
        "latency_spread": result["latency"]["spread"],
        "latency_batch1_ms": pair(result["latency_batch1"]["median_ms"],
                                  baseline["latency_batch1"]["median_ms"], paired.get("latency_batch1")),
        "size_mib": pair(m["size_mib"], b["size_mib"]),
        "compile_s": result["compile_s"],
        "accuracy": m["accuracy"], "accuracy_delta": m["accuracy"] - b["accuracy"],
        "parameters": pair(result["compression"]["parameters_after"],
                           baseline["compression"]["parameters_after"]),
        "compression": {k: result["compression"].get(k) for k in
                        ("heads_before", "heads_after", "heads_kept_whole", "quantized_layers",
                         "quantized_bytes", "sparsity") if result["compression"].get(k) is not None},
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
            f"latency at batch {s['latency_batch']}; ratios to the baseline (latency's paired: timed "
            f"interleaved with the baseline's model in the trial's process)")
    return head + "\n" + table(cols, rows, right=set(range(1, 8)))
