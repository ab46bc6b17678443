"""Search efficiency, live: real studies of the full space, no grid and no frozen noise.

The tabular benchmark (``search.py``) replays samplers over configurations measured once;
this runs ``seeds`` real studies per sampler and the one-technique-at-a-time recipe as a
study of its own, scored the same way (``search.curve``, ``search.hypervolume``). Slow: every
trial is real, so few seeds.
"""

from __future__ import annotations

from pathlib import Path

from advisor import objectives
from advisor.bench.knobs import COMMON, label
from advisor.bench.offered import split_offered, workload_space
from advisor.bench.progress import Progress, silent
from advisor.bench.search import SEARCH_REFERENCE, curve, dominates, hv_rows, hypervolume, signed_ratios, spread
from advisor.knobs import Knobs
from advisor.study import RunOptions, StudyRecord, load, run
from advisor.techniques.schedule import DEFAULT_LR
from advisor.texttable import table


def live(model: str | None = None, device: str = "auto", *, study_dir: str,
         samplers: tuple[str, ...] = ("tpe", "random"), seeds: int = 2, trials: int = 30,
         budgets: tuple[int, ...] = (10, 20, 30), progress: Progress = silent, **settings) -> dict:
    """The comparison with real studies of the full space, no grid: ``seeds`` studies of
    ``trials`` trials per sampler, and the one-technique-at-a-time recipe as a study of its
    own. Slow (every trial is real), so few seeds; resumable like any study."""
    root = Path(study_dir)
    root.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{root / 'live.db'}"
    steps = tuple(sorted(b for b in set(budgets) | set(range(5, trials + 1, 5)) if b <= trials))
    runs, trial_s = {}, 0.0
    for name in samplers:
        curves, tails = [], []
        for seed in range(seeds):
            study = _live_study(model, device, url, root, f"live-{name}-{seed}", trials, progress,
                                sampler=name, seed=seed, **settings)
            rows, base = _trial_rows(study)
            curves.append(curve(rows, base, steps))
            tails.append([r["values"] if r["ok"] else None for r in rows])
            trial_s += sum(r["seconds"] for r in rows)
        runs[name] = {"seeds": seeds, "curves": curves, "values": tails}
    # Whole configurations: the baseline's knobs with one technique changed (a partial one
    # would let the sampler fill the rest at random), as far as this machine offers them.
    lr = settings.get("lr") or DEFAULT_LR
    _, _, search = workload_space(model, device, root / "cache" / "offered", lr)
    offered, left_out = split_offered(COMMON, search)
    configs = [{**Knobs(lr=lr).to_dict(), **c} for c in offered]
    oat = _live_study(model, device, url, root, "live-one-at-a-time", len(configs), progress,
                      sampler="random", seed=0, enqueue=configs, **settings)
    oat_rows, oat_base = _trial_rows(oat)
    trial_s += sum(r["seconds"] for r in oat_rows)
    oat_ok = [r for r in oat_rows if r["ok"]]
    oat_values = [oat_base] + [r["values"] for r in oat_ok]
    summary = {name: {b: spread([c[b] for c in r["curves"]]) for b in steps} for name, r in runs.items()}
    dominated = {}
    if "tpe" in runs:
        for b in budgets:
            # OAT configurations the default sampler's first b trials do not dominate, per seed.
            dominated[str(b)] = [[r["knobs"] for r in oat_ok
                                  if not any(v and dominates(v, r["values"]) for v in values[:b])]
                                 for values in runs["tpe"]["values"]]
    return {
        "mode": "live", "workload": oat.workload["name"],
        "hardware": oat.hardware, "settings": oat.settings,
        "reference": SEARCH_REFERENCE, "budgets": [b for b in budgets if b <= trials], "steps": list(steps),
        "samplers": {name: {"seeds": r["seeds"], "hypervolume": {str(b): summary[name][b] for b in steps}}
                     for name, r in runs.items()},
        # "failed": the recipe's configurations that gave no measurement: failed trials, and
        # those this machine does not offer ("not_offered", with the space's reason).
        "one_at_a_time": {"trials": len(oat_values), "hypervolume": hypervolume(
            [signed_ratios(v, oat_base) for v in oat_values]),
            "failed": sum(not r["ok"] for r in oat_rows) + len(left_out),
            "not_offered": [{"config": label(c), "reason": why} for c, why in left_out]},
        "tpe_dominates_one_at_a_time": {"of": len(oat_ok), "escaped_per_seed": dominated},
        "trials_s": trial_s,  # the trials' own durations, over every run that made them
    }


def _live_study(model, device, url: str, root: Path, name: str, trials: int, progress, **options):
    run_options = RunOptions(model=model, device=device, trials=trials, study_trials=trials,
                                  storage=url, cache_dir=str(root / "cache"), study=name,
                                  early_stop=False, warm_start=False, **options)  # samplers compared cold
    run(run_options, progress(trials))
    return load(name, url)


def _trial_rows(record: StudyRecord) -> tuple[list[dict], list[float]]:
    """A finished study's trials in order (failed ones count against the budget)."""
    rows = [{"ok": t.state == "complete", "values": t.values, "knobs": t.describe(), "seconds": t.seconds}
            for t in record.trials if t.state in ("complete", "fail")]
    return rows, objectives.values(record.baseline_metrics)


def render(report: dict) -> str:
    hw, s, ref = report["hardware"], report["settings"], report["reference"]
    cols = ["method", "seeds"] + [f"HV @{b}" for b in report["budgets"]]
    lines = [
        f"Search efficiency, live studies of the full space: {report['workload']} on {hw['device']} "
        f"({hw['name']}), torch {hw['torch_version']}; {s['trial_steps']} fine-tune steps, latency at "
        f"batch {s['latency_batch']}; {report['trials_s'] / 60:.0f} min of trials",
        f"Hypervolume of the front after N trials, median [25th-75th percentile] over seeds; "
        f"objectives / each study's baseline, reference: accuracy {ref['accuracy']:g}x, latency, "
        f"memory, size {ref['latency_ms']:g}x",
        table(cols, hv_rows(report), right=set(range(1, len(cols)))),
    ]
    for skipped in report["one_at_a_time"].get("not_offered", []):
        lines.append(f"one-at-a-time configuration not offered here: {skipped['config']} ({skipped['reason']})")
    dom = report["tpe_dominates_one_at_a_time"]
    for b, escaped in dom["escaped_per_seed"].items():
        shares = ", ".join(f"{dom['of'] - len(e)}/{dom['of']}" for e in escaped)
        names = sorted({k for e in escaped for k in e})
        lines.append(f"one-at-a-time configurations dominated by the default sampler's first {b} "
                     f"trials: {shares} (per seed)" + (f"; not dominated: {'; '.join(names)}" if names else ""))
    return "\n".join(lines)
