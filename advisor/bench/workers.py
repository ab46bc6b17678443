"""Local workers: trials per hour with 1 and 2 workers doing the same trials."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from advisor import hardware
from advisor.bench.knobs import label
from advisor.bench.offered import split_offered, workload_space
from advisor.bench.progress import Progress, silent
from advisor.knobs import Knobs
from advisor.study import RunOptions, run
from advisor.techniques.schedule import DEFAULT_LR
from advisor.texttable import table

# The same work for every worker count: plain and compressed trials of the default workload.
WORKER_CONFIGS = (
    {}, {"precision": "bf16"}, {"accumulation": 4}, {"prune_kind": "structured", "prune_ratio": 0.5},
    {"quantization": "int8-dynamic"}, {"distill_alpha": 0.7, "distill_temperature": 4.0},
    {"prune_kind": "unstructured", "prune_ratio": 0.3}, {"checkpoint_every": 1},
)


def workers(trials: int = 8, counts: tuple[int, ...] = (1, 2), progress: Progress = silent,
            **settings) -> dict:
    """Trials per hour of the default workload with 1 and 2 local workers, doing the same
    trials (``WORKER_CONFIGS``, eager, so no run pays a compiler the other does not), and the
    share of the workers' time spent waiting on the storage (asking and telling, including
    the wait for the lock that serializes them). Configurations this machine does not offer
    (bf16 on a CPU without fast bf16 kernels) are left out, and named in the report."""
    with tempfile.TemporaryDirectory(prefix="advisor-workers-") as tmp:
        lr = settings.get("lr") or DEFAULT_LR
        _, _, search = workload_space(None, "auto", Path(tmp) / "cache", lr)
    offered, left_out = split_offered(WORKER_CONFIGS, search)
    base = Knobs(lr=lr).to_dict()
    configs = [{**base, **offered[i % len(offered)]} for i in range(trials)]
    rows = []
    for n in counts:
        with tempfile.TemporaryDirectory(prefix="advisor-workers-") as tmp:
            root = Path(tmp)
            options = RunOptions(trials=trials, workers=n, enqueue=configs, sampler="random", seed=0,
                                 storage=f"sqlite:///{root / 'workers.db'}",
                                 cache_dir=str(root / "cache"), study="workers", early_stop=False,
                                 **settings)
            result = run(options, progress(trials))
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
    return {"hardware": hardware.detect("auto").to_dict(), "rows": rows,
            "not_offered": [{"config": label(c), "reason": why} for c, why in left_out]}


def render_workers(report: dict) -> str:
    cols = ["workers", "trials", "loop s", "trials/hour", "speedup", "median trial s",
            "waiting on storage", "workers busy"]
    rows = [[str(r["workers"]), str(r["trials"]), f"{r['loop_s']:.1f}", f"{r['trials_per_hour']:.0f}",
             f"{r['speedup']:.2f}x", f"{r['median_trial_s']:.2f}", f"{100 * r['storage_wait_share']:.1f}%",
             f"{100 * r['busy_share']:.0f}%"] for r in report["rows"]]
    hw = report["hardware"]
    head = (f"Local workers on {hw['device']} ({hw['name']}, {hw['cores']} cores), default workload, "
            f"the same eager trials per run; each worker on its own cores")
    left_out = [f"\nleft out, not offered here: {x['config']} ({x['reason']})"
                for x in report.get("not_offered", [])]
    return head + "\n" + table(cols, rows, right=set(range(8))) + "".join(left_out)
