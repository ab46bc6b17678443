"""Early stopping at equal compute: samplers replayed over the search table, charged seconds.

The search table (``search.measure_table``) holds, for every grid configuration, what its
real trial measured at each rung (accuracy, the cheap objectives as the rung rule saw them)
and what the trial cost: its wall time, the wall time up to each rung, and the seconds spent
measuring the rungs. Replaying a sampler over it with early stopping applies the study's own
rung rule (``rungs.decide``, the same function and ``Rule`` a study uses) to each trial as
the sampler asks for it, against the points of the trials replayed before it; a stopped
trial is told to the sampler as pruned and costs its wall time up to the rung. As in a study,
a completed trial's points take the costs its end measured, and a trial with none at a rung
takes those of the latest completed trial of its structure (``rungs.same_structure``). Without
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

import statistics
import time
from collections.abc import Sequence

import numpy as np
import optuna
from optuna.trial import TrialState

from advisor import objectives
from advisor.bench.search import grid_from, hypervolume, key, signed_ratios, spread
from advisor.constraints import Constraints
from advisor.knobs import Knobs
from advisor.study import rungs, warm
from advisor.study.options import make_sampler
from advisor.texttable import table
from advisor.trial import compress

FULL = 100  # random search's trials whose compute is the scale
SHARES = (0.1, 0.25, 0.5, 0.75, 1.0)  # compute budgets, as shares of random's FULL trials' compute
GOAL_SHARE = 0.25  # the default must reach random's FULL-trial hypervolume within this share
# (sampler, early stopping, warm start); DEFAULT is what ``advisor run`` does.
METHODS = (("tpe", True, True), ("tpe", False, True), ("tpe", True, False), ("tpe", False, False),
           ("random", True, False), ("random", False, False))
DEFAULT = ("tpe", True, True)
PRIOR_TRIALS = 20  # the earlier study a replayed warm start reads: a default run's trials
PRIOR_SEED = 1000  # its sampler's seed, past the replays' own
ACCURACY = objectives.NAMES.index("accuracy")
MAX_TRIALS = 2000  # a replay stops here even if its compute is not spent (a table of free trials)


def full_cost(row: dict) -> float:
    """What a row's trial costs a study without early stopping: its wall time, less the
    rung measurements such a study does not make."""
    return max(0.0, row["seconds"] - row.get("rung_s", 0.0))


def replay(table: dict, sampler: str, seed: int, *, early_stop: bool, budget: float,
           max_trials: int = MAX_TRIALS, rule: rungs.Rule | None = None, warm: Sequence[dict] = ()) -> list[dict]:
    """One study over the table until it has spent ``budget`` seconds (or asked for
    ``max_trials``): per trial, its row's key and the knobs it sampled, whether it completed
    or stopped (and at which step), and the compute spent so far, itself included. ``warm``:
    knobs enqueued first, as a warm start enqueues them (``study/warm.py``)."""
    rule = rule or rungs.Rule()
    grid = grid_from(table)
    rows = {key(r["knobs"]): r for r in table["rows"]}
    base = table["baseline_metrics"]
    device = table["hardware"]["device"]
    constraints = Constraints.from_dict(table["constraints"])
    study = optuna.create_study(directions=objectives.DIRECTIONS, sampler=make_sampler(sampler, seed))
    for params in warm:
        study.enqueue_trial(params)
    points: dict[int, list[rungs.Point]] = {}  # step -> the points replayed trials stored there
    gains: dict[int, list[tuple[float, float]]] = {}  # step -> (accuracy there, gain to the end)
    done: dict[tuple, tuple[int, dict]] = {}  # structure -> the latest completed trial's number and row
    spent, out = 0.0, []
    while spent < budget and len(out) < max_trials:
        trial = study.ask()
        knobs = grid.suggest(trial)
        row = rows[key(knobs.to_dict())]
        stop = None
        if early_stop:
            stop = _stop_at(row, trial.number, knobs, points, base, constraints, gains, rule,
                            done.get(compress.structure(knobs, device)))
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
                if early_stop:
                    _completed(trial.number, row, points, base)
                    done[compress.structure(knobs, device)] = (trial.number, row)
            else:
                study.tell(trial, state=TrialState.FAIL)
        out.append({"key": key(row["knobs"]), "params": dict(trial.params), "ok": row["ok"] and stop is None,
                    "stopped": stop["step"] if stop else None, "spent": spent})
    return out


def prior(table: dict, seed: int, limit: int = warm.LIMIT) -> list[dict]:
    """What a warm start enqueues in replayed study ``seed``: ``warm.pick`` over the feasible
    trials of an earlier study of the same table (the default sampler with early stopping,
    ``PRIOR_TRIALS`` trials, seed ``seed + PRIOR_SEED``), in cost ratios to the baseline."""
    trials = replay(table, "tpe", seed + PRIOR_SEED, early_stop=True, budget=float("inf"),
                    max_trials=PRIOR_TRIALS)
    rows = {key(r["knobs"]): r for r in table["rows"]}
    base = dict(zip(objectives.NAMES, table["baseline"], strict=True))
    done = [t for t in trials if t["ok"] and rows[t["key"]].get("feasible")]
    costs = [objectives.cost_ratios(dict(zip(objectives.NAMES, rows[t["key"]]["values"], strict=True)), base)
             for t in done]
    return [done[i]["params"] for i in warm.pick(costs, [t["key"] for t in done], limit)]


def method_name(sampler: str, early: bool, warm_start: bool) -> str:
    return (f"{sampler}, {'early stopping' if early else 'no early stopping'}"
            + (", warm start" if warm_start else ""))


def end_costs(row: dict, base: dict) -> dict[str, float]:
    """A completed row's costs as its end measured them, as ``rungs.final_costs`` reads a
    trial's result: the paired latency ratio and the size over the baseline's."""
    cheap = row.get("cheap", {})
    out = {"latency_ms": cheap["latency_ratio"]} if "latency_ratio" in cheap else {}
    if "size_mib" in cheap and base.get("size_mib"):
        out["size_mib"] = cheap["size_mib"] / base["size_mib"]
    return out


def _completed(number: int, row: dict, points: dict, base: dict) -> None:
    """A completed trial's stored points take the costs its end measured (``rungs.peers``)."""
    costs = end_costs(row, base)
    for step, stored in points.items():
        points[step] = [p.ended(costs) if p.number == number else p for p in stored]


def _stop_at(row: dict, number: int, knobs: Knobs, points: dict, base: dict, constraints: Constraints,
             gains: dict, rule: rungs.Rule, same: tuple[int, dict] | None = None) -> dict | None:
    """Walk the row's rungs as a live trial would: store each point, stop at the first the
    rule stops. A point without costs takes those of ``same``, the latest completed trial of
    its structure, as the trial loop does. The point it stopped at, or None when it runs to its end."""
    cheap = row.get("cheap", {})
    for values in row.get("rungs", []):
        here = rungs.Point.from_dict(number, {**values, "light": list(rungs.lightness(knobs))})
        measured = {name: cheap[name] for name in ("latency_ms", "size_mib") if here.costs and name in cheap}
        if same is not None and any(name not in here.costs for name in rungs.CHEAP):
            lender, lent = same
            here = here.with_costs(end_costs(lent, base), lender)
            measured = {name: lent["cheap"][name] for name in ("latency_ms", "size_mib")
                        if name in lent.get("cheap", {})} | measured
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
    for sampler, early, warm_start in methods:
        name = method_name(sampler, early, warm_start)
        started = time.perf_counter()
        hv, reach, counts, chart = [], [], [], []
        for seed in range(seeds):
            queued = prior(table, seed) if warm_start else []
            trials = replay(table, sampler, seed, early_stop=early, budget=scale, warm=queued)
            c = curve(table, trials, budgets + fine)
            hv.append({share: c[b] for share, b in zip(shares, budgets, strict=True)})
            chart.append([c[b] for b in fine[4::5]])
            reach.append(next((b / scale for b in fine if c[b] >= target), None))
            counts.append({"trials": len(trials), "stopped": sum(t["stopped"] is not None for t in trials)})
            if progress:
                progress(f"{name} seed {seed}: {len(trials)} trials, {counts[-1]['stopped']} stopped, "
                         f"hypervolume {c[budgets[-1]]:.3f}")
        results[name] = {
            "sampler": sampler, "early_stop": early, "warm_start": warm_start,
            "default": (sampler, early, warm_start) == DEFAULT, "seeds": seeds,
            "replay_s": time.perf_counter() - started,
            "hypervolume": {str(s): spread([h[s] for h in hv]) for s in shares},
            "chart": [spread(list(at)) for at in zip(*chart, strict=True)],  # every 5% of the scale
            "reaches_target_share": _spread_missing(reach),
            "trials": spread([c["trials"] for c in counts]),
            "stopped": spread([c["stopped"] for c in counts]),
        }
    report = {
        "workload": table["workload"], "hardware": table["hardware"], "settings": table["settings"],
        "grid_size": len(table["rows"]), "unit": "seconds of trials, summed",
        "scale_s": scale, "scale_trials": FULL, "prior_trials": PRIOR_TRIALS, "warm_limit": warm.LIMIT,
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
    with_es, without = methods.get(method_name(*DEFAULT)), methods.get(method_name(DEFAULT[0], False, DEFAULT[2]))
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
        label = f"{name} (default)" if m.get("default") else name
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
