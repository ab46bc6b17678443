"""A trial's latency as a server sees it, in a serving study: the simulated dynamic batcher
and server of ``advisor/serving.py`` fed by the batch times measured at each padded size,
and the p99 ratio to the baseline's server on the same arrivals (``paired_p99``)."""

from __future__ import annotations

import time

import numpy as np
import torch

from advisor import serving
from advisor.knobs import baseline as knobs_baseline
from advisor.objectives import CONFIDENCE
from advisor.techniques.batcher import BatcherConfig
from advisor.trial import measure
from advisor.trial.mapped import MappedSplit
from advisor.trial.spec import Settings
from advisor.workload import call_model, to_device


def measure_serving(infer, val: MappedSplit, batcher: BatcherConfig, settings: Settings,
                    device: torch.device, reference: torch.nn.Module | None = None) -> dict:
    """Request latency under the study's Poisson load: the simulated batcher and server of
    ``advisor/serving.py``, each batch taking one of the times measured at its padded size
    (measured once each, on first use, like the latency objective).

    With the baseline's ``reference`` model, each size's calls are timed interleaved with the
    reference's at batch 1 (``measure.time_paired``), and the baseline's server (each request
    alone, ``knobs.baseline``) is simulated on the same arrivals from those reference calls:
    the p99 ratio of the two is paired like a batch latency's, with an interval from
    re-simulating both on rounds resampled together (``paired_p99``)."""
    timings: dict[int, measure.Timing] = {}
    rounds: dict[int, tuple[list[float], list[float]]] = {}  # size -> (this model's s, baseline's s)

    def inputs_at(size: int):
        return to_device(val.batch(np.arange(size) % len(val))[0], device)

    def time_batch(size: int) -> list[float]:
        inputs = inputs_at(size)
        if reference is None:
            timings[size] = measure.time_calls(lambda: infer(inputs), device,
                                               budget_s=settings.latency_seconds / 2)
            return [t / 1e3 for t in timings[size].samples_ms]
        one = inputs_at(1)
        measure.synchronize(device)
        began = time.perf_counter()
        infer(inputs)  # a compiled model compiles for this size here, as time_calls' first call
        measure.synchronize(device)
        first_ms = (time.perf_counter() - began) * 1e3

        @torch.no_grad()
        def base():
            return call_model(reference, one)

        pair = measure.time_paired(lambda: infer(inputs), base, device, budget_s=settings.latency_seconds / 2)
        rounds[size] = (list(pair.seconds[0]), list(pair.seconds[1]))
        timings[size] = measure.Timing.of([t * 1e3 for t in rounds[size][0]], first_ms)
        return rounds[size][0]

    config = batcher.simulated()
    arrivals = serving.poisson_arrivals(settings.serving_rate, settings.serving_requests, settings.seed)
    result = _serve(arrivals, serving.ServiceTimes(time_batch, seed=settings.seed), config, settings)
    out = {"result": result, "timings": dict(sorted(timings.items()))}
    if reference is not None:
        out["paired"] = paired_p99(result, rounds, time_batch, arrivals, config, settings)
    return out


def _serve(arrivals, service: serving.ServiceTimes, config: serving.ServingConfig,
           settings: Settings) -> serving.ServingResult:
    """One simulated run of ``arrivals`` on a server whose batches take ``service``'s times."""
    return serving.simulate(arrivals, lambda n: service(serving.bucket(n, config.max_batch)), config,
                            deadline_ms=settings.serving_deadline_ms, warmup=serving.WARMUP,
                            queue_limit=serving.queue_bound(service.capacity_rps(config.max_batch),
                                                            config.max_batch, settings.serving_deadline_ms),
                            typical_s=lambda n: service.median(serving.bucket(n, config.max_batch)))


PAIRED_P99_RESAMPLES = 50


def paired_p99(result: serving.ServingResult, rounds: dict[int, tuple[list[float], list[float]]],
               time_batch, arrivals, config: serving.ServingConfig, settings: Settings) -> dict:
    """This model's simulated p99 over the baseline's, from calls timed interleaved
    (``rounds``: per padded size, this model's seconds and the baseline's at batch 1 in the
    same rounds). The baseline's server runs each request alone on the pooled batch-1 calls,
    on the same arrivals. The interval: both simulated again on rounds resampled together,
    ``PAIRED_P99_RESAMPLES`` times (a size a resample's batches reach that the run did not is
    timed then, paired like the others). A tail quantile of a queue is biased under
    resampling (the resamples' p99 can all sit on one side of the run's), so the percentile
    interval is widened to hold the ratio it is printed beside: wider, never narrower."""
    alone = knobs_baseline(settings.lr, serving=True).config(BatcherConfig).simulated()

    def reference_p99(chosen: dict[int, tuple[list[float], list[float]]]) -> float:
        calls = [t for _, base in chosen.values() for t in base]
        service = serving.ServiceTimes(lambda size: calls, seed=settings.seed)
        return _serve(arrivals, service, alone, settings).p99_ms

    base_p99 = reference_p99(rounds)
    rng = np.random.default_rng(settings.seed)

    def resampler(chosen: dict[int, tuple[list[float], list[float]]]):
        def resampled(size: int) -> list[float]:
            if size not in rounds:
                time_batch(size)
            mine, base = rounds[size]
            pick = rng.integers(len(mine), size=len(mine))
            chosen[size] = ([mine[i] for i in pick], [base[i] for i in pick])
            return chosen[size][0]
        return resampled

    ratios = []
    for _ in range(PAIRED_P99_RESAMPLES):
        chosen: dict[int, tuple[list[float], list[float]]] = {}
        service = serving.ServiceTimes(resampler(chosen), seed=settings.seed)
        ratios.append(_serve(arrivals, service, config, settings).p99_ms / reference_p99(chosen))
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    ratio = result.p99_ms / base_p99
    return {"ratio": ratio, "low": float(min(low, ratio)), "high": float(max(high, ratio)),
            "rounds": min(len(mine) for mine, _ in rounds.values()), "ms": result.p99_ms,
            "reference_ms": base_p99, "resamples": PAIRED_P99_RESAMPLES}
