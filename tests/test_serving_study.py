"""Serving-aware studies: the serving knobs in the space, the p99 objective, and what the
terminal, the dashboard and the export show (the simulator itself: test_serving.py)."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import yaml
from test_search_bench import FULL

from advisor import export, knobs, serving
from advisor.errors import AdvisorError
from advisor.techniques import batcher
from conftest import FAST_ARGS, PLAIN, cli


def test_serving_knobs_join_the_space_only_under_a_rate():
    plain = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = plain.ask()
        knobs = FULL.suggest(trial)
        assert knobs.serving_max_batch == 0 and not any(p.startswith("serving") for p in trial.params)
    served = FULL.narrowed(serving_max_batch=batcher.MAX_BATCH, serving_max_wait_ms=batcher.MAX_WAIT_MS)
    seen = set()
    for _ in range(60):
        trial = plain.ask()
        knobs = served.suggest(trial)
        seen.add(knobs.serving_max_batch)
        assert knobs.serving_max_batch in batcher.MAX_BATCH
        if knobs.serving_max_batch == 1:
            # A batch of one never waits for company: the wait is not sampled.
            assert "serving_max_wait_ms" not in trial.params and knobs.serving_max_wait_ms == 0
    assert len(seen) > 3
    assert "serving_max_batch" not in FULL.to_dict() and served.to_dict()["serving_max_batch"] == [
        1, 2, 4, 8, 16, 32, 64]


def test_serving_knobs_outside_a_serving_study_are_refused_with_the_fix():
    with pytest.raises(AdvisorError, match="add --serving-rate"):
        FULL.check_values({"serving_max_batch": 8})
    FULL.check_values({"serving_max_batch": 0})  # the default is what every plain trial has


def test_the_baseline_serves_each_request_alone():
    assert knobs.baseline(1e-3, serving=True).serving_max_batch == 1
    assert knobs.baseline(1e-3).serving_max_batch == 0


def test_batches_are_padded_to_powers_of_two_up_to_max_batch():
    assert [serving.bucket(n, 16) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert serving.bucket(5, 6) == 6
    with pytest.raises(ValueError, match="exceeds max_batch"):
        serving.bucket(17, 16)


def test_a_config_written_before_the_serving_knobs_still_loads(tmp_path):
    from test_export import exported

    content = exported(tmp_path)
    for name in ("serving_max_batch", "serving_max_wait_ms"):
        content["knobs"].pop(name)
    path = export.write(content, tmp_path / "old.yaml")
    assert export.load_config(path).knobs.serving_max_batch == 0


SERVE = {**PLAIN, "serving_max_batch": 8, "serving_max_wait_ms": 2}


def _try(knobs: dict) -> list[str]:
    return ["--sampler", "random", "--seed", "0", "--try", ",".join(f"{k}={v}" for k, v in knobs.items())]


def test_a_serving_study_shows_p99_throughput_and_overload_everywhere(workdir):
    result = cli("run", "--model", "workloads:tensor_mlp", "--trials", "1", *FAST_ARGS,
                 "--serving-rate", "2000", "--serving-requests", "500", *_try(SERVE))
    assert result.code == 0, result.err
    out = result.out
    assert "Serving: 2000 requests/s" in out
    for column in ("serve", "p99 ms", "served/s", "overload"):
        assert column in out.split("Pareto front")[1]
    assert "b8 w2ms" in out and "b1 w0ms" in out  # the trial and the baseline's lone requests
    assert "serving at 2000 requests/s: batches of up to 8, waiting at most 2 ms" in out
    stored = optuna.load_study(study_name="tensor-mlp", storage="sqlite:///studies/advisor.db")
    t = stored.trials[0]
    served = t.user_attrs["result"]["serving"]
    # The latency objective is p99 under load, told to the sampler on the baseline's clock:
    # the paired p99 ratio times the baseline's p99.
    pair = t.user_attrs["result"]["paired"]["serving_p99"]
    assert pair["ms"] == served["p99_ms"] and pair["low"] <= pair["ratio"] <= pair["high"]
    assert pair["ratio"] == pytest.approx(pair["ms"] / pair["reference_ms"])
    base_p99 = stored.user_attrs["baseline"]["metrics"]["latency_ms"]
    assert t.values[1] == pytest.approx(base_p99 * pair["ratio"])
    assert f"({pair['ratio']:.2f}x, {pair['low']:.2f}-{pair['high']:.2f})" in out  # shown with its interval
    # 500 simulated; the first 10% (the warm-up) are left out of the counts and percentiles.
    assert served["requests"] == 450 and served["served"] + served["dropped"] == 450
    assert set(served["batch_ms"]) <= {"1", "2", "4", "8"} and "8" in served["batch_ms"]
    # The baseline runs each request alone: its only measured batch size is 1.
    assert set(stored.user_attrs["baseline"]["serving"]["batch_ms"]) == {"1"}

    page = (workdir / "dashboards" / "tensor-mlp.html").read_text()
    assert "p99 request latency (ms)" in page and "Serving load: 2000 requests/s" in page
    assert "served requests/s" in page

    assert cli("export", "--study", "tensor-mlp", "-o", "rec.yaml").code == 0
    content = yaml.safe_load((workdir / "rec.yaml").read_text())
    assert content["knobs"]["serving_max_batch"] in (1, 8)
    assert content["serving"]["rate"] == 2000 and content["serving"]["requests"] == 500
    assert content["serving"]["counted"] == 450, "the warm-up is left out"
    loaded = export.load_config(workdir / "rec.yaml")
    assert loaded.knobs.serving_max_batch == content["knobs"]["serving_max_batch"]


def _paired(rounds: dict, max_batch: int, rate: float = 50.0, wait_s: float = 0.0) -> dict:
    from advisor.trial import served
    from advisor.trial.spec import Settings

    settings = Settings(serving_rate=rate, serving_requests=400, serving_deadline_ms=1000.0)
    config = serving.ServingConfig(max_batch, wait_s)
    arrivals = serving.poisson_arrivals(rate, 400, 0)
    service = serving.ServiceTimes(lambda size: rounds[size][0], seed=0)
    result = served._serve(arrivals, service, config, settings)
    return served.paired_p99(result, rounds, None, arrivals, config, settings)


def test_a_paired_p99_ratio_reads_one_for_the_baseline_and_two_for_a_model_twice_as_slow():
    rng = np.random.default_rng(0)
    calls = list(rng.uniform(0.001, 0.002, 60))
    same = _paired({1: (calls, calls)}, max_batch=1)
    assert same["ratio"] == 1.0 and same["low"] == same["high"] == 1.0
    # At one request per 100 s (on average) no request waits: each latency is its service time.
    twice = _paired({1: ([2 * t for t in calls], calls)}, max_batch=1, rate=0.01)
    assert twice["ratio"] == pytest.approx(2.0) and twice["low"] <= 2.0 <= twice["high"]
    assert twice["ms"] == pytest.approx(2 * twice["reference_ms"])


def test_a_paired_p99_interval_widens_with_the_rounds_disagreement():
    rng = np.random.default_rng(1)
    base = list(rng.uniform(0.001, 0.0011, 40))
    steady = _paired({1: ([1.5 * t for t in base], base)}, max_batch=1)
    noisy = _paired({1: ([t * rng.choice([1.0, 3.0]) for t in base], base)}, max_batch=1)
    assert steady["high"] - steady["low"] < 0.05 < noisy["high"] - noisy["low"]


def test_a_paired_p99_interval_holds_its_ratio_where_the_resamples_are_biased():
    # Rounds like a batching trial near saturation: here every resample's p99 ratio falls
    # below the run's (a queue's tail quantile is biased under resampling), so the bare
    # percentile interval would sit wholly below the ratio printed beside it.
    rng = np.random.default_rng(21)
    base = list(rng.uniform(0.0002, 0.0004, 30))
    rounds = {size: (list(rng.uniform(0.0005, 0.003, 30)), base) for size in (1, 2, 4, 8)}
    pair = _paired(rounds, max_batch=8, rate=2000.0, wait_s=0.002)
    assert pair["low"] < pair["ratio"] == pair["high"], pair


def test_a_rate_beyond_capacity_is_reported_not_hidden(workdir):
    result = cli("run", "--model", "workloads:tensor_mlp", "--trials", "1", *FAST_ARGS,
                 "--serving-rate", "10000000", "--serving-requests", "3000",
                 "--serving-deadline-ms", "1", *_try({**SERVE, "serving_max_batch": 1}))
    assert result.code == 0, result.err
    assert "SATURATED" in result.out
    stored = optuna.load_study(study_name="tensor-mlp", storage="sqlite:///studies/advisor.db")
    served = stored.trials[0].user_attrs["result"]["serving"]
    assert served["saturated"] and served["overload_share"] > 0.5
    assert served["throughput_rps"] < served["offered_rps"]
    json.dumps(served)


@pytest.mark.parametrize("flags, message", [
    (["--serving-rate", "-5"], "--serving-rate must be >= 0"),
    (["--serving-requests", "0"], "--serving-requests must be > 0"),
    (["--serving-deadline-ms", "0"], "--serving-deadline-ms must be > 0"),
    (["--try", "serving_max_batch=8"], "add --serving-rate"),
])
def test_bad_serving_input_gets_one_line(workdir, flags, message):
    result = cli("run", "--model", "workloads:tensor_mlp", "--trials", "1", *FAST_ARGS, *flags)
    assert result.code != 0 and message in result.err and "Traceback" not in result.err
