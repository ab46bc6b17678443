"""Early stopping at equal compute over the search table: what a replayed trial costs, who the
rung rule stops there, what counts on the front, and the goals."""

from __future__ import annotations

import json
import warnings

import pytest
from test_search_bench import BASE, FULL, _synthetic_table

from advisor.bench import search, stopping, stopping_live
from advisor.dashboard import render
from advisor.knobs import Knobs
from advisor.study import load, rungs
from advisor.trial import compress
from conftest import FAST, PLAIN

BASE_METRICS = {"accuracy": BASE[0], "latency_ms": BASE[1], "memory_mib": BASE[2], "size_mib": BASE[3]}


def hopeless(k: Knobs) -> bool:
    """Structured pruning at 0.5 loses half the accuracy in the synthetic table."""
    return k.prune_kind == "structured" and k.prune_ratio == 0.5


def _table() -> dict:
    """A table whose rows carry rungs (steps 15 and 30) and costs: 10 s a trial, 3 s to the
    first rung, 5 s to the second, 1 s of it measuring them; quantized trials cost 30 s (a
    compiled deployable) and have no cheap costs at their rungs."""
    grid = search.grid_space(FULL, 1e-3)
    rows = []
    for i, k in enumerate(grid.grid()):
        shrink = {"none": 1.0, "int8-dynamic": 0.3, "int8-static": 0.25, "qat-int8": 0.25}[k.quantization]
        shrink *= 1.0 - (k.prune_ratio if k.prune_kind != "none" else 0.0)
        acc = 0.45 if hopeless(k) else 0.9 - 0.01 * (1 - shrink)
        mem = 4.0 / k.accumulation * (0.6 if k.precision == "bf16" else 1.0)
        compiled = k.quantization in ("int8-static", "qat-int8")
        costs = {} if compiled else {"latency_ms": 0.5 + shrink / 2, "size_mib": shrink}
        rows.append({
            "knobs": k.to_dict(), "trial": i, "ok": True, "feasible": acc >= BASE[0] - 0.01,
            "values": [acc, BASE[1] * (0.5 + shrink / 2), mem, BASE[3] * shrink],
            "seconds": 30.0 if compiled else 10.0, "rung_s": 1.0,
            "rungs": [{"step": 15, "accuracy": acc, "costs": costs, "seconds": 3.0},
                      {"step": 30, "accuracy": acc, "costs": costs, "seconds": 5.0}],
            "cheap": {"latency_ms": BASE[1] * (0.5 + shrink / 2), "size_mib": BASE[3] * shrink,
                      "latency_ratio": 0.5 + shrink / 2}})
    return {"workload": "synthetic", "hardware": {"device": "cpu", "name": "test", "torch_version": "-"},
            "settings": {"trial_steps": 60, "latency_batch": 1}, "grid": search.GRID, "space": grid.to_dict(),
            "lr": 1e-3, "baseline": BASE, "baseline_metrics": BASE_METRICS,
            "constraints": {"max_accuracy_drop": 1.0}, "rows": rows}


def test_without_early_stopping_a_trial_costs_its_time_less_the_rungs():
    table = _table()
    trials = stopping.replay(table, "random", 0, early_stop=False, budget=100.0)
    rows = {search.key(r["knobs"]): r for r in table["rows"]}
    spent = 0.0
    for t in trials:
        spent += rows[t["key"]]["seconds"] - 1.0
        assert t["spent"] == pytest.approx(spent) and t["stopped"] is None
    assert trials[-2]["spent"] < 100.0 <= trials[-1]["spent"], "it runs until its budget is spent"


def test_a_hopeless_trial_stops_at_its_first_rung_and_costs_its_time_there():
    table = _table()
    trials = stopping.replay(table, "random", 1, early_stop=True, budget=2000.0)
    rows = {search.key(r["knobs"]): r for r in table["rows"]}
    before = 0.0
    stopped = [t for t in trials if t["stopped"] is not None]
    assert stopped, "the table holds hopeless configurations a random sampler meets"
    for t in trials:
        k = Knobs.from_dict(rows[t["key"]]["knobs"])
        if hopeless(k):
            # 45 points down, past --max-accuracy-drop 1 plus the 10-point default allowance.
            assert t["stopped"] == 15 and not t["ok"]
            assert t["spent"] - before == pytest.approx(3.0)
        else:
            assert t["stopped"] is None or t["stopped"] in (15, 30)
            if t["stopped"] is None:
                assert t["spent"] - before == pytest.approx(rows[t["key"]]["seconds"]), \
                    "a trial run to its end under early stopping also paid for its rungs"
        before = t["spent"]


def test_a_trial_without_cheap_costs_is_dominated_only_once_its_structure_has_completed():
    table = _table()
    trials = stopping.replay(table, "random", 2, early_stop=True, budget=3000.0)
    rows = {search.key(r["knobs"]): r for r in table["rows"]}
    completed = set()
    for t in trials:
        row = rows[t["key"]]
        k = Knobs.from_dict(row["knobs"])
        if t["stopped"] is not None and not row["rungs"][0]["costs"]:
            assert hopeless(k) or compress.structure(k, "cpu") in completed, "stopped, no cost measured or lent"
        if t["ok"]:
            completed.add(compress.structure(k, "cpu"))


def test_a_replayed_trial_without_cheap_costs_takes_its_structures_as_the_loop_does():
    """Four peers two points more accurate and no costlier stop a compiled row only when a
    completed row of the same structure lends it the costs its end measured."""
    table = _table()
    compiled = [r for r in table["rows"] if r["knobs"]["quantization"] == "int8-static"
                and r["knobs"]["prune_kind"] == "none"]
    row, lender = compiled[0], compiled[1]
    k = Knobs.from_dict(row["knobs"])
    assert compress.structure(Knobs.from_dict(lender["knobs"]), "cpu") == compress.structure(k, "cpu")
    assert not row["rungs"][0]["costs"]
    better = row["rungs"][0]["accuracy"] + 0.02
    points = {15: [rungs.Point(100 + i, 15, better, {"latency_ms": 0.5, "size_mib": 0.2}, rungs.lightness(k))
                   for i in range(4)]}
    no_limit = stopping.Constraints(max_accuracy_drop=None)
    alone = stopping._stop_at(row, 0, k, {s: list(p) for s, p in points.items()}, BASE_METRICS, no_limit, {},
                              rungs.Rule())
    assert alone is None, "no cost measured and none lent: it cannot be dominated"
    lent = stopping._stop_at(row, 0, k, points, BASE_METRICS, no_limit, {}, rungs.Rule(), (7, lender))
    assert lent == row["rungs"][0]
    assert points[15][-1].costs_from == 7 and points[15][-1].costs == stopping.end_costs(lender, BASE_METRICS)


def test_the_rule_replayed_is_the_studys():
    """The same point, peers and history give the replay's decision and ``rungs.decide``'s."""
    table = _table()
    row = next(r for r in table["rows"] if hopeless(Knobs.from_dict(r["knobs"])))
    k = Knobs.from_dict(row["knobs"])
    stop = stopping._stop_at(row, 0, k, {}, BASE_METRICS, stopping.Constraints.from_dict(table["constraints"]),
                             {}, rungs.Rule())
    direct = rungs.decide(rungs.Point.from_dict(0, row["rungs"][0]), [], baseline=BASE_METRICS,
                          constraints=stopping.Constraints(max_accuracy_drop=1.0),
                          measured=row["cheap"])
    assert direct.stop and stop == row["rungs"][0]
    lenient = stopping._stop_at(row, 0, k, {}, BASE_METRICS, stopping.Constraints(max_accuracy_drop=60.0), {},
                                rungs.Rule())
    assert lenient is None, "within a 60-point limit it runs on"


def test_only_feasible_completed_trials_count_on_the_front():
    table = _table()
    best = max(table["rows"], key=lambda r: (r["feasible"], -r["values"][1]))
    bad = next(r for r in table["rows"] if not r["feasible"])
    key = search.key
    completed = [{"key": key(best["knobs"]), "ok": True, "stopped": None, "spent": 10.0}]
    as_stopped = [{"key": key(best["knobs"]), "ok": False, "stopped": 15, "spent": 3.0}]
    infeasible = [{"key": key(bad["knobs"]), "ok": True, "stopped": None, "spent": 10.0}]
    assert stopping.curve(table, completed, [10.0])[10.0] > 0
    assert stopping.curve(table, completed, [9.0])[9.0] == 0, "not yet paid for at 9 s"
    assert stopping.curve(table, as_stopped, [10.0])[10.0] == 0, "a stopped trial is never on the front"
    assert stopping.curve(table, infeasible, [10.0])[10.0] == 0, "nor one outside the constraints"


def test_compare_reports_hypervolume_at_equal_compute_and_the_goals():
    table = _table()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = stopping.compare(table, seeds=3)
    assert report["scale_trials"] == stopping.FULL and report["scale_s"] > 0
    methods = report["methods"]
    assert set(methods) == {"tpe, early stopping, warm start", "tpe, no early stopping, warm start",
                            "tpe, early stopping", "tpe, no early stopping", "random, early stopping",
                            "random, no early stopping"}
    assert [n for n, m in methods.items() if m["default"]] == ["tpe, early stopping, warm start"]
    for m in methods.values():
        medians = [m["hypervolume"][str(s)]["median"] for s in report["shares"]]
        assert medians == sorted(medians), "a front only grows with compute"
        assert (m["stopped"]["median"] > 0) == m["early_stop"]
    # Random search without early stopping at share 1.0 spends its own scale (its median).
    assert methods["random, no early stopping"]["hypervolume"]["1.0"]["median"] >= 0.99 * report[
        "target_hypervolume"] - 1e-9
    goal = report["goals"]["default_reaches_random_full"]
    assert goal["met"] == (goal["median_share"] <= stopping.GOAL_SHARE)
    behind = report["goals"]["early_stop_never_behind"]
    es = methods["tpe, early stopping, warm start"]["hypervolume"]
    no = methods["tpe, no early stopping, warm start"]["hypervolume"]
    assert behind["behind_at"] == [s for s in report["shares"] if es[str(s)]["median"] < no[str(s)]["median"]]
    text = stopping.render(report)
    assert "tpe, early stopping, warm start (default)" in text and "25%" in text
    json.dumps(report)


def test_a_replayed_warm_start_enqueues_the_pick_of_an_earlier_studys_feasible_trials_first():
    table = _table()
    queued = stopping.prior(table, 0)
    rows = {search.key(r["knobs"]): r for r in table["rows"]}
    assert 0 < len(queued) <= stopping.warm.LIMIT
    earlier = stopping.replay(table, "tpe", stopping.PRIOR_SEED, early_stop=True, budget=float("inf"),
                              max_trials=stopping.PRIOR_TRIALS)
    feasible = {t["key"] for t in earlier if t["ok"] and rows[t["key"]]["feasible"]}
    assert {search.key(q) for q in queued} <= feasible
    trials = stopping.replay(table, "tpe", 0, early_stop=True, budget=float("inf"), max_trials=len(queued) + 2,
                             warm=queued)
    assert [t["params"] for t in trials[:len(queued)]] == queued, "tried first, in the order picked"


def test_the_chart_shows_hypervolume_against_compute():
    report = search.compare(_synthetic_table(), ("random",), seeds=2, budgets=(10, 20))
    report["early_stopping"] = stopping.compare(_table(), seeds=2)
    page = render.search_efficiency(report)
    assert 'id="search-compute"' in page and "Hypervolume at equal compute" in page
    for name in report["early_stopping"]["methods"]:
        assert name in page


@pytest.mark.slow  # two real studies, one per arm: half a minute on 2 cores
def test_the_live_check_runs_each_arm_apart_and_reports_once_both_are_stored(workdir):
    settings = {**FAST, "trial_steps": 12}
    first = stopping_live.live("workloads:tensor_mlp", "cpu", study_dir="s", seeds=1, trials=2, arms=("on",),
                          **settings)
    assert first is None, "the arm without early stopping is not stored yet"
    report = stopping_live.live("workloads:tensor_mlp", "cpu", study_dir="s", seeds=1, trials=2, arms=("off",),
                           **settings)
    assert set(report["arms"]) == {"on", "off"}
    for arm in report["arms"].values():
        (seed,) = arm["seeds"]
        assert seed["wall_s"] > 0 and seed["trial_s"] > 0
        assert seed["hypervolume"] >= seed["at_compute"]["0.25"] >= 0
    off = report["arms"]["off"]["seeds"][0]
    assert report["scale_s"] == pytest.approx(off["trial_s"])
    pair = report["goals"]["side_by_side"][0]
    assert pair["wall_ratio"] == pytest.approx(report["arms"]["on"]["seeds"][0]["wall_s"] / off["wall_s"])
    assert report["goals"]["wall_at_most_60pct_with_hv_at_least"] == (
        pair["wall_ratio"] <= 0.6 and pair["hypervolume_on"] >= pair["hypervolume_off"])
    text = stopping_live.render_live(report)
    assert "goal: at most 60% of the wall time" in text and "seed 0" in text
    again = stopping_live.live("workloads:tensor_mlp", "cpu", study_dir="s", seeds=1, trials=2, **settings)
    assert again["arms"]["on"]["seeds"][0]["wall_s"] == report["arms"]["on"]["seeds"][0]["wall_s"], \
        "a rerun with every study stored runs nothing and keeps the measured wall times"
    fewer = stopping_live.live("workloads:tensor_mlp", "cpu", study_dir="s", seeds=1, trials=3, arms=(),
                               **settings)
    assert fewer is None, "studies holding fewer trials than asked (one still running) are not reported"
    json.dumps(report)


@pytest.mark.slow  # four real studies (two cold, two warm): about a minute on 2 cores
def test_the_warm_start_live_check_starts_each_seed_from_another_seeds_cold_study(workdir):
    settings = {**FAST, "trial_steps": 12, "max_accuracy_drop": 50}
    before = stopping_live.live_warm("workloads:tensor_mlp", "cpu", study_dir="s", seeds=2, trials=2, **settings)
    assert before is None, "nothing to start from before the on arm is stored"
    # Each cold study's first trial is plain (inside the warm start's box), whatever the sampler draws.
    stopping_live.live("workloads:tensor_mlp", "cpu", study_dir="s", seeds=2, trials=2, arms=("on",),
                       enqueue=[PLAIN], **settings)
    report = stopping_live.live_warm("workloads:tensor_mlp", "cpu", study_dir="s", seeds=2, trials=2, **settings)
    for seed in (0, 1):
        earlier = load("earlier", f"sqlite:///s/warm-{seed}.db")
        assert earlier.trials == load(f"on-{1 - seed}", "sqlite:///s/live.db").trials, "the next seed's, copied"
        warm = load(f"warm-{seed}", f"sqlite:///s/warm-{seed}.db")
        assert warm.warm and all(t.warm_from.startswith("earlier#") for t in warm.warm)
    cold, warm_ = report["arms"]["cold"], report["arms"]["warm"]
    assert [p["warm_trials"] for p in warm_["seeds"]] == [len(load(f"warm-{s}", f"sqlite:///s/warm-{s}.db").warm)
                                                          for s in (0, 1)]
    assert all(p["warm_trials"] == 0 and p["wall_s"] > 0 for p in cold["seeds"])
    behind = report["goals"]["warm_never_behind"]["behind_at"]
    assert behind == [s for s in report["shares"]
                      if warm_["at_compute"][str(s)]["median"] < cold["at_compute"][str(s)]["median"]]
    assert "Warm start live" in stopping_live.render_live_warm(report)
    json.dumps(report)
