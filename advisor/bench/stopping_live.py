"""Early stopping and warm start live: real default studies side by side, in the same units
as the replay over the search table (``stopping.py``): seconds of trials, summed.

``live``: ``seeds`` default studies with early stopping and as many without. ``live_warm``:
each seed's default study warm-started from another seed's, against its own cold one.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import optuna

from advisor import objectives
from advisor.bench.progress import Progress, silent
from advisor.bench.search import hypervolume, signed_ratios, spread
from advisor.study import RunOptions, load, run
from advisor.texttable import table

# -- the live check: default studies with and without early stopping, side by side ----------

ARMS = {"on": True, "off": False}


def live(model: str | None = None, device: str = "auto", *, study_dir: str, seeds: int = 3, trials: int = 20,
         arms: tuple[str, ...] = ("on", "off"), progress: Progress = silent, **settings) -> dict | None:
    """``seeds`` default studies (the default sampler, ``trials`` trials) with early stopping
    and as many without, in ``study_dir``; resumable. Run one arm per process to measure them
    side by side (each pinned to its own cores), then both to report: None until every study
    of both arms holds its ``trials`` finished trials. A study that holds them is not resumed
    (so a report from another process, on other cores, runs nothing). The unit is the same
    as the table's: seconds of trials, summed; each run's wall time is kept too."""
    root = Path(study_dir)
    root.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{root / 'live.db'}"
    walls_file = root / "walls.json"
    stored = set(optuna.study.get_all_study_names(url))
    for arm in arms:
        for seed in range(seeds):
            name = f"{arm}-{seed}"
            if name in stored and len(_live_trials(load(name, url))) >= trials:
                continue
            _timed_run(RunOptions(model=model, device=device, trials=trials, study_trials=trials, storage=url,
                                  cache_dir=str(root / "cache"), study=name, sampler="tpe", seed=seed,
                                  early_stop=ARMS[arm], warm_start=False, **settings),  # arms stay apart
                       walls_file, progress)
    names = [f"{arm}-{seed}" for arm in ARMS for seed in range(seeds)]
    stored = set(optuna.study.get_all_study_names(url))  # again: this run may have added some
    if not all(n in stored for n in names):
        return None
    studies = {n: _live_trials(load(n, url)) for n in names}
    if any(len(t) < trials for t in studies.values()):
        return None  # a study of the other arm is still running (or was cut short): not comparable yet
    walls = _walls(walls_file)
    scale = statistics.median(studies[f"off-{s}"][-1]["spent"] for s in range(seeds))
    shares = (0.25, 0.5, 0.75, 1.0)
    out = {}
    for arm in ARMS:
        per_seed = [_seed_row(seed, studies[f"{arm}-{seed}"], walls.get(f"{arm}-{seed}"), scale, shares)
                    for seed in range(seeds)]
        out[arm] = {"seeds": per_seed,
                    "hypervolume": spread([p["hypervolume"] for p in per_seed]),
                    "trial_s": spread([p["trial_s"] for p in per_seed]),
                    "at_compute": {str(s): spread([p["at_compute"][str(s)] for p in per_seed]) for s in shares}}
    first = load(names[0], url)
    return {"mode": "live", "workload": first.workload["name"], "hardware": first.hardware,
            "settings": first.settings, "trials": trials, "scale_s": scale, "shares": list(shares),
            "arms": out, "goals": _live_goals(out)}


def _timed_run(options: RunOptions, walls_file: Path, progress: Progress) -> None:
    """Run a study, keeping its wall time in ``walls_file`` when it ran trials (a rerun of a
    study already complete keeps the time measured before)."""
    began = time.perf_counter()
    result = run(options, progress(options.trials))
    if result.completed + result.failed + result.stopped:
        walls = _walls(walls_file)
        walls[options.study] = time.perf_counter() - began
        walls_file.write_text(json.dumps(walls))


def _walls(walls_file: Path) -> dict:
    return json.loads(walls_file.read_text()) if walls_file.exists() else {}


def _seed_row(seed: int, trials: list[dict], wall_s: float | None, scale: float, shares) -> dict:
    """One study of a live check: its wall time, trial-seconds, stopped trials, hypervolume,
    and hypervolume within each share of ``scale`` seconds of trials."""
    return {"seed": seed, "wall_s": wall_s, "trial_s": trials[-1]["spent"],
            "stopped": sum(t["state"] == "pruned" for t in trials), "hypervolume": _live_hv(trials, float("inf")),
            "at_compute": {str(s): _live_hv(trials, s * scale) for s in shares}}


def _live_trials(record) -> list[dict]:
    """A study's trials in order with the compute spent so far and, for a completed one, its
    point (``signed_ratios`` of what it told Optuna) and whether it meets the constraints."""
    base = record.baseline_metrics
    spent, out = 0.0, []
    for t in record.trials:
        if t.state not in ("complete", "fail", "pruned"):
            continue
        spent += t.seconds
        row = {"state": t.state, "spent": spent}
        if t.state == "complete" and not record.constraints.misses(t.metrics, base):
            row["point"] = signed_ratios(objectives.told(t.result, base), objectives.values(base)).tolist()
        out.append(row)
    return out


def _live_hv(trials: list[dict], budget: float) -> float:
    return hypervolume([np.array(t["point"]) for t in trials if "point" in t and t["spent"] <= budget])


def _live_goals(arms: dict) -> dict:
    on, off = arms["on"]["seeds"], arms["off"]["seeds"]
    pairs = [{"seed": a["seed"], "wall_ratio": a["wall_s"] / b["wall_s"] if a["wall_s"] and b["wall_s"] else None,
              "hypervolume_on": a["hypervolume"], "hypervolume_off": b["hypervolume"]}
             for a, b in zip(on, off, strict=True)]
    return {"side_by_side": pairs,
            "wall_at_most_60pct_with_hv_at_least": all(p["wall_ratio"] is not None and p["wall_ratio"] <= 0.6
                                                       and p["hypervolume_on"] >= p["hypervolume_off"]
                                                       for p in pairs)}


def render_live(report: dict) -> str:
    hw = report["hardware"]
    lines = [f"Early stopping live: {report['workload']} on {hw['device']} ({hw['name']}), torch "
             f"{hw['torch_version']}; default studies of {report['trials']} trials, the default sampler, "
             f"seeds 0-{len(report['arms']['on']['seeds']) - 1}; HV of the feasible front (paired latency "
             f"ratios); 100% compute = the median trial-seconds without early stopping "
             f"({report['scale_s'] / 60:.1f} min)"]
    cols = ["early stopping", "seed", "wall", "trial-seconds", "stopped", "HV"] + [
        f"HV @{s:.0%}" for s in report["shares"]]
    rows = []
    for arm, a in report["arms"].items():
        for p in a["seeds"]:
            wall = f"{p['wall_s'] / 60:.1f} min" if p["wall_s"] else "-"
            rows.append([arm, str(p["seed"]), wall, f"{p['trial_s']:.0f}", str(p["stopped"]),
                         f"{p['hypervolume']:.3f}", *(f"{p['at_compute'][str(s)]:.3f}" for s in report["shares"])])
    lines.append(table(cols, rows, right=set(range(1, len(cols)))))
    for p in report["goals"]["side_by_side"]:
        ratio = f"{p['wall_ratio']:.2f}x" if p["wall_ratio"] is not None else "-"
        lines.append(f"seed {p['seed']}: wall with early stopping {ratio} of without; HV "
                     f"{p['hypervolume_on']:.3f} against {p['hypervolume_off']:.3f}")
    met = report["goals"]["wall_at_most_60pct_with_hv_at_least"]
    lines.append(f"goal: at most 60% of the wall time with an equal or higher HV, every seed: "
                 f"{'met' if met else 'NOT met'}")
    return "\n".join(lines)


# -- warm start live: a default study started from an earlier one, against it cold --------

def live_warm(model: str | None = None, device: str = "auto", *, study_dir: str, seeds: int = 3,
              trials: int = 20, progress: Progress = silent, **settings) -> dict | None:
    """Seed ``s``'s default study warm-started from the default study of seed ``s + 1``
    (``live``'s "on" arm in the same ``study_dir``: early stopping, no warm start), copied
    alone into a storage of its own so that it is the only earlier study there, against seed
    ``s``'s own "on" study, which started cold; resumable. None until the "on" arm holds its
    ``trials`` trials (run it first). The same units as ``live``: seconds of trials, summed,
    100% = the cold studies' median; the earlier study's compute is not charged (it was spent
    before, for its own sake)."""
    root = Path(study_dir)
    url = f"sqlite:///{root / 'live.db'}"
    stored = set(optuna.study.get_all_study_names(url)) if (root / "live.db").exists() else set()
    if not all(f"on-{s}" in stored for s in range(seeds)):
        return None
    cold = {s: _live_trials(load(f"on-{s}", url)) for s in range(seeds)}
    if any(len(t) < trials for t in cold.values()):
        return None
    walls_file = root / "walls.json"
    warmed = {}
    for seed in range(seeds):
        db = root / f"warm-{seed}.db"
        wurl, name = f"sqlite:///{db}", f"warm-{seed}"
        names = set(optuna.study.get_all_study_names(wurl)) if db.exists() else set()
        if "earlier" not in names:
            optuna.copy_study(from_study_name=f"on-{(seed + 1) % seeds}", from_storage=url, to_storage=wurl,
                              to_study_name="earlier")
        if name not in names or len(_live_trials(load(name, wurl))) < trials:
            _timed_run(RunOptions(model=model, device=device, trials=trials, study_trials=trials, storage=wurl,
                                  cache_dir=str(root / "cache"), study=name, sampler="tpe", seed=seed,
                                  early_stop=True, warm_start=True, **settings), walls_file, progress)
        record = load(name, wurl)
        warmed[seed] = (_live_trials(record), len(record.warm))
    walls = _walls(walls_file)
    scale = statistics.median(cold[s][-1]["spent"] for s in range(seeds))
    shares = (0.1, 0.25, 0.5, 0.75, 1.0)
    arms = {}
    for arm, per in (("cold", {s: (t, 0) for s, t in cold.items()}), ("warm", warmed)):
        rows = [{**_seed_row(seed, trials_, walls.get(f"on-{seed}" if arm == "cold" else f"warm-{seed}"),
                             scale, shares), "warm_trials": enqueued}
                for seed, (trials_, enqueued) in per.items()]
        arms[arm] = {"seeds": rows, "at_compute": {str(s): spread([r["at_compute"][str(s)] for r in rows])
                                                   for s in shares}}
    behind = [s for s in shares if arms["warm"]["at_compute"][str(s)]["median"]
              < arms["cold"]["at_compute"][str(s)]["median"]]
    first = load("on-0", url)
    return {"mode": "live-warm", "workload": first.workload["name"], "hardware": first.hardware,
            "trials": trials, "scale_s": scale, "shares": list(shares), "arms": arms,
            "goals": {"warm_never_behind": {"behind_at": behind, "met": not behind}}}


def render_live_warm(report: dict) -> str:
    hw = report["hardware"]
    lines = [f"Warm start live: {report['workload']} on {hw['device']} ({hw['name']}), torch "
             f"{hw['torch_version']}; default studies of {report['trials']} trials (early stopping on), "
             f"cold, and warm-started from the cold study of the next seed; HV of the feasible front; "
             f"100% compute = the cold studies' median trial-seconds ({report['scale_s'] / 60:.1f} min)"]
    shares = report["shares"]
    cols = ["start", "seed", "wall", "trial-seconds", "warm trials", "stopped", "HV"]
    cols += [f"HV @{s:.0%}" for s in shares]
    rows = []
    for arm, a in report["arms"].items():
        for p in a["seeds"]:
            wall = f"{p['wall_s'] / 60:.1f} min" if p["wall_s"] else "-"
            rows.append([arm, str(p["seed"]), wall, f"{p['trial_s']:.0f}", str(p["warm_trials"]),
                         str(p["stopped"]), f"{p['hypervolume']:.3f}",
                         *(f"{p['at_compute'][str(s)]:.3f}" for s in shares)])
    for arm, a in report["arms"].items():
        rows.append([f"{arm}, median", "", "", "", "", "", "",
                     *(f"{a['at_compute'][str(s)]['median']:.3f}" for s in shares)])
    lines.append(table(cols, rows, right=set(range(1, len(cols)))))
    g = report["goals"]["warm_never_behind"]
    lines.append("warm start at least as high as cold at every share of compute (medians): "
                 + ("yes" if g["met"] else "no, behind at " + ", ".join(f"{s:.0%}" for s in g["behind_at"])))
    return "\n".join(lines)
