"""The search-efficiency benchmark: the grid, the hypervolume, the replay, and a tiny table."""

from __future__ import annotations

import json
import warnings

import numpy as np
import optuna
import pytest

from advisor import objectives, space
from advisor.bench import live, search
from advisor.dashboard import render
from advisor.knobs import Knobs
from advisor.study import rungs
from advisor.techniques import Exclusion
from advisor.trial import compress
from conftest import FAST, cli

FULL = space.Space(values={
    "precision": ("fp32", "bf16"), "accumulation": (1, 2, 4, 8), "checkpoint_every": (0, 1, 2),
    "compile": ("none", "default"), "lr": (1e-4, 3e-3), "prune_kind": ("none", "unstructured", "structured"),
    "prune_ratio": (0.1, 0.8, 0.1), "quantization": ("none", "int8-dynamic", "int8-static", "qat-int8"),
    "distill_alpha": (0.0, 1.0, 0.1), "distill_temperature": (1.0, 8.0, 0.5), "max_tokens": (0,),
    "serving_max_batch": (), "serving_max_wait_ms": ()},
    excluded=(Exclusion("prune_kind", "2:4", "not here"),), blocks="blocks: 3 blocks")


def test_the_grid_is_exactly_what_suggest_can_return():
    grid = search.grid_space(FULL, 1e-3)
    listed = {search.key(k.to_dict()) for k in grid.grid()}
    # Counted by hand from GRID: precision 2 x accumulation 2 x checkpointing 2 x pruning 5
    # (none, two kinds x two ratios) x quantization 3 x distillation 2; qat-int8 fixes fp32
    # without checkpointing: accumulation 2 x pruning 5 x distillation 2.
    assert len(grid.grid()) == len(listed) == 2 * 2 * 2 * 5 * 3 * 2 + 2 * 5 * 2
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sampled = set()
    for _ in range(3000):
        sampled.add(search.key(grid.suggest(study.ask()).to_dict()))
    assert sampled == listed


def test_grid_needs_a_fixed_learning_rate():
    with pytest.raises(ValueError, match="fixed lr"):
        FULL.grid()


def test_narrowing_keeps_only_what_the_hardware_offers():
    fp32_only = FULL.narrowed(precision=("fp32",), quantization=("none",))
    grid = search.grid_space(fp32_only, 1e-3)
    assert grid.precision == ("fp32",) and grid.quantization == ("none",)
    assert {k.precision for k in grid.grid()} == {"fp32"}


def test_the_default_space_keeps_its_stored_form():
    # Studies stored before the grid ranges existed must still resume: same space dict.
    d = FULL.to_dict()
    assert d["prune_ratio"] == [0.1, 0.8] and d["distill_alpha"] == [0.0, 1.0]
    assert d["distill_temperature"] == [1.0, 8.0]


BASE = [0.9, 2.0, 4.0, 1.0]  # accuracy, latency ms, memory MiB, size MiB


def test_the_baseline_alone_scores_the_stated_volume():
    # Box from (-1, 1, 1, 1) to the reference (-0.8, 2, 2, 2): 0.2 x 1 x 1 x 1.
    assert search.hypervolume([search.signed_ratios(BASE, BASE)]) == pytest.approx(0.2)


def test_hypervolume_of_two_points_by_inclusion_exclusion():
    a = search.signed_ratios([0.9, 1.0, 4.0, 1.0], BASE)  # half the latency: (-1, .5, 1, 1)
    b = search.signed_ratios([0.9, 2.0, 2.0, 1.0], BASE)  # half the memory: (-1, 1, .5, 1)
    # Each box 0.2 x 1.5 x 1 x 1 = 0.3; their overlap is the baseline's box, 0.2.
    assert search.hypervolume([a, b]) == pytest.approx(0.3 + 0.3 - 0.2)


def test_a_point_outside_the_reference_box_adds_nothing():
    worse = search.signed_ratios([0.5, 1.0, 1.0, 0.1], BASE)  # accuracy below 80% of the baseline
    assert search.hypervolume([worse]) == 0.0
    base = search.signed_ratios(BASE, BASE)
    assert search.hypervolume([base, worse]) == pytest.approx(0.2)


def test_dominance_respects_each_direction():
    assert search.dominates([0.95, 2.0, 4.0, 1.0], BASE)  # more accurate, equal otherwise
    assert not search.dominates(BASE, BASE)
    assert not search.dominates([0.95, 3.0, 4.0, 1.0], BASE)  # slower
    assert search.front([BASE, [0.95, 2.0, 4.0, 1.0], [0.8, 1.0, 4.0, 1.0]]) == [1, 2]


def _synthetic_table() -> dict:
    """A table over the default grid whose values follow from the knobs: quantization and
    pruning shrink the model and cost accuracy, bf16 and accumulation cut memory."""
    grid = search.grid_space(FULL, 1e-3)
    rows = []
    for i, k in enumerate(grid.grid()):
        shrink = {"none": 1.0, "int8-dynamic": 0.3, "int8-static": 0.25, "qat-int8": 0.25}[k.quantization]
        shrink *= 1.0 - (k.prune_ratio if k.prune_kind != "none" else 0.0)
        acc = 0.9 - 0.05 * (1 - shrink) + 0.01 * (k.distill_alpha > 0)
        mem = 4.0 / k.accumulation * (0.6 if k.precision == "bf16" else 1.0) * (0.8 if k.checkpoint_every else 1)
        rows.append({"knobs": k.to_dict(), "trial": i, "ok": i % 37 != 5,
                     "values": [acc, 2.0 * (0.5 + shrink / 2), mem, 1.0 * shrink], "reason": "x"})
    return {"workload": "synthetic", "hardware": {"device": "cpu", "name": "test", "torch_version": "-"},
            "settings": {"trial_steps": 1, "latency_batch": 1}, "grid": search.GRID,
            "space": grid.to_dict(), "lr": 1e-3, "baseline": BASE, "rows": rows,
            "one_at_a_time": [{**Knobs().to_dict(), **c} for c in search.one_at_a_time_configs(grid)]}


def test_replay_asks_through_the_space_and_is_told_the_table():
    table = _synthetic_table()
    asked = search.replay(table, "tpe", seed=3, budget=40)
    again = search.replay(table, "tpe", seed=3, budget=40)
    assert len(asked) == 40 and asked == again
    keys = {search.key(r["knobs"]) for r in table["rows"]}
    assert all(search.key(r["knobs"]) in keys for r in asked)


def test_compare_reports_every_sampler_budget_and_goal():
    table = _synthetic_table()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the replay itself must not warn
        report = search.compare(table, ("tpe", "random"), seeds=3, budgets=(10, 30, 100))
    assert report["samplers"]["tpe"]["seeds"] == 3
    for name in ("tpe", "random"):
        hv = report["samplers"][name]["hypervolume"]
        medians = [hv[str(b)]["median"] for b in report["steps"]]
        assert medians == sorted(medians), "a front can only grow with more trials"
        assert all(hv[str(b)]["q25"] <= hv[str(b)]["median"] <= hv[str(b)]["q75"] for b in report["steps"])
        assert medians[-1] <= report["grid_hypervolume"] + 1e-12
    oat = report["one_at_a_time"]
    assert oat["trials"] == 1 + len(table["one_at_a_time"])
    assert 0 < oat["hypervolume"] <= report["grid_hypervolume"]
    goal = report["goals"]["tpe30_vs_random100"]
    assert goal["met"] == (goal["tpe_30_median"] >= goal["random_100_median"])
    dom = report["goals"]["tpe100_front_dominates_one_at_a_time"]
    assert dom["met"] == (not dom["escaped"]) and dom["seeds"] == 3
    text = search.render(report)
    assert "tpe (default)" in text and "HV @30" in text and "one at a time (10 trials)" in text
    page = render.search_efficiency(report)
    assert 'id="search-efficiency"' in page and "one technique at a time" in page
    json.dumps(report)


def test_normalization_follows_the_objectives_table():
    v = search.signed_ratios([0.45, 1.0, 8.0, 0.5], BASE)
    ratios = [0.5, 0.5, 2.0, 0.5]
    expected = [-r if o.direction == "maximize" else r for o, r in zip(objectives.OBJECTIVES, ratios, strict=True)]
    assert np.allclose(v, expected)


@pytest.mark.slow  # measures a table of real trials: half a minute on 2 cores
def test_a_tiny_table_is_measured_once_and_resumed(workdir):
    tiny = {**search.GRID, "precision": ("fp32",), "accumulation": (1,), "checkpoint_every": (0,),
            "prune_kind": ("none", "unstructured"), "prune_ratio": (0.3, 0.3, 0.2),
            "quantization": ("none", "int8-dynamic"), "distill_alpha": (0.0, 0.0, 0.7)}
    table = search.measure_table("workloads:tensor_mlp", "cpu", study_dir="t", grid=tiny,
                                 **{**FAST, "trial_steps": 12})
    assert len(table["rows"]) == 4 and all(r["ok"] for r in table["rows"])
    assert len({r["trial"] for r in table["rows"]}) == 4
    for row in table["rows"]:
        # Measured with the rungs observed: every rung point, none stopped, and what it cost.
        settings = table["settings"]
        assert [p["step"] for p in row["rungs"]] == list(rungs.rung_steps(settings["trial_steps"],
                                                                          settings["warmup_steps"]))
        assert row["rungs"], "12 steps hold rungs past the warm-up"
        assert 0 < row["rungs"][0]["seconds"] < row["rungs"][-1]["seconds"] < row["seconds"]
        assert 0 < row["rung_s"] < row["seconds"] and row["feasible"] in (True, False)
        if compress.compiled(Knobs.from_dict(row["knobs"])):
            assert row["rungs"][0]["costs"] == {}, "a compiled deployable is built once, at the end"
        else:
            assert row["rungs"][0]["costs"]["latency_ms"] == pytest.approx(row["cheap"]["latency_ratio"])
    again = search.measure_table("workloads:tensor_mlp", "cpu", study_dir="t", grid=tiny,
                                 **{**FAST, "trial_steps": 12})
    assert [r["trial"] for r in again["rows"]] == [r["trial"] for r in table["rows"]], \
        "a rerun must reuse the measured trials, not measure them again"
    report = search.compare(table, ("random",), seeds=2, budgets=(2, 4))
    assert report["grid_size"] == 4 and report["samplers"]["random"]["seeds"] == 2


@pytest.mark.parametrize("flags, message", [
    (["--samplers", "tpe,bogus"], "--samplers takes"),
    (["--budgets", "10,0"], "--budgets must be"),
    (["--budgets", "ten"], "--budgets must be"),
    (["--seeds", "0"], "--seeds must be"),
    (["--workers", "0"], "--workers must be"),
])
def test_bad_flags_get_one_line_before_anything_is_measured(workdir, flags, message):
    result = cli("bench", "search", *flags)
    assert result.code != 0 and message in result.err
    assert "Traceback" not in result.err and not (workdir / "studies").exists()


@pytest.mark.slow  # about 2.5 minutes: the one-at-a-time study compiles with max-autotune
def test_live_mode_runs_real_studies_and_scores_them_alike(workdir):
    report = live.live("workloads:tensor_mlp", "cpu", study_dir="live", samplers=("random",), seeds=1,
                       trials=3, budgets=(1, 3), **FAST)
    hv = report["samplers"]["random"]["hypervolume"]
    assert hv["1"]["median"] <= hv["3"]["median"] and report["budgets"] == [1, 3]
    # The baseline plus each one-at-a-time configuration this CPU offers, each a real trial.
    assert report["one_at_a_time"]["trials"] == 1 + len(search.COMMON) - report["one_at_a_time"]["failed"]
    dom = report["tpe_dominates_one_at_a_time"]
    assert dom == {"of": len(search.COMMON) - report["one_at_a_time"]["failed"], "escaped_per_seed": {}}
    text = live.render(report)
    assert "live studies of the full space" in text and "random" in text
    oat = optuna.load_study(study_name="live-one-at-a-time", storage="sqlite:///live/live.db")
    base = Knobs().to_dict()
    for t in oat.trials:
        changed = {k for k, v in Knobs.from_dict(t.params).to_dict().items() if v != base[k]}
        assert 1 <= len(changed - {"prune_ratio", "distill_temperature"}) <= 3, \
            f"one technique (the last config: three) on the baseline's knobs: {changed}"
    again = live.live("workloads:tensor_mlp", "cpu", study_dir="live", samplers=("random",), seeds=1,
                      trials=3, budgets=(1, 3), **FAST)
    assert again["samplers"] == report["samplers"], "a rerun resumes the finished studies"


def test_benchmarks_send_a_study_only_the_configurations_this_machine_offers():
    # A CPU without fast bf16 kernels (like the one this was found on) refuses bf16: the
    # one-at-a-time and workers benchmarks report it instead of stopping at it.
    from advisor.bench.offered import split_offered
    from test_space import CPU_NO_BF16, build
    from workloads import MLP

    here = build(CPU_NO_BF16, MLP(), 16)
    runnable, left_out = split_offered([{"precision": "bf16"}, {"accumulation": 2},
                                        {"compile": "max-autotune"}], here)
    assert runnable == [{"accumulation": 2}, {"compile": "max-autotune-no-cudagraphs"}]
    assert [(c, "no fast bf16 kernels" in why) for c, why in left_out] == [({"precision": "bf16"}, True)]
