"""One trial, start to end, in the order of ``compress.py``: load the workload and the
baseline's weights from the study's cache, prune, fine-tune, quantize, compile, then measure
latency, serving, accuracy, size, training memory, and profile.

``run`` is what a trial process runs (``process.py``); ``measure_trial`` also hands back the
deployable model, which ``advisor apply`` keeps.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from advisor import serving
from advisor.errors import AdvisorError
from advisor.knobs import Knobs
from advisor.knobs import baseline as knobs_baseline
from advisor.objectives import CONFIDENCE
from advisor.techniques import checkpointing, distillation, precision
from advisor.techniques import compile as compile_technique
from advisor.techniques.batcher import BatcherConfig
from advisor.techniques.checkpointing import CheckpointConfig
from advisor.techniques.compile import CompileConfig
from advisor.techniques.distillation import DistillationConfig
from advisor.techniques.precision import PrecisionConfig
from advisor.techniques.quantization import QuantizationConfig
from advisor.trial import compress, measure, profile
from advisor.trial.cache import StudyCache
from advisor.trial.mapped import MappedSplit
from advisor.trial.measure import MIB, MemoryMeter
from advisor.trial.spec import Settings, TrialSpec
from advisor.trial.train import Trainer, fine_tune, training_memory
from advisor.workload import WorkloadRef, call_model, to_device


def run(spec: TrialSpec, phase) -> dict:
    """Run the trial ``spec`` describes; its JSON-able result."""
    return measure_trial(spec, phase)[0]


def measure_trial(spec: TrialSpec, phase) -> tuple[dict, compress.Deployable]:
    """The trial's result and its deployable model (``advisor apply`` keeps the model)."""
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.settings.seed)
    device = torch.device("cuda", 0) if spec.device == "cuda" else torch.device("cpu")
    if device.type == "cuda" and torch.cuda._is_in_bad_fork():
        raise AdvisorError("CUDA was initialized in the trial server before it forked this "
                           "trial; the trial cannot use the GPU")
    settings, knobs, cache = spec.settings, spec.knobs, spec.cache
    model, loss, metric = cache.load_workload(spec.ref)
    train, val = cache.split("train"), cache.split("val")
    lengths = cache.lengths(spec.lengths)
    model.to(device)
    if spec.role == "baseline" and spec.train_baseline:
        phase("baseline_train")
        _train_baseline(model, train, loss, spec, device)
    else:
        model.load_state_dict(torch.load(cache.baseline_file, map_location=device, weights_only=True))

    precision_cfg = knobs.config(PrecisionConfig)
    batch, one = latency_inputs(val, settings.latency_batch, device)

    # What shapes or sets the model (pruning's trace, QAT's first forward and its observers,
    # PT2E's capture) sees training data only: validation data is what the trial is judged on.
    example, _ = train.batch(measure.fixed_batches(len(train), settings.latency_batch)[0][0])
    example = to_device(example, device)

    as_given = None
    if spec.role == "baseline" and spec.trained:
        # A trained workload's model as given, before the baseline's fine-tune with the default
        # knobs (which the trials are compared with, like with like): its own accuracy.
        phase("evaluate")
        model.eval()
        as_given = measure.evaluate_parts(model, val, metric, batch=settings.latency_batch, device=device,
                                          autocast=contextlib.nullcontext())

    # The fixed order of trial/compress.py: prune -> fine-tune -> quantize -> compile -> measure.
    phase("prune")
    teacher = distillation.teacher(model, knobs.config(DistillationConfig))  # the baseline, before compression
    student, pruned = compress.student(model, knobs, example, spec.keep)

    phase("train")
    wrapped = checkpointing.apply(student, knobs.config(CheckpointConfig))
    compiled = compile_technique.apply(student, knobs.config(CompileConfig))
    trainer = Trainer(student, compiled, train, loss, knobs, batch_size=spec.batch_size,
                      steps=settings.trial_steps, device=device, seed=settings.seed,
                      teacher=teacher, lengths=lengths)
    meter = MemoryMeter(device)
    report = fine_tune(trainer, settings.trial_steps, settings.warmup_steps, meter)
    training_pools = measure.graph_pool_bytes(device)  # before inference records graphs of its own

    phase("quantize")
    began = time.perf_counter()
    calibration = (calibration_batches(train, settings.latency_batch, device)
                   if knobs.config(QuantizationConfig).calibrated else [])
    deploy = compress.deployable(student, knobs, example, calibration)
    quantize_s = time.perf_counter() - began
    autocast_on = precision_cfg if deploy.autocast else PrecisionConfig()

    @torch.no_grad()
    def infer(inputs=batch):
        with precision.autocast(autocast_on, device.type):
            return call_model(deploy.run, inputs)

    # Latency first: its first timed call is where a compiled model compiles for inference.
    phase("latency")
    latency = measure.time_calls(infer, device, budget_s=settings.latency_seconds)
    latency_b1 = measure.time_calls(lambda: infer(one), device,
                                    budget_s=settings.latency_seconds / 2)

    # The ratios to the baseline: its model timed in this process, interleaved with this one.
    paired = {}
    reference = reference_model(spec.cache, spec.ref, device) if spec.role != "baseline" else None
    if reference is not None:
        phase("paired")
        paired = paired_latency(infer, reference, batch, one, device, settings.latency_seconds)

    serve = None
    batcher = knobs.config(BatcherConfig)
    if settings.serving_rate > 0 and batcher.enabled:
        phase("serving")
        serve = measure_serving(infer, val, batcher, settings, device, reference)

    phase("evaluate")
    scores = measure.evaluate_parts(deploy.run, val, metric, batch=settings.latency_batch,
                                    device=device, autocast=precision.autocast(autocast_on, device.type))
    accuracy = scores["selection"]

    phase("size")
    size = measure.weight_bytes(deploy.module)

    phase("memory")
    memory = training_memory(trainer, meter, graph_pools=training_pools)

    phase("profile")
    compiled.train()
    train_ops = profile.top_operators(trainer.step, settings.profile_steps, device)
    infer_ops = profile.top_operators(infer, settings.profile_steps, device)

    compile_s = report.compile_s
    if deploy.info["compile"] != "none":
        # The first inference calls at each batch size compiled their graphs.
        for timing in (latency, latency_b1, *(serve["timings"].values() if serve else ())):
            compile_s += max(0.0, (timing.first_ms - timing.median_ms) / 1e3)
    result = {
        "metrics": {
            "accuracy": accuracy,
            # Under a serving load the latency objective is what a request sees: p99.
            "latency_ms": serve["result"].p99_ms if serve else latency.median_ms,
            "memory_mib": memory.memory_mib,
            "size_mib": size / MIB,
        },
        # The other part of the validation split: only the recommendation's report reads it.
        "confirmation": {"accuracy": scores["confirmation"], "samples": scores["samples"],
                         "per_sample": scores["per_sample"]},
        "latency": latency.to_dict(),
        "latency_batch1": latency_b1.to_dict(),
        **({"paired": {**paired, **({"serving_p99": serve["paired"]} if serve and "paired" in serve else {})}}
           if paired else {}),
        **({"as_given": {"accuracy": as_given["selection"], "confirmation": as_given["confirmation"]}}
           if as_given else {}),
        **({"serving": {**serve["result"].to_dict(), "rate": settings.serving_rate,
                        "deadline_ms": settings.serving_deadline_ms,
                        "max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait_ms,
                        "batch_ms": {str(b): t.to_dict() for b, t in serve["timings"].items()}}}
           if serve else {}),
        "train": {
            "throughput": report.throughput,
            "step_ms": report.step_ms,
            "runtime_init_mib": report.runtime_init_mib,
            "micro_batches": report.micro_batches,
            "optimizer_steps": report.steps,
            "final_loss": report.final_loss,
            "warmup_s": report.warmup_s,
            **({"tokens_per_s": report.tokens_per_s, "padding_share": report.padding_share}
               if lengths is not None else {}),
        },
        "memory": {"transient_mib": memory.transient_mib, "state_mib": memory.state_mib,
                   "graph_pool_mib": memory.graph_pool_mib, "steps": memory.steps},
        "compile_s": compile_s,
        "size_bytes": size,
        "compression": {**pruned, **deploy.info, "quantize_s": quantize_s},
        "checkpointed_blocks": wrapped,
        "process_peak_mib": meter.process_peak() / MIB,
        "profile": {"train": train_ops, "inference": infer_ops},
    }
    return result, deploy


def latency_inputs(val: MappedSplit, latency_batch: int, device: torch.device) -> tuple:
    """The inputs latency is timed on: the validation split's first batch of ``latency_batch``
    samples, and its first sample alone (batch 1)."""
    batch, _ = val.batch(measure.fixed_batches(len(val), latency_batch)[0][0])
    one, _ = val.batch(slice(0, 1))
    return to_device(batch, device), to_device(one, device)


def reference_model(cache: StudyCache, ref: WorkloadRef, device: torch.device) -> torch.nn.Module:
    """The baseline's deployable model: the workload's model with the baseline's weights, fp32
    and eager (``knobs.baseline``), as the baseline run measured it."""
    model, _, _ = cache.load_workload(ref)
    model.load_state_dict(torch.load(cache.baseline_file, map_location=device, weights_only=True))
    return model.to(device).eval().requires_grad_(False)


def paired_latency(infer, reference: torch.nn.Module, batch, one, device: torch.device,
                   budget_s: float) -> dict:
    """The trial's latency over the baseline's at the latency batch and at batch 1, each
    timed interleaved with the baseline's model (``measure.time_paired``)."""

    @torch.no_grad()
    def base(inputs=batch):
        return call_model(reference, inputs)

    return {"latency": measure.time_paired(infer, base, device, budget_s=budget_s).to_dict(),
            "latency_batch1": measure.time_paired(lambda: infer(one), lambda: base(one), device,
                                                  budget_s=budget_s / 2).to_dict()}


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
    timed then, paired like the others)."""
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
    return {"ratio": result.p99_ms / base_p99, "low": float(low), "high": float(high),
            "rounds": min(len(mine) for mine, _ in rounds.values()), "ms": result.p99_ms,
            "reference_ms": base_p99, "resamples": PAIRED_P99_RESAMPLES}


def calibration_batches(train: MappedSplit, batch: int, device: torch.device,
                        samples: int = 512) -> list:
    """Inputs to calibrate static quantization: a fixed subset of the training data."""
    idx = np.random.default_rng(0).permutation(len(train))[:samples]
    return [to_device(train.batch(idx[i:i + batch])[0], device) for i in range(0, len(idx), batch)]


def _train_baseline(model, train: MappedSplit, loss, spec: TrialSpec, device) -> None:
    """Train the workload's model with the default knobs and save its weights for the study."""
    settings = spec.settings
    trainer = Trainer(model, model, train, loss, Knobs(lr=float(settings.lr)), batch_size=spec.batch_size,
                      steps=settings.baseline_steps, device=device, seed=settings.seed)
    model.train()
    for i in range(settings.baseline_steps):
        trainer.step()
        if (i + 1) % 50 == 0:
            trainer.take_loss(50)
    spec.cache.save_baseline(model.state_dict())
