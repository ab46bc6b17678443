"""``advisor bench noise``: its summaries and goals, and the load it puts on the machine."""

from __future__ import annotations

import os
import time

import pytest
import torch

from advisor.bench import noise
from advisor.study import TrialRecord


def _noise_trial(number: int, paired: float, latency_ms: float):
    result = {"metrics": {"latency_ms": latency_ms},
              "paired": {"latency": {"ratio": paired, "low": paired * 0.98, "high": paired * 1.02}}}
    return TrialRecord(number, "complete", {}, result)


def test_noise_benchmark_summarizes_paired_and_unpaired_ratios_against_its_goals():
    baseline = {"metrics": {"latency_ms": 2.0}}
    quiet = noise._condition([_noise_trial(i, r, 1.0) for i, r in enumerate((0.50, 0.51, 0.49))], baseline)
    loaded = noise._condition([_noise_trial(i, r, 6.0) for i, r in enumerate((0.53, 0.52, 0.54))], baseline)
    assert quiet["paired"]["median"] == 0.50 and quiet["paired"]["cv"] == pytest.approx(0.0163, abs=1e-3)
    assert quiet["unpaired"]["median"] == 0.5 and loaded["unpaired"]["median"] == 3.0
    rows = [{"config": "int8", "quiet": quiet, "loaded": loaded, "load_shift": 0.53 / 0.50 - 1}]
    goals = noise._goals(rows)
    assert goals["load_within"]["met"] and goals["quiet_cv"]["met"]
    rows[0]["load_shift"] = 0.2
    assert not noise._goals(rows)["load_within"]["met"]
    text = noise.render({"rows": rows, "goals": noise._goals(rows), "hardware": {"device": "cpu"},
                         "settings": {"latency_batch": 64}, "workload": "w", "repeats": 3, "load_processes": 2})
    assert "0.500x (cv 1.6%)" in text and "3.000x" in text and "NOT met (worst 20.0%)" in text


def test_the_noise_configurations_take_cuda_int8_where_pt2e_int8_is_not_offered():
    import dataclasses

    from torch import nn

    from advisor import space
    from test_space import CPU_NO_BF16

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    example = torch.randn(4, 8)
    on_cpu = noise.offered_configs(space.build(CPU_NO_BF16, model, 16, example))
    assert on_cpu == [dict(c) for c in noise.CONFIGS]
    h100 = dataclasses.replace(CPU_NO_BF16, device="cuda", bf16=True, fp16_fast=True, capability=(9, 0))
    on_gpu = noise.offered_configs(space.build(h100, model, 16, example))
    assert [c.get("quantization") for c in on_gpu] == [None, "int8-dynamic", "int8-dynamic"]
    assert on_gpu[2]["prune_ratio"] == 0.5 and on_gpu[0] == {}


def test_cpu_load_runs_busy_processes_and_stops_them():
    def cpu_seconds() -> float:
        return sum(os.times()[2:4])  # children's user + system time, once they are reaped

    before = cpu_seconds()
    with noise.cpu_load(2):
        time.sleep(1.0)
    assert cpu_seconds() - before > 0.5, "the children were busy"


def _bench_result(latency_ms: float, paired: float | None = None) -> dict:
    result = {"metrics": {"latency_ms": latency_ms, "memory_mib": 10.0, "size_mib": 1.0, "accuracy": 0.9},
              "train": {"throughput": 100.0}, "latency": {"spread": 0.1},
              "latency_batch1": {"median_ms": latency_ms / 8}, "compile_s": 0.0,
              "compression": {"parameters_after": 1000}}
    if paired is not None:
        result["paired"] = {name: {"ratio": paired, "low": paired - 0.02, "high": paired + 0.02}
                            for name in ("latency", "latency_batch1")}
    return result


def test_the_one_at_a_time_tables_read_the_paired_latency_ratio_not_two_processes_medians():
    from advisor.bench.knobs import _knob_row

    baseline = _bench_result(8.0)  # measured while the machine was busy
    row = _knob_row("quantization=int8-static", _bench_result(1.0, paired=0.45), baseline, ok=True)
    assert row["latency_ms"] == pytest.approx({"value": 1.0, "ratio": 0.45, "low": 0.43, "high": 0.47})
    assert row["latency_batch1_ms"]["ratio"] == 0.45
    assert row["size_mib"]["ratio"] == 1.0
    unpaired = _knob_row("stored before pairing", _bench_result(1.0), baseline, ok=True)
    assert unpaired["latency_ms"]["ratio"] == 1.0 / 8.0
    assert _knob_row("baseline", baseline, baseline, ok=True)["latency_ms"]["ratio"] == 1.0


def test_optuna_learns_a_trials_latency_on_the_baseline_clock_where_it_has_a_paired_ratio():
    from advisor import objectives

    baseline = {"accuracy": 0.9, "latency_ms": 8.0, "memory_mib": 10.0, "size_mib": 1.0}
    result = _bench_result(1.0, paired=0.45)  # its own median read 1.0 ms on a quiet moment
    told = dict(zip(objectives.NAMES, objectives.told(result, baseline), strict=True))
    assert told["latency_ms"] == pytest.approx(8.0 * 0.45) and told["size_mib"] == 1.0
    assert objectives.told(_bench_result(1.0), baseline) == objectives.values(_bench_result(1.0)["metrics"])
    serving = {**result, "serving": {"p99_ms": 3.0}}  # a simulated p99 has no paired ratio
    assert dict(zip(objectives.NAMES, objectives.told(serving, baseline), strict=True))["latency_ms"] == 1.0


def test_the_zoo_table_shows_a_paired_latency_ratio_with_its_interval():
    from advisor.bench.knobs import _knob_row
    from advisor.bench.zoo import render_zoo

    baseline = _bench_result(8.0)
    rows = [_knob_row("baseline (fp32 eager)", baseline, baseline, ok=True),
            _knob_row("compile=default", _bench_result(2.0, paired=0.5), baseline, ok=True)]
    hardware = {"device": "cpu", "name": "a CPU", "torch_version": "2.13"}
    report = {"models": [{"model": "bert", "rows": rows, "excluded": [], "hardware": hardware,
                          "settings": {"trial_steps": 30, "latency_batch": 32}}]}
    text = render_zoo(report)
    assert "2 (0.50x, 0.48-0.52)" in text and "its ratio paired" in text
    assert "1 (1.00x)" in text, "size: a plain ratio"
