"""The benchmark commands end to end (slow: they run real studies of the default workload)."""

from __future__ import annotations

import json

import pytest

from conftest import cli

pytestmark = pytest.mark.slow


def test_overhead_benchmark_prints_a_table_and_writes_json(workdir):
    result = cli("bench", "overhead", "--trials", "2", "--json", "overhead.json")
    assert result.code == 0, result.err
    report = json.loads((workdir / "overhead.json").read_text())
    assert len(report["trials"]) == 2
    for row in report["trials"]:
        assert row["wall_s"] == pytest.approx(row["measured_s"] + row["fixed_s"])
        assert 0 < row["fixed_s"] < row["wall_s"]
    assert "median fixed cost" in result.out and "#0" in result.out


def test_knobs_benchmark_changes_one_knob_per_row(workdir, monkeypatch):
    from advisor import bench

    report = bench.one_at_a_time("workloads:tensor_mlp", "cpu", trial_steps=4, baseline_steps=10,
                                 latency_seconds=0.05,
                                 configs=[{"accumulation": 2}, {"quantization": "int8-dynamic"},
                                          {"quantization": "float8"}])
    configs = [r["config"] for r in report["rows"]]
    assert configs == ["baseline (fp32 eager)", "accumulation=2", "quantization=int8-dynamic",
                       "quantization=float8"]
    assert [r["ok"] for r in report["rows"]] == [True, True, True, False]
    assert "needs CUDA" in report["rows"][-1]["reason"]
    assert report["rows"][0]["throughput"]["ratio"] == 1.0
    assert "quantization=int8-dynamic" in bench.render_knobs(report)


def test_workers_benchmark_runs_the_same_trials_with_one_and_two_workers(workdir):
    from advisor import bench

    report = bench.workers(trials=2, trial_steps=4, baseline_steps=10, latency_seconds=0.05)
    assert [r["workers"] for r in report["rows"]] == [1, 2]
    for r in report["rows"]:
        assert r["trials"] == r["completed"] == 2
        assert 0 < r["storage_wait_share"] < r["busy_share"] <= 1.0 + 1e-6
    assert report["rows"][0]["speedup"] == 1.0
    assert "trials/hour" in bench.render_workers(report)

