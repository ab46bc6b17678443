"""The serving simulator against latencies, batches and rates computed by hand."""

from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import pytest

from advisor.serving import ServiceTimes, ServingConfig, poisson_arrivals, queue_bound, schedule, simulate

EXACT = 1e-9  # ms; the hand-computed values differ from the simulator's only by float rounding


def linear(n: int) -> float:
    """4 ms fixed plus 1 ms per request: 5 ms for one, 6 ms for two, 7 ms for three."""
    return 0.004 + 0.001 * n


def ms(*values: float) -> np.ndarray:
    return np.array(values) / 1000.0


def test_unbatched_latency_is_the_service_time():
    arrivals = np.arange(10) * 0.010  # one every 10 ms: the server (5 ms) is idle in between
    result = simulate(arrivals, linear, ServingConfig(max_batch=1, max_wait_ms=0))
    assert result.p50_ms == pytest.approx(5.0, abs=EXACT)
    assert result.p99_ms == pytest.approx(5.0, abs=EXACT)
    assert result.mean_ms == pytest.approx(5.0, abs=EXACT)
    assert (result.served, result.dropped, result.late, result.mean_batch) == (10, 0, 0, 1.0)
    assert result.offered_rps == pytest.approx(100.0)
    assert result.capacity_rps == pytest.approx(200.0)
    assert result.throughput_rps == pytest.approx(10 / 0.095)  # last completion at 95 ms
    assert result.utilization == pytest.approx(50 / 95)
    assert not result.saturated and result.overload_share == 0.0


def test_batches_form_by_size_backlog_and_timeout():
    # max_batch 3, max_wait 2 ms. By hand:
    #   0, 1, 1.5 ms: the third fills the batch at 1.5 (before the 2 ms timeout) -> 1.5 + 7 = 8.5
    #   3, 4 ms: arrive while the server is busy; dispatched together when it frees, 8.5 + 6 = 14.5
    #   20 ms: alone, waits its 2 ms timeout -> 22 + 5 = 27
    arrivals = ms(0, 1, 1.5, 3, 4, 20)
    config = ServingConfig(max_batch=3, max_wait_ms=2)
    run = schedule(arrivals, linear, config)
    np.testing.assert_allclose(run.completion_s * 1000, [8.5, 8.5, 8.5, 14.5, 14.5, 27], atol=EXACT)
    assert run.batch_sizes.tolist() == [3, 2, 1]
    assert run.busy_s == pytest.approx(0.018)

    result = simulate(arrivals, linear, config)
    # Latencies sorted: 7, 7, 7.5, 8.5, 10.5, 11.5 (ms). Linear percentiles over 6 values:
    # p50 at rank 2.5 -> (7.5 + 8.5) / 2; p99 at rank 4.95 -> 10.5 + 0.95 * (11.5 - 10.5).
    assert result.p50_ms == pytest.approx(8.0, abs=EXACT)
    assert result.p99_ms == pytest.approx(11.45, abs=EXACT)
    assert result.mean_ms == pytest.approx(52 / 6, abs=EXACT)
    assert result.mean_batch == 2.0
    assert result.utilization == pytest.approx(18 / 27)
    assert result.throughput_rps == pytest.approx(6 / 0.027)
    assert result.offered_rps == pytest.approx(250.0)  # 5 gaps in 20 ms
    assert result.capacity_rps == pytest.approx(3 / 0.007)
    assert not result.saturated


def test_a_lone_request_waits_max_wait_then_is_served_alone():
    config = ServingConfig(max_batch=4, max_wait_ms=5)
    result = simulate(ms(100), linear, config)
    assert result.p50_ms == pytest.approx(5 + 5, abs=EXACT)  # 5 ms wait, then 5 ms for one
    assert result.mean_batch == 1.0
    # A second request within the wait joins the first: both dispatched at 5 ms, done at 5 + 6.
    run = schedule(ms(0, 3), linear, config)
    np.testing.assert_allclose(run.completion_s * 1000, [11, 11], atol=EXACT)
    assert run.batch_sizes.tolist() == [2]


def test_a_request_arriving_at_the_dispatch_instant_joins_the_batch():
    # Powers of two keep the times exact, so the tie is decided by the rule, not by rounding.
    run = schedule([0.0, 0.25], lambda n: 0.5, ServingConfig(max_batch=3, max_wait_ms=250))
    assert run.batch_sizes.tolist() == [2]
    assert run.completion_s.tolist() == [0.75, 0.75]


# Overload: a request every U, a batch of at most 2 takes 5 U, so capacity is 2 / (5 U) = 0.4 / U
# against 1 / U offered. U = 2**-10 s (~0.98 ms) keeps every sum exact.
U = 2.0**-10
OVERLOAD = {"arrivals": np.arange(1000) * U, "service_s": lambda n: 5 * U,
            "config": ServingConfig(max_batch=2, max_wait_ms=0)}


def units(ms_value: float) -> float:
    return ms_value / (1000 * U)


def test_overload_is_reported_and_latency_grows_without_bound():
    result = simulate(**OVERLOAD)
    assert result.saturated
    assert result.offered_rps == pytest.approx(1 / U)
    assert result.capacity_rps == pytest.approx(0.4 / U)
    # By hand: request 0 alone in [0, 5]; then requests 2j-1 and 2j go in a batch at 5j (the
    # server never idles again), done at 5j + 5: latencies 3j + 6 and 3j + 5 (j = 1..499);
    # request 999 alone at 2500, done at 2505: latency 1506. Sorted, rank 989 is 1490 (2j-1 with
    # j = 495) and rank 990 is 1491, so p99 (rank 0.99 * 999 = 989.01) is 1490.01.
    assert units(result.p99_ms) == pytest.approx(1490.01)
    assert units(result.mean_ms) == pytest.approx(755.5)  # (5 + sum(6j + 11) + 1506) / 1000
    assert units(result.p99_ms) > 200 * 5, "p99 must show the backlog, not the 5 U service time"
    # Throughput is capacity but for the first batch of one: 1000 / 2505 U, within 0.3 %.
    assert result.throughput_rps == pytest.approx(1000 / (2505 * U))
    assert result.throughput_rps == pytest.approx(result.capacity_rps, rel=0.003)
    assert result.utilization == pytest.approx(1.0)
    # Without a queue limit or a deadline nothing is dropped or late; saturated says it.
    assert (result.dropped, result.late, result.overload_share) == (0, 0, 0.0)


def test_overload_with_a_deadline_counts_late_requests():
    # Latencies 3j + 5 and 3j + 6 exceed 100.5 U from j = 32 on: requests 63..998, and 999.
    result = simulate(**OVERLOAD, deadline_ms=100.5 * U * 1000)
    assert result.late == 998 - 63 + 1 + 1
    assert result.overload_share == pytest.approx(0.937)
    assert result.served == 1000


def test_overload_with_a_queue_limit_drops_and_bounds_latency():
    result = simulate(**OVERLOAD, queue_limit=10)
    # By hand: the queue fills to 10 by 15 U; from then on, each 5 U cycle a dispatch frees 2
    # places, the next 2 arrivals take them and 3 are dropped (the one at the dispatch instant
    # counts as before it, with the queue full). Admitted: 0, 1..5, 6..10, 11..14, then 2 of
    # every 5 from 16 to 997 (197 cycles): 1 + 5 + 5 + 4 + 394 = 409.
    assert (result.served, result.dropped) == (409, 591)
    assert result.overload_share == pytest.approx(0.591)
    # In the steady state a request joins behind 8 and waits 4 dispatches (20 U) plus the rest of
    # the current service, 28 or 29 U in all; the 15 before it waited less.
    assert units(result.p50_ms) == pytest.approx(28)
    assert units(result.p99_ms) == pytest.approx(29)
    assert units(result.mean_ms) == pytest.approx((250 + 197 * (28 + 29)) / 409)
    assert result.saturated and result.utilization == pytest.approx(1.0)
    assert result.throughput_rps == pytest.approx(409 / (1025 * U))  # the last pair is done at 1025 U


def reference(arrivals: np.ndarray, service_s, cap: int, wait_s: float, limit: int | None) -> np.ndarray:
    """The same batcher written as a plain event loop: at each arrival, timeout or completion,
    admit what has arrived, then dispatch if the server is free and the batch is ready."""
    at, done, queue = arrivals.tolist(), [math.nan] * len(arrivals), []
    now, free, i = at[0], -math.inf, 0
    while i < len(at) or queue:
        while i < len(at) and at[i] <= now:
            if limit is None or len(queue) < limit:
                queue.append(i)
            i += 1
        if queue and free <= now and (len(queue) >= cap or now >= at[queue[0]] + wait_s):
            batch, queue = queue[:cap], queue[cap:]
            free = now + service_s(len(batch))
            for request in batch:
                done[request] = free
            continue
        events = [at[i]] if i < len(at) else []
        events += [at[queue[0]] + wait_s, free] if queue else []
        now = min(e for e in events if e > now)
    return np.array(done)


@pytest.mark.parametrize("rate", [300.0, 2000.0])
@pytest.mark.parametrize(("cap", "wait_ms", "limit"), [(1, 0, None), (3, 1.5, None), (8, 10, None),
                                                       (4, 2, 1), (4, 2, 5), (8, 0, 20)])
def test_agrees_with_a_plain_event_loop_on_random_arrivals(rate, cap, wait_ms, limit):
    arrivals = poisson_arrivals(rate, 2000, seed=cap)
    service = lambda n: 0.002 + 0.0004 * n  # noqa: E731
    run = schedule(arrivals, service, ServingConfig(max_batch=cap, max_wait_ms=wait_ms), queue_limit=limit)
    np.testing.assert_array_equal(run.completion_s, reference(arrivals, service, cap, wait_ms / 1000, limit))


def test_poisson_arrivals_are_reproducible_with_the_expected_rate():
    first, again = poisson_arrivals(200.0, 100_000, seed=7), poisson_arrivals(200.0, 100_000, seed=7)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, poisson_arrivals(200.0, 100_000, seed=8))
    assert first[0] > 0 and (np.diff(first) > 0).all()
    # The mean of 100k exponential gaps has a relative standard error of 1/sqrt(1e5) = 0.32 %;
    # 2 % is over 6 standard errors.
    assert np.diff(first, prepend=0.0).mean() == pytest.approx(1 / 200.0, rel=0.02)


def test_a_hundred_thousand_requests_simulate_in_well_under_a_second():
    arrivals = poisson_arrivals(1000.0, 100_000, seed=0)
    start = time.perf_counter()
    result = simulate(arrivals, lambda n: 0.002 + 0.0005 * n, ServingConfig(max_batch=8, max_wait_ms=2))
    assert time.perf_counter() - start < 1.0  # about 0.03 s on this machine's slow core
    assert result.served == 100_000 and not result.saturated


def test_to_dict_is_json_able():
    result = simulate(ms(0, 1, 1.5, 3, 4, 20), linear, ServingConfig(max_batch=3, max_wait_ms=2))
    assert json.loads(json.dumps(result.to_dict()))["p99_ms"] == pytest.approx(11.45)
    burst = simulate([0.0] * 5, linear, ServingConfig(max_batch=2, max_wait_ms=0))
    assert burst.saturated and burst.to_dict()["offered_rps"] is None
    assert simulate([1.0], linear, ServingConfig(max_batch=2, max_wait_ms=0)).offered_rps == 0.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_batch": 0, "max_wait_ms": 1}, "max_batch must be a positive integer; got 0"),
    ({"max_batch": 2.5, "max_wait_ms": 1}, "max_batch must be a positive integer; got 2.5"),
    ({"max_batch": True, "max_wait_ms": 1}, "max_batch must be a positive integer; got True"),
    ({"max_batch": 4, "max_wait_ms": -1}, "max_wait_ms must be a finite number >= 0; got -1"),
    ({"max_batch": 4, "max_wait_ms": float("nan")}, "max_wait_ms must be a finite number >= 0; got nan"),
])
def test_config_validation_says_what_was_expected_and_what_came(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ServingConfig(**kwargs)


def test_bad_inputs_are_refused():
    config = ServingConfig(max_batch=2, max_wait_ms=0)
    with pytest.raises(ValueError, match=r"rate must be a positive finite number.*; got 0"):
        poisson_arrivals(0, 10, seed=0)
    with pytest.raises(ValueError, match="n must be a positive integer; got 0"):
        poisson_arrivals(10.0, 0, seed=0)
    with pytest.raises(ValueError, match="queue_limit must be a positive integer; got 0"):
        simulate([0.0], linear, config, queue_limit=0)
    with pytest.raises(ValueError, match="deadline_ms must be a finite number >= 0; got -5"):
        simulate([0.0], linear, config, deadline_ms=-5)
    with pytest.raises(ValueError, match=r"non-decreasing order; got 0\.5 after 1\.0 at index 1"):
        simulate([1.0, 0.5], linear, config)
    with pytest.raises(ValueError, match=r"non-empty 1-D .*; got shape \(0,\)"):
        simulate([], linear, config)
    with pytest.raises(ValueError, match=r"service_s\(1\) must be a positive finite number of seconds; got 0"):
        simulate([0.0], lambda n: 0, config)


def test_service_times_measure_each_batch_size_once():
    calls: list[int] = []

    def measure(n: int) -> float:
        calls.append(n)
        return linear(n)

    service = ServiceTimes(measure)
    config = ServingConfig(max_batch=3, max_wait_ms=2)
    first = simulate(ms(0, 1, 1.5, 3, 4, 20), service, config)
    again = simulate(ms(0, 1, 1.5, 3, 4, 20), service, config)
    assert first == again
    assert sorted(calls) == [1, 2, 3]  # batches of 3, 2, 1; 3 is also capacity's
    assert service.measured == {1: linear(1), 2: linear(2), 3: linear(3)}
    assert service.capacity_rps(3) == pytest.approx(3 / 0.007)
    assert service.capacity_rps(4) == pytest.approx(4 / 0.008)
    assert calls.count(4) == 1
    with pytest.raises(ValueError, match=r"service_s\(2\) must be a positive finite number of seconds; got nan"):
        ServiceTimes(lambda n: float("nan"))(2)


def test_measured_service_times_vary_per_batch_and_reach_the_tail():
    # Batch 1 measured 97 calls of 1 ms and three of 20 ms: with the median alone every
    # request takes about 1 ms; drawn per batch, 3% take 20 and p99 shows it.
    calls = [0.001] * 97 + [0.020] * 3
    service = ServiceTimes(lambda n: calls, seed=0)
    config = ServingConfig(max_batch=1, max_wait_ms=0)
    arrivals = poisson_arrivals(10.0, 4000, seed=1)
    drawn = simulate(arrivals, service, config, typical_s=service.median)
    steady = simulate(arrivals, service.median, config)
    assert steady.p99_ms < 1.5
    assert drawn.p99_ms >= 20 and drawn.p50_ms == pytest.approx(1.0)
    assert drawn.capacity_rps == steady.capacity_rps == pytest.approx(1000.0), "capacity from the median"
    again = simulate(arrivals, ServiceTimes(lambda n: calls, seed=0), config,
                     typical_s=service.median)
    assert again == drawn, "the draws are seeded"
    assert service.measured == {1: 0.001}
    with pytest.raises(ValueError, match=r"service_s\(1\) must be a positive finite number of seconds; got -1"):
        ServiceTimes(lambda n: [0.001, -1])(1)


def test_warmup_requests_are_simulated_but_not_counted():
    # Four requests at once, 10 ms each alone: they finish at 10, 20, 30, 40 ms.
    arrivals = ms(0, 0, 0, 0)
    config = ServingConfig(max_batch=1, max_wait_ms=0)
    every = simulate(arrivals, lambda n: 0.010, config)
    later = simulate(arrivals, lambda n: 0.010, config, warmup=0.5)
    assert every.requests == 4 and every.p50_ms == pytest.approx(25.0, abs=EXACT)
    assert later.requests == later.served == 2 and later.p50_ms == pytest.approx(35.0, abs=EXACT)
    assert later.throughput_rps == every.throughput_rps, "rates are over the whole run"
    with pytest.raises(ValueError, match=r"warmup must be a share of the requests in \[0, 1\); got 1"):
        simulate(arrivals, lambda n: 0.010, config, warmup=1)


def test_the_queue_holds_what_the_server_serves_within_a_deadline():
    assert queue_bound(capacity=1000.0, max_batch=8, deadline_ms=100) == 100
    assert queue_bound(capacity=10.0, max_batch=8, deadline_ms=100) == 8, "at least a full batch"
    # Overloaded 2x: unbounded, p99 grows with the run; bounded, it stays near the deadline.
    arrivals = poisson_arrivals(2000.0, 20_000, seed=0)
    config = ServingConfig(max_batch=1, max_wait_ms=0)
    unbounded = simulate(arrivals, lambda n: 0.001, config, deadline_ms=100)
    bounded = simulate(arrivals, lambda n: 0.001, config, deadline_ms=100,
                       queue_limit=queue_bound(1000.0, 1, 100))
    assert unbounded.p99_ms > 2000 and bounded.p99_ms <= 102
    assert bounded.dropped > 0.4 * bounded.requests and bounded.overload_share > 0.4
