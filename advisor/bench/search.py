"""Search efficiency: how much better than random search and one-technique-at-a-time?

Live trials cost seconds to minutes each, so comparing samplers over many seeds live is out
of reach on a small machine. This is a *tabular benchmark*: every configuration of a reduced
grid of the real search space is measured once, by real trials of the real workload
(``measure_table``), and then each sampler is replayed over the table (``compare``): it asks
for knobs through the same ``Space.suggest`` a study uses, and is told the measured values of
that configuration. A replayed study of 100 trials costs milliseconds (GP: minutes), so
samplers can be compared over many seeds with no model of the objectives in between.

Limits, stated with the results: the grid is a subset of the space (``GRID``: fewer values
per knob, a fixed learning rate, no ``torch.compile``, whose trials cost minutes on a CPU);
each configuration was measured once, so its noise is frozen into the table; a sampler that
asks for a configuration twice gets the same values, where a live study would re-measure.

Hypervolume: each trial's objectives are divided by the baseline's, maximized ones negated
(``signed_ratios``), so every objective is minimized and the baseline sits at (-1, 1, 1, 1).
The reference point is ``SEARCH_REFERENCE``: 80% of the baseline's accuracy and twice its
latency, memory and size. A trial outside that box adds nothing. The baseline alone scores
0.2 * 1 * 1 * 1 = 0.2. (The dashboard's convergence curve uses cost ratios and a box of its
own, ``dashboard/content.py``; the two figures are not comparable.)
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from advisor import objectives, space
from advisor.bench.knobs import COMMON
from advisor.bench.offered import workload_space
from advisor.bench.progress import Progress, silent
from advisor.errors import AdvisorError
from advisor.knobs import Knobs
from advisor.study import SAMPLERS, RunOptions, load, run
from advisor.study.options import make_sampler
from advisor.techniques.schedule import DEFAULT_LR
from advisor.texttable import table

BUDGETS = (10, 20, 30, 50, 100)
# Reference point in baseline-normalized, all-minimized objectives (accuracy negated).
SEARCH_REFERENCE = objectives.HYPERVOLUME_BOX
# The reduced grid: each knob's values, intersected with what the hardware offers.
GRID = {
    "precision": ("fp32", "bf16"),
    "accumulation": (1, 4),
    "checkpoint_every": (0, 1),
    "compile": ("none",),
    "prune_kind": ("none", "unstructured", "structured"),
    "prune_ratio": (0.3, 0.5, 0.2),
    "quantization": ("none", "int8-dynamic", "int8-static", "qat-int8"),
    "distill_alpha": (0.0, 0.7, 0.7),
    "distill_temperature": (4.0, 4.0, 0.5),
}
TABLE_STUDY = "search-table"
TABLE_FORMAT = 2  # 2: each row also holds its rung points and what its trial cost


def grid_space(full: space.Space, lr: float, grid: dict | None = None) -> space.Space:
    """``full`` narrowed to ``grid`` (default ``GRID``) with a fixed ``lr``: a finite space
    ``Space.grid()`` can list."""
    grid = grid or GRID
    narrowed = {name: tuple(v for v in grid[name] if v in getattr(full, name))
                for name in ("precision", "accumulation", "checkpoint_every", "compile",
                             "prune_kind", "quantization")}
    return full.narrowed(lr=(lr, lr), prune_ratio=tuple(grid["prune_ratio"]),
                         distill_alpha=tuple(grid["distill_alpha"]),
                         distill_temperature=tuple(grid["distill_temperature"]),
                         quant_protect=(), prune_alloc=(), **narrowed)  # the table predates per-layer knobs


def key(knobs: dict) -> str:
    """A configuration's identity in the table, the same however it was produced."""
    k = Knobs.from_dict(knobs)
    return k.describe()


def one_at_a_time_configs(grid: space.Space) -> list[dict]:
    """The one-technique-at-a-time recipe (``COMMON``) as far as the grid holds it."""
    keys = {key(k.to_dict()) for k in grid.grid()}
    base = Knobs(lr=grid.lr[0]).to_dict()
    return [c for c in COMMON if key({**base, **c}) in keys]


def measure_table(model: str | None = None, device: str = "auto", *, study_dir: str,
                  grid: dict | None = None, workers: int = 1, progress: Progress = silent,
                  **settings) -> dict:
    """Measure every grid configuration once with real trials; resumable.

    The trials live in an ordinary study (``search-table``) in ``study_dir``; a rerun
    measures only the configurations still missing, so an interrupted build loses nothing.
    They run with the rungs observed (``early_stop="observe"``): each measures its accuracy
    at every rung, and its cheap objectives before the fine-tune where early stopping would,
    but none is stopped, so a replay can apply the rung rule afterwards (``replay``).
    """
    root = Path(study_dir)
    root.mkdir(parents=True, exist_ok=True)
    lr = settings.get("lr") or DEFAULT_LR
    hw, workload, full = workload_space(model, device, root / "cache" / "grid", lr)
    values = grid or GRID
    grid = grid_space(full, lr, values)
    configs = [k.to_dict() for k in grid.grid()]
    url = f"sqlite:///{root / 'table.db'}"
    done = _measured(url)
    todo = [c for c in configs if key(c) not in done]
    if todo:
        options = RunOptions(model=model, device=device, trials=len(todo), enqueue=todo,
                                  storage=url, cache_dir=str(root / "cache"), study=TABLE_STUDY,
                                  sampler="random", seed=0, early_stop="observe", workers=workers,
                                  **settings)
        run(options, progress(len(todo)))
    record = load(TABLE_STUDY, url)
    rows = {}
    for t in record.trials:
        if t.state not in ("complete", "fail"):
            continue
        knobs = t.knobs.to_dict()
        row = {"knobs": knobs, "trial": t.number, "ok": t.state == "complete", **costs(t)}
        if row["ok"]:
            # What the study told Optuna (the batch latency on the baseline's clock: its paired
            # ratio times the baseline's), and whether it meets the study's constraints.
            row["values"] = objectives.told(t.result, record.baseline_metrics)
            row["feasible"] = not record.constraints.misses(t.metrics, record.baseline_metrics)
        else:
            row["reason"] = t.failure.get("reason", "failed")
        rows[key(knobs)] = row
    missing = [c for c in configs if key(c) not in rows]
    if missing:
        raise AdvisorError(f"{len(missing)} grid configurations have no measurement in {url}; "
                           "rerun the same command to measure them")
    return {
        "format": TABLE_FORMAT, "workload": workload.name, "hardware": hw.to_dict(),
        "settings": record.settings, "grid": values, "space": grid.to_dict(),
        "lr": lr, "baseline": objectives.values(record.baseline_metrics),
        "baseline_metrics": dict(record.baseline_metrics), "constraints": record.constraints.to_dict(),
        "rows": [rows[key(c)] for c in configs],
        "one_at_a_time": [{**Knobs(lr=lr).to_dict(), **c} for c in one_at_a_time_configs(grid)],
        "measure_s": sum((t.seconds for t in record.trials), 0.0),
    }


def costs(t) -> dict:
    """What a table row needs to replay the rung rule over it, and what its trial cost.

    ``seconds``: the trial's wall time, from asking for it to storing it, rungs included;
    ``rung_s``: the part spent measuring accuracy at the rungs, which a study without early
    stopping does not spend; ``rungs``: its points (``Point.to_dict`` and ``seconds``, the
    trial's wall time up to and including that point: what stopping it there costs);
    ``cheap``: the cheap objectives as the rung rule sees them (``latency_ms``, its own;
    ``size_mib``; ``latency_ratio``, paired)."""
    result = t.result or {}
    cheap = {}
    if result:
        cheap = {"latency_ms": result["metrics"]["latency_ms"], "size_mib": result["metrics"]["size_mib"]}
        ratio = result.get("paired", {}).get("latency", {}).get("ratio")
        if ratio is not None:
            cheap["latency_ratio"] = ratio
    return {"seconds": t.seconds, "rung_s": result.get("phases", {}).get("rung", 0.0),
            "rungs": [dict(r) for r in t.rungs], "cheap": cheap}


def _measured(url: str) -> set[str]:
    path = url.removeprefix("sqlite:///")
    if not Path(path).exists():
        return set()
    try:
        record = load(TABLE_STUDY, url)
    except AdvisorError:  # no table study in it yet
        return set()
    return {key(t.params) for t in record.trials if t.state in ("complete", "fail")}


def signed_ratios(values: list[float], baseline: list[float]) -> np.ndarray:
    """Objectives over the baseline's, maximized ones negated: all minimized."""
    out = []
    for o, v, b in zip(objectives.OBJECTIVES, values, baseline, strict=True):
        out.append(-v / b if o.direction == "maximize" else v / b)
    return np.array(out)


def reference() -> np.ndarray:
    return np.array([-SEARCH_REFERENCE[o.name] if o.direction == "maximize" else SEARCH_REFERENCE[o.name]
                     for o in objectives.OBJECTIVES])


def hypervolume(points: list[np.ndarray]) -> float:
    """Hypervolume dominated by ``points`` (``signed_ratios``) inside the reference box."""
    return objectives.hypervolume(points, reference())


def dominates(a: list[float], b: list[float]) -> bool:
    """Objective values ``a`` (in the study's order) dominate ``b``."""
    return objectives.dominates(dict(zip(objectives.NAMES, a, strict=True)),
                                dict(zip(objectives.NAMES, b, strict=True)))


def front(values: list[list[float]]) -> list[int]:
    return [i for i, v in enumerate(values) if not any(dominates(w, v) for w in values)]


def replay(table: dict, sampler: str, seed: int, budget: int) -> list[dict]:
    """One sampler's study of ``budget`` trials over the table: per trial, its row."""
    grid = grid_from(table)
    rows = {key(r["knobs"]): r for r in table["rows"]}
    study = optuna.create_study(directions=objectives.DIRECTIONS,
                                sampler=make_sampler(sampler, seed))
    asked = []
    for _ in range(budget):
        trial = study.ask()
        row = rows[key(grid.suggest(trial).to_dict())]
        if row["ok"]:
            study.tell(trial, row["values"])
        else:
            study.tell(trial, state=TrialState.FAIL)
        asked.append(row)
    return asked


def grid_from(table: dict) -> space.Space:
    s = table["space"]
    return space.Space(
        values={"precision": tuple(s["precision"]), "accumulation": tuple(s["accumulation"]),
                "checkpoint_every": tuple(s["checkpoint_every"]), "compile": tuple(s["compile"]),
                "lr": (table["lr"], table["lr"]), "prune_kind": tuple(s["prune_kind"]),
                "quantization": tuple(s["quantization"]),
                "prune_ratio": tuple(table["grid"]["prune_ratio"]),
                "distill_alpha": tuple(table["grid"]["distill_alpha"]),
                "distill_temperature": tuple(table["grid"]["distill_temperature"])},
        excluded=(), blocks=s["blocks"])


def curve(rows: list[dict], baseline: list[float], budgets: tuple[int, ...]) -> dict[int, float]:
    """Hypervolume of the first ``b`` trials' front, for each budget ``b``."""
    points = [signed_ratios(r["values"], baseline) if r["ok"] else None for r in rows]
    return {b: hypervolume([p for p in points[:b] if p is not None]) for b in budgets}


def compare(table: dict, samplers: tuple[str, ...] = SAMPLERS, seeds: int = 10, gp_seeds: int = 3,
            budgets: tuple[int, ...] = BUDGETS, progress=None) -> dict:
    """Replay each sampler over the table for several seeds; hypervolume per budget."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per replayed study otherwise
    baseline = table["baseline"]
    top = max(budgets)
    steps = tuple(sorted(set(budgets) | set(range(5, top + 1, 5))))
    runs = {}
    for name in samplers:
        n = gp_seeds if name == "gp" else seeds
        started = time.perf_counter()
        curves, fronts = [], []
        for seed in range(n):
            asked = replay(table, name, seed, top)
            curves.append(curve(asked, baseline, steps))
            fronts.append({b: _front_rows(asked[:b]) for b in budgets})
            if progress:
                progress(f"{name} seed {seed}: hypervolume at {top} trials {curves[-1][top]:.3f}")
        runs[name] = {"seeds": n, "curves": curves, "fronts": fronts,
                      "replay_s": time.perf_counter() - started}
    oat = _one_at_a_time(table)
    summary = {name: {b: spread([c[b] for c in r["curves"]]) for b in steps}
               for name, r in runs.items()}
    report = {
        "mode": "table",
        "workload": table["workload"], "hardware": table["hardware"], "settings": table["settings"],
        "grid": table["grid"], "grid_size": len(table["rows"]),
        "failed_in_grid": sum(not r["ok"] for r in table["rows"]),
        "reference": SEARCH_REFERENCE, "baseline_hypervolume": hypervolume([signed_ratios(baseline, baseline)]),
        "budgets": list(budgets), "steps": list(steps),
        "samplers": {name: {"seeds": r["seeds"], "replay_s": r["replay_s"],
                            "hypervolume": {str(b): summary[name][b] for b in steps}}
                     for name, r in runs.items()},
        "one_at_a_time": oat,
        "grid_hypervolume": hypervolume([signed_ratios(r["values"], baseline)
                                         for r in table["rows"] if r["ok"]]),
    }
    report["goals"] = _goals(runs, summary, oat, table)
    return report


def _front_rows(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if r["ok"]]
    return sorted({key(ok[i]["knobs"]) for i in front([r["values"] for r in ok])})


def spread(xs: list[float]) -> dict:
    q = np.percentile(xs, [25, 75]) if len(xs) > 1 else [xs[0], xs[0]]
    return {"median": statistics.median(xs), "q25": float(q[0]), "q75": float(q[1]),
            "min": min(xs), "max": max(xs), "n": len(xs)}


def _one_at_a_time(table: dict) -> dict:
    rows = {key(r["knobs"]): r for r in table["rows"]}
    base = space.Knobs(lr=table["lr"]).to_dict()
    chosen = [rows[key(base)]] + [rows[key(c)] for c in table["one_at_a_time"]]
    ok = [r for r in chosen if r["ok"]]
    return {"trials": len(chosen), "configs": [key(r["knobs"]) for r in chosen],
            "hypervolume": hypervolume([signed_ratios(r["values"], table["baseline"]) for r in ok]),
            "failed": [key(r["knobs"]) for r in chosen if not r["ok"]]}


def _goals(runs: dict, summary: dict, oat: dict, table: dict) -> dict:
    goals = {}
    if "tpe" in summary and "random" in summary and 30 in summary["tpe"] and 100 in summary["random"]:
        tpe30, rnd100 = summary["tpe"][30]["median"], summary["random"][100]["median"]
        goals["tpe30_vs_random100"] = {"tpe_30_median": tpe30, "random_100_median": rnd100,
                                       "met": tpe30 >= rnd100}
    if "tpe" in runs:
        rows = {key(r["knobs"]): r for r in table["rows"]}
        oat_rows = [rows[c] for c in oat["configs"] if rows[c]["ok"]]
        for b in (30, 100):
            if b not in runs["tpe"]["fronts"][0]:
                continue
            escaped = []
            for seed, fronts in enumerate(runs["tpe"]["fronts"]):
                on_front = set(fronts[b])
                values = [rows[k]["values"] for k in on_front]
                for r in oat_rows:
                    k = key(r["knobs"])
                    if k not in on_front and not any(dominates(v, r["values"]) for v in values):
                        escaped.append({"seed": seed, "config": k})
            seeds_met = len(runs["tpe"]["fronts"]) - len({e["seed"] for e in escaped})
            goals[f"tpe{b}_front_dominates_one_at_a_time"] = {
                "seeds_met": seeds_met, "seeds": len(runs["tpe"]["fronts"]),
                "met": not escaped, "escaped": escaped}
    return goals


def render(report: dict) -> str:
    budgets = report["budgets"]
    cols = ["method", "seeds"] + [f"HV @{b}" for b in budgets]
    rows = hv_rows(report)
    hw, s = report["hardware"], report["settings"]
    ref = report["reference"]
    lines = [
        f"Search efficiency over a measured grid: {report['workload']} on {hw['device']} "
        f"({hw['name']}), torch {hw['torch_version']}; {report['grid_size']} configurations "
        f"({report['failed_in_grid']} failed), each measured once ({s['trial_steps']} fine-tune "
        f"steps, latency at batch {s['latency_batch']})",
        f"Hypervolume of the front after N trials, median [25th-75th percentile] over seeds; "
        f"objectives / baseline, reference: accuracy {ref['accuracy']:g}x, latency, memory, size "
        f"{ref['latency_ms']:g}x; baseline alone {report['baseline_hypervolume']:.3f}, whole grid "
        f"{report['grid_hypervolume']:.3f}",
        table(cols, rows, right=set(range(1, len(cols)))),
    ]
    g = report["goals"]
    if "tpe30_vs_random100" in g:
        x = g["tpe30_vs_random100"]
        lines.append(f"goal: default sampler at 30 trials {x['tpe_30_median']:.3f} vs random at 100 "
                     f"{x['random_100_median']:.3f} (median): {'met' if x['met'] else 'NOT met'}")
    for b in (30, 100):
        x = g.get(f"tpe{b}_front_dominates_one_at_a_time")
        if x:
            escaped = sorted({e["config"] for e in x["escaped"]})
            lines.append(f"goal: the default sampler's front at {b} trials holds or dominates every "
                         f"one-at-a-time configuration in {x['seeds_met']}/{x['seeds']} seeds"
                         + (f"; escaped: {'; '.join(escaped)}" if escaped else ""))
    return "\n".join(lines)


def hv_rows(report: dict) -> list[list[str]]:
    rows = []
    for name, r in report["samplers"].items():
        cells = [f"{r['hypervolume'][str(b)]['median']:.3f} [{r['hypervolume'][str(b)]['q25']:.3f}-"
                 f"{r['hypervolume'][str(b)]['q75']:.3f}]" for b in report["budgets"]]
        rows.append([f"{name} (default)" if name == "tpe" else name, str(r["seeds"]), *cells])
    oat = report["one_at_a_time"]
    rows.append([f"one at a time ({oat['trials']} trials)", "-"]
                + [f"{oat['hypervolume']:.3f}" if b >= oat["trials"] else "" for b in report["budgets"]])
    return rows
