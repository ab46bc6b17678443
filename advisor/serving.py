"""Serving simulator: the latency a user's inference server would see, on a simulated clock.

Requests arrive (``poisson_arrivals``), a dynamic batcher groups them, one model instance
serves each batch in ``service_s(batch_size)`` seconds (in production the measured median,
through ``ServiceTimes``), and ``simulate`` reports percentiles, drops, deadline misses and
whether the offered rate exceeds capacity. Pure and deterministic: the same arrivals and
service times give the same result, whatever the load on the machine.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from numbers import Integral, Real

import numpy as np

PERCENTILE_METHOD = "linear"


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def _non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(value)


def _service(service_s: Callable[[int], float], size: int) -> float:
    seconds = service_s(size)
    if isinstance(seconds, bool) or not isinstance(seconds, Real) or not 0 < seconds < math.inf:
        raise ValueError(f"service_s({size}) must be a positive finite number of seconds; got {seconds!r}")
    return float(seconds)


def capacity_rps(service_s: Callable[[int], float], max_batch: int) -> float:
    """Requests per second one instance serves when every batch is full."""
    size = _positive_int("max_batch", max_batch)
    return size / _service(service_s, size)


@dataclass(frozen=True)
class ServingConfig:
    """Dispatch at ``max_batch`` queued requests, or once the oldest has waited ``max_wait_ms``."""

    max_batch: int
    max_wait_ms: float

    def __post_init__(self) -> None:
        _positive_int("max_batch", self.max_batch)
        _non_negative("max_wait_ms", self.max_wait_ms)


class ServiceTimes:
    """``service_s`` that measures each distinct batch size once, on first use.

    ``measure(batch_size)`` does the real timing (warm-up, synchronize, repeats) and returns
    the median in seconds, or every timed call's seconds. ``measured`` holds {batch_size:
    median seconds} for the report. With per-call times, each batch served takes one of them,
    drawn with the seeded ``rng`` (service-time variance reaches the percentiles); ``median``
    is what capacity is computed from.
    """

    def __init__(self, measure: Callable[[int], float | Sequence[float]], seed: int = 0) -> None:
        self._measure = measure
        self.measured: dict[int, float] = {}
        self.samples: dict[int, list[float]] = {}
        self.rng = np.random.default_rng(seed)

    def _ensure(self, size: int) -> None:
        if size in self.measured:
            return
        seconds = self._measure(size)
        several = isinstance(seconds, (list, tuple, np.ndarray))
        # Each time must be a positive finite number of seconds.
        calls = [_service(lambda _, t=t: t, size) for t in seconds] if several else []
        self.samples[size] = calls
        self.measured[size] = float(np.median(calls)) if calls else _service(lambda _: seconds, size)

    def __call__(self, batch_size: int) -> float:
        size = _positive_int("batch_size", batch_size)
        self._ensure(size)
        calls = self.samples[size]
        return calls[int(self.rng.integers(len(calls)))] if calls else self.measured[size]

    def median(self, batch_size: int) -> float:
        size = _positive_int("batch_size", batch_size)
        self._ensure(size)
        return self.measured[size]

    def capacity_rps(self, max_batch: int) -> float:
        return capacity_rps(self.median, max_batch)


WARMUP = 0.1  # the share of a serving study's first requests left out of its statistics


def queue_bound(capacity: float, max_batch: int, deadline_ms: float) -> int:
    """How many requests a server's queue holds: what it serves at full speed within one
    deadline (at least a full batch). A request arriving behind more would be late anyway;
    it is dropped and counted, and an overloaded server's p99 stays finite."""
    return max(_positive_int("max_batch", max_batch),
               math.ceil(capacity * _non_negative("deadline_ms", deadline_ms) / 1000.0))


def bucket(n: int, max_batch: int) -> int:
    """The batch size a batch of ``n`` requests runs at: padded to the next power of two, at
    most ``max_batch``. A server keeps a few static shapes warm (a compiled or exported model
    is specialized to its shapes), so it pads rather than running every size."""
    size, cap = _positive_int("n", n), _positive_int("max_batch", max_batch)
    if size > cap:
        raise ValueError(f"a batch of {size} exceeds max_batch {cap}")
    return min(1 << (size - 1).bit_length(), cap)


def poisson_arrivals(rate: float, n: int, seed: int) -> np.ndarray:
    """``n`` arrival times in seconds of a Poisson process of ``rate`` requests/s, from 0."""
    if isinstance(rate, bool) or not isinstance(rate, Real) or not 0 < rate < math.inf:
        raise ValueError(f"rate must be a positive finite number of requests per second; got {rate!r}")
    count = _positive_int("n", n)
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, count))


@dataclass(frozen=True)
class Schedule:
    """Per request: arrival and completion (NaN when dropped); batch sizes in dispatch order."""

    arrival_s: np.ndarray
    completion_s: np.ndarray
    batch_sizes: np.ndarray
    busy_s: float


def schedule(arrivals: Sequence[float] | np.ndarray, service_s: Callable[[int], float],
             config: ServingConfig, *, queue_limit: int | None = None) -> Schedule:
    """Run the batcher of ``simulate`` (see there) and keep what happened to each request."""
    at_array = np.asarray(arrivals, dtype=float)
    if at_array.ndim != 1 or at_array.size == 0 or not np.isfinite(at_array).all():
        raise ValueError(f"arrivals must be a non-empty 1-D sequence of finite times in seconds; "
                         f"got shape {at_array.shape}")
    if (np.diff(at_array) < 0).any():
        index = int(np.argmax(np.diff(at_array) < 0)) + 1
        raise ValueError(f"arrivals must be in non-decreasing order; got {at_array[index]} after "
                         f"{at_array[index - 1]} at index {index}")
    limit = None if queue_limit is None else _positive_int("queue_limit", queue_limit)
    at = at_array.tolist()  # Python floats: indexing a list is many times faster than numpy here
    n, cap, wait = len(at), config.max_batch, config.max_wait_ms / 1000.0
    done = [math.nan] * n
    sizes: list[int] = []
    queue: deque[int] = deque()
    free, busy, i = -math.inf, 0.0, 0
    while i < n or queue:
        if not queue:
            queue.append(i)  # an empty queue has room whatever the limit (>= 1)
            i += 1
        oldest = at[queue[0]]
        # A queue that starts the cycle full arrived before `free`, or is one fresh request with
        # max_batch 1; either way nothing waits for the oldest's timeout.
        t = max(free, oldest if len(queue) >= cap else oldest + wait)
        while i < n and at[i] <= t:
            if limit is None or len(queue) < limit:
                queue.append(i)
                if len(queue) == cap:
                    t = max(free, at[i])
            i += 1
        size = min(cap, len(queue))
        duration = _service(service_s, size)  # per batch: a measured service time may vary
        free = t + duration
        busy += duration
        sizes.append(size)
        for _ in range(size):
            done[queue.popleft()] = free
    return Schedule(at_array, np.array(done), np.array(sizes, dtype=int), busy)


@dataclass(frozen=True)
class ServingResult:
    """What a user's server would report; times in ms, rates in requests/s."""

    requests: int
    served: int
    dropped: int
    late: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    throughput_rps: float
    offered_rps: float
    capacity_rps: float
    utilization: float
    mean_batch: float
    overload_share: float
    saturated: bool

    def to_dict(self) -> dict:
        """JSON-able; an infinite offered rate (several requests, all at one instant) becomes None."""
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in asdict(self).items()}


def simulate(arrivals: Sequence[float] | np.ndarray, service_s: Callable[[int], float],
             config: ServingConfig, *, queue_limit: int | None = None,
             deadline_ms: float | None = None, warmup: float = 0.0,
             typical_s: Callable[[int], float] | None = None) -> ServingResult:
    """Serve ``arrivals`` (seconds, non-decreasing) with one instance behind a dynamic batcher.

    Whenever the server is free and the queue is not empty, a batch is dispatched at
    ``t = max(server_free, min(time the queue reaches max_batch, oldest arrival + max_wait))``.
    Requests arriving at or before ``t`` join the queue first (ties count as before the
    dispatch); the batch takes the first ``min(max_batch, queued)`` in arrival order and ends at
    ``t + service_s(size)``, called once per batch (a measured service time may vary from batch
    to batch); ``typical_s`` (default ``service_s``) gives the capacity.

    A request that arrives while ``queue_limit`` requests wait (those in service not counted)
    is dropped; None is unbounded. The first request always finds an empty queue, so at least
    one is served and the statistics are always defined. A served request's latency is its
    completion minus its arrival; it is late when latency > ``deadline_ms``. p50/p99 are
    ``numpy.percentile(method="linear")`` over served requests. Spans run from the first
    arrival: throughput = served / (last completion - first arrival), utilization = busy time
    over that span, offered = (requests - 1) / (last arrival - first arrival), the rate of
    the inter-arrival gaps (infinite when several requests share one instant, 0 for one).
    capacity = max_batch / typical_s(max_batch); saturated = offered > capacity.
    overload_share = (dropped + late) / requests.

    ``warmup``: the share of the first requests (by arrival) simulated but left out of the
    request counts and latency statistics, so the empty queue at the start does not flatter
    them (all requests count again if none after it was served); throughput, utilization and
    the mean batch are over the whole run.
    """
    deadline = None if deadline_ms is None else _non_negative("deadline_ms", deadline_ms)
    if isinstance(warmup, bool) or not isinstance(warmup, Real) or not 0 <= warmup < 1:
        raise ValueError(f"warmup must be a share of the requests in [0, 1); got {warmup!r}")
    run = schedule(arrivals, service_s, config, queue_limit=queue_limit)
    capacity = capacity_rps(typical_s or service_s, config.max_batch)
    served_all = ~np.isnan(run.completion_s)
    counted = np.arange(len(run.arrival_s)) >= math.ceil(warmup * len(run.arrival_s))
    if not (served_all & counted).any():
        counted[:] = True
    served_mask = served_all & counted
    latency_ms = (run.completion_s[served_mask] - run.arrival_s[served_mask]) * 1000.0
    requests, served = int(counted.sum()), int(served_mask.sum())
    late = 0 if deadline is None else int((latency_ms > deadline).sum())
    first = float(run.arrival_s[0])
    span = float(np.nanmax(run.completion_s)) - first
    gaps = float(run.arrival_s[-1]) - first
    total = len(run.arrival_s)
    offered = (total - 1) / gaps if gaps > 0 else (math.inf if total > 1 else 0.0)
    p50, p99 = np.percentile(latency_ms, [50, 99], method=PERCENTILE_METHOD)
    return ServingResult(
        requests=requests, served=served, dropped=requests - served, late=late,
        p50_ms=float(p50), p99_ms=float(p99), mean_ms=float(latency_ms.mean()),
        throughput_rps=int(served_all.sum()) / span, offered_rps=offered, capacity_rps=capacity,
        utilization=run.busy_s / span, mean_batch=int(served_all.sum()) / len(run.batch_sizes),
        overload_share=(requests - served + late) / requests, saturated=bool(offered > capacity))
