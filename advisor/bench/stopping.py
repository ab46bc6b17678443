"""Early stopping at equal compute: samplers replayed over the search table, charged seconds.

The search table (``search.measure_table``) holds, for every grid configuration, what its
real trial measured at each rung (accuracy, the cheap objectives as the rung rule saw them)
and what the trial cost: its wall time, the wall time up to each rung, and the seconds spent
measuring the rungs. Replaying a sampler over it with early stopping applies the study's own
rung rule (``rungs.decide``, the same function and ``Rule`` a study uses) to each trial as
the sampler asks for it, against the points of the trials replayed before it; a stopped
trial is told to the sampler as pruned and costs its wall time up to the rung. Without
early stopping a trial costs its wall time less the rung measurements, which such a study
does not make (a derivation, stated with the results: the table's trials measured their
rungs, and ran in the order early stopping uses: eager deployables timed before the
fine-tune).

The unit is compute: seconds of trials, summed (one worker). Each replayed study runs until
it has spent ``budget`` seconds; hypervolume is taken at fractions of the compute that random
search without early stopping spends on ``FULL`` trials (its median over seeds), on the
front a study reports: completed trials that meet the table study's constraints.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from advisor import objectives
from advisor.bench.progress import Progress, silent
from advisor.bench.search import grid_from, hypervolume, key, signed_ratios, spread
from advisor.constraints import Constraints
from advisor.knobs import Knobs
from advisor.study import RunOptions, load, run, rungs
from advisor.study.options import make_sampler
from advisor.texttable import table

FULL = 100  # random search's trials whose compute is the scale
SHARES = (0.1, 0.25, 0.5, 0.75, 1.0)  # compute budgets, as shares of random's FULL trials' compute
GOAL_SHARE = 0.25  # the default must reach random's FULL-trial hypervolume within this share
METHODS = (("tpe", True), ("tpe", False), ("random", True), ("random", False))
ACCURACY = objectives.NAMES.index("accuracy")
MAX_TRIALS = 2000  # a replay stops here even if its compute is not spent (a table of free trials)


def full_cost(row: dict) -> float:
    """What a row's trial costs a study without early stopping: its wall time, less the
    rung measurements such a study does not make."""
    return max(0.0, row["seconds"] - row.get("rung_s", 0.0))


def replay(table: dict, sampler: str, seed: int, *, early_stop: bool, budget: float,
           max_trials: int = MAX_TRIALS, rule: rungs.Rule | None = None) -> list[dict]:
    """One study over the table until it has spent ``budget`` seconds (or asked for
    ``max_trials``): per trial, its row's key, whether it completed or stopped (and at which
    step), and the compute spent so far, itself included."""
    rule = rule or rungs.Rule()
    grid = grid_from(table)
    rows = {key(r["knobs"]): r for r in table["rows"]}
    base = table["baseline_metrics"]
    constraints = Constraints.from_dict(table["constraints"])
    study = optuna.create_study(directions=objectives.DIRECTIONS, sampler=make_sampler(sampler, seed))
    points: dict[int, list[rungs.Point]] = {}  # step -> the points replayed trials stored there
    gains: dict[int, list[tuple[float, float]]] = {}  # step -> (accuracy there, gain to the end)
    spent, out = 0.0, []
    while spent < budget and len(out) < max_trials:
        trial = study.ask()
        knobs = grid.suggest(trial)
        row = rows[key(knobs.to_dict())]
        stop = _stop_at(row, trial.number, knobs, points, base, constraints, gains, rule) if early_stop else None
        if stop is not None:
            spent += stop["seconds"]
            study.tell(trial, state=TrialState.PRUNED)
        else:
            spent += row["seconds"] if early_stop else full_cost(row)
            if row["ok"]:
                study.tell(trial, row["values"])
                for p in row.get("rungs", []) if early_stop else ():
                    gain = row["values"][ACCURACY] - p["accuracy"]
                    gains.setdefault(p["step"], []).append((p["accuracy"], gain))
            else:
                study.tell(trial, state=TrialState.FAIL)
        out.append({"key": key(row["knobs"]), "ok": row["ok"] and stop is None,
                    "stopped": stop["step"] if stop else None, "spent": spent})
    return out


def _stop_at(row: dict, number: int, knobs: Knobs, points: dict, base: dict, constraints: Constraints,
             gains: dict, rule: rungs.Rule) -> dict | None:
    """Walk the row's rungs as a live trial would: store each point, stop at the first the
    rule stops. The point it stopped at, or None when it runs to its end."""
    cheap = row.get("cheap", {})
    for values in row.get("rungs", []):
        here = rungs.Point.from_dict(number, {**values, "light": list(rungs.lightness(knobs))})
        measured = {name: cheap[name] for name in ("latency_ms", "size_mib") if here.costs and name in cheap}
        decision = rungs.decide(here, points.get(here.step, []), baseline=base, constraints=constraints,
                                measured=measured, gains=gains.get(here.step, []), rule=rule)
        points.setdefault(here.step, []).append(here)
        if decision.stop:
            return values
    return None


def curve(table: dict, trials: list[dict], budgets: list[float]) -> dict[float, float]:
    """Hypervolume of the feasible completed trials' front within each compute budget."""
    rows = {key(r["knobs"]): r for r in table["rows"]}
    out = {}
    for b in budgets:
        chosen = [rows[t["key"]] for t in trials if t["spent"] <= b and t["ok"]]
        out[b] = hypervolume([signed_ratios(r["values"], table["baseline"]) for r in chosen if r.get("feasible")])
    return out


def compare(table: dict, seeds: int = 20, methods=METHODS, shares=SHARES, progress=None) -> dict:
    """Each method (sampler, early stopping) replayed for ``seeds`` seeds; hypervolume at
    equal compute, and the goals."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The scale: random search without early stopping, its first FULL trials, per seed.
    scale_runs = [replay(table, "random", s, early_stop=False, budget=float("inf"), max_trials=FULL)
                  for s in range(seeds)]
    scale = statistics.median(r[-1]["spent"] for r in scale_runs)
    full_hv = [curve(table, r, [r[-1]["spent"]])[r[-1]["spent"]] for r in scale_runs]
    target = statistics.median(full_hv)
    budgets = [share * scale for share in shares]
    fine = [scale * i / 100 for i in range(1, 101)]  # where the curves are read for "reaches"
    results = {}
    for sampler, early in methods:
        name = f"{sampler}, {'early stopping' if early else 'no early stopping'}"
        started = time.perf_counter()
        hv, reach, counts, chart = [], [], [], []
        for seed in range(seeds):
            trials = replay(table, sampler, seed, early_stop=early, budget=scale)
            c = curve(table, trials, budgets + fine)
            hv.append({share: c[b] for share, b in zip(shares, budgets, strict=True)})
            chart.append([c[b] for b in fine[4::5]])
            reach.append(next((b / scale for b in fine if c[b] >= target), None))
            counts.append({"trials": len(trials), "stopped": sum(t["stopped"] is not None for t in trials)})
            if progress:
                progress(f"{name} seed {seed}: {len(trials)} trials, {counts[-1]['stopped']} stopped, "
                         f"hypervolume {c[budgets[-1]]:.3f}")
        results[name] = {
            "sampler": sampler, "early_stop": early, "seeds": seeds, "replay_s": time.perf_counter() - started,
            "hypervolume": {str(s): spread([h[s] for h in hv]) for s in shares},
            "chart": [spread(list(at)) for at in zip(*chart, strict=True)],  # every 5% of the scale
            "reaches_target_share": _spread_missing(reach),
            "trials": spread([c["trials"] for c in counts]),
            "stopped": spread([c["stopped"] for c in counts]),
        }
    report = {
        "workload": table["workload"], "hardware": table["hardware"], "settings": table["settings"],
        "grid_size": len(table["rows"]), "unit": "seconds of trials, summed",
        "scale_s": scale, "scale_trials": FULL,
        "target_hypervolume": target, "shares": list(shares), "rule": rungs.Rule().__dict__,
        "constraints": table["constraints"], "methods": results,
    }
    report["goals"] = _goals(report)
    return report


def _spread_missing(xs: list[float | None]) -> dict:
    """The share of compute at which each seed reached the target (None: not within the
    budget, counted as past it for the median)."""
    reached = [x if x is not None else float("inf") for x in xs]
    q25, q75 = np.percentile(reached, [25, 75], method="nearest")  # no interpolating with infinity
    return {"median": float(statistics.median(reached)), "q25": float(q25), "q75": float(q75),
            "n": len(xs), "not_reached": sum(x is None for x in xs)}


def _goals(report: dict) -> dict:
    methods, shares = report["methods"], report["shares"]
    with_es, without = methods.get("tpe, early stopping"), methods.get("tpe, no early stopping")
    goals = {}
    if with_es:
        share = with_es["reaches_target_share"]["median"]
        goals["default_reaches_random_full"] = {"median_share": share, "goal_share": GOAL_SHARE,
                                                "met": share <= GOAL_SHARE}
    if with_es and without:
        behind = [s for s in shares if with_es["hypervolume"][str(s)]["median"]
                  < without["hypervolume"][str(s)]["median"]]
        goals["early_stop_never_behind"] = {"behind_at": behind, "met": not behind}
    return goals


def render(report: dict) -> str:
    hw, shares = report["hardware"], report["shares"]
    cols = ["method", "seeds", "trials", "stopped"] + [f"HV @{s:.0%}" for s in shares] + ["reaches target at"]
    rows = []
    for name, m in report["methods"].items():
        label = f"{name} (default)" if name == "tpe, early stopping" else name
        reach = m["reaches_target_share"]
        cells = [f"{m['hypervolume'][str(s)]['median']:.3f} [{m['hypervolume'][str(s)]['q25']:.3f}-"
                 f"{m['hypervolume'][str(s)]['q75']:.3f}]" for s in shares]
        at = (f"{reach['median']:.0%}" if reach["median"] != float("inf") else "not reached") + (
            f" ({reach['not_reached']} seeds never)" if reach["not_reached"] else "")
        rows.append([label, str(m["seeds"]), f"{m['trials']['median']:.0f}", f"{m['stopped']['median']:.0f}",
                     *cells, at])
    lines = [
        f"Early stopping at equal compute: {report['workload']} on {hw['device']} ({hw['name']}), torch "
        f"{hw['torch_version']}; {report['grid_size']} measured configurations with their rungs; compute is "
        f"seconds of trials summed, 100% = random search's first {report['scale_trials']} trials without "
        f"early stopping ({report['scale_s'] / 60:.1f} min, median over seeds)",
        f"Hypervolume of the front a study reports (completed trials meeting {_limits(report)}) within each "
        f"share of that compute, median [25th-75th percentile]; target: random's {report['scale_trials']} "
        f"trials, median {report['target_hypervolume']:.3f}",
        table(cols, rows, right=set(range(1, len(cols)))),
    ]
    g = report["goals"]
    if "default_reaches_random_full" in g:
        x = g["default_reaches_random_full"]
        at = "never" if x["median_share"] == float("inf") else f"{x['median_share']:.0%}"
        lines.append(f"goal: the default reaches random's {report['scale_trials']}-trial hypervolume within "
                     f"{x['goal_share']:.0%} of its compute: at {at} (median), {'met' if x['met'] else 'NOT met'}")
    if "early_stop_never_behind" in g:
        x = g["early_stop_never_behind"]
        behind = ", ".join(f"{s:.0%}" for s in x["behind_at"])
        lines.append("goal: the default with early stopping at least as high as without at every budget: "
                     + ("met" if x["met"] else f"NOT met, behind at {behind}"))
    return "\n".join(lines)


def _limits(report: dict) -> str:
    return Constraints.from_dict(report["constraints"]).describe()


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
            options = RunOptions(model=model, device=device, trials=trials, study_trials=trials, storage=url,
                                 cache_dir=str(root / "cache"), study=name, sampler="tpe", seed=seed,
                                 early_stop=ARMS[arm], **settings)
            began = time.perf_counter()
            result = run(options, progress(trials))
            if result.completed + result.failed + result.stopped:  # it ran trials: its wall time is new
                walls = json.loads(walls_file.read_text()) if walls_file.exists() else {}
                walls[name] = time.perf_counter() - began
                walls_file.write_text(json.dumps(walls))
    names = [f"{arm}-{seed}" for arm in ARMS for seed in range(seeds)]
    stored = set(optuna.study.get_all_study_names(url))  # again: this run may have added some
    if not all(n in stored for n in names):
        return None
    studies = {n: _live_trials(load(n, url)) for n in names}
    if any(len(t) < trials for t in studies.values()):
        return None  # a study of the other arm is still running (or was cut short): not comparable yet
    walls = json.loads(walls_file.read_text()) if walls_file.exists() else {}
    scale = statistics.median(studies[f"off-{s}"][-1]["spent"] for s in range(seeds))
    shares = (0.25, 0.5, 0.75, 1.0)
    out = {}
    for arm in ARMS:
        per_seed = []
        for seed in range(seeds):
            trials_ = studies[f"{arm}-{seed}"]
            hv = {str(s): _live_hv(trials_, s * scale) for s in shares}
            per_seed.append({"seed": seed, "wall_s": walls.get(f"{arm}-{seed}"), "trial_s": trials_[-1]["spent"],
                             "stopped": sum(t["state"] == "pruned" for t in trials_),
                             "hypervolume": _live_hv(trials_, float("inf")), "at_compute": hv})
        out[arm] = {"seeds": per_seed,
                    "hypervolume": spread([p["hypervolume"] for p in per_seed]),
                    "trial_s": spread([p["trial_s"] for p in per_seed]),
                    "at_compute": {str(s): spread([p["at_compute"][str(s)] for p in per_seed]) for s in shares}}
    first = load(names[0], url)
    return {"mode": "live", "workload": first.workload["name"], "hardware": first.hardware,
            "settings": first.settings, "trials": trials, "scale_s": scale, "shares": list(shares),
            "arms": out, "goals": _live_goals(out)}


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
