"""The trial process: load the workload, apply the knobs, fine-tune, measure, profile.

It runs in a child process forked from a server that has already imported torch, so a
trial pays milliseconds, not seconds, to start. It reads the study's cache (memory-mapped
data, the pickled workload, the baseline weights), never the storage, and sends back one
JSON-able result or one error through its pipe; its stdout and stderr go to a log file.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tqdm

from advisor import serving
from advisor.data import MappedSplit, to_device
from advisor.errors import AdvisorError
from advisor.space import Knobs
from advisor.techniques import batching, checkpointing, distillation, precision
from advisor.techniques import compile as compile_technique
from advisor.techniques.accumulation import AccumulationConfig
from advisor.techniques.batching import BatchingConfig
from advisor.techniques.checkpointing import CheckpointConfig
from advisor.techniques.compile import CompileConfig
from advisor.techniques.distillation import DistillationConfig
from advisor.techniques.precision import PrecisionConfig
from advisor.techniques.quantization import QuantizationConfig
from advisor.trial import compress, measure, profile
from advisor.trial.measure import MIB, MemoryMeter
from advisor.trial.spec import TrialSpec
from advisor.trial.train import Trainer, TrainingDiverged, fine_tune, training_memory
from advisor.workload import call_model, loss_fn, metric_fn

WORKLOAD_FILE = "workload.pt"
BASELINE_FILE = "baseline.pt"


def log_path(cache_dir: str | os.PathLike, number: int) -> Path:
    name = "baseline" if number < 0 else f"trial-{number}"
    return Path(cache_dir) / "logs" / f"{name}.log"


def main(spec: TrialSpec, conn) -> None:
    """Process entry point: run the trial and send ``("result", dict)`` or ``("error", ...)``."""
    started = time.time()
    # The fork server started once, from wherever the first study ran: take this study's
    # working directory, import path and environment.
    os.environ.update(dict(spec.env))
    os.chdir(spec.ref.cwd)
    if spec.ref.cwd not in sys.path:
        sys.path.insert(0, spec.ref.cwd)
    # torch.fx opens tqdm bars while compiling, and tqdm's default lock is a multiprocessing
    # semaphore that a killed trial would leak (a warning at exit); one process needs a thread lock.
    tqdm.tqdm.set_lock(threading.RLock())
    log = log_path(spec.cache_dir, spec.number)
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    clock = _PhaseClock(conn, started)
    try:
        if spec.cpus:
            os.sched_setaffinity(0, spec.cpus)
        limit_memory(spec)
        result = run(spec, clock)
        result["phases"] = clock.durations()
        result["phases"]["start"] = max(0.0, started - spec.spawned_at) if spec.spawned_at else 0.0
        conn.send(("result", result))
    except BaseException as exc:  # everything becomes data for the study
        traceback.print_exc()
        conn.send(("error", reason_of(exc, spec.memory_limit_mb), traceback.format_exc(), clock.current))
    finally:
        conn.close()


def limit_memory(spec: TrialSpec) -> None:
    """Cap the trial's memory at ``spec.memory_limit_mb`` MiB above what it holds now.

    CPU: the address-space limit (``RLIMIT_AS``) is set above the process's current virtual
    size, so the fork server's imports are not charged; an allocation past it fails in the
    trial, which is then recorded as out of memory. CUDA: the caching allocator's
    per-process fraction of the device (the host limit would break the CUDA context).
    """
    if not spec.memory_limit_mb:
        return
    extra = int(spec.memory_limit_mb * 1024 * 1024)
    if spec.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, extra / total), 0)
        return
    import resource

    current = measure._status_kib("VmSize") * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = current + extra
    resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def reason_of(exc: BaseException, memory_limit_mb: float | None = None) -> str:
    if isinstance(exc, (AdvisorError, TrainingDiverged)):
        return str(exc)
    limit = f" (--trial-memory-mb {memory_limit_mb:g})" if memory_limit_mb else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in message:
        return f"out of memory{limit}: {message or type(exc).__name__}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {message}{where}"


class _PhaseClock:
    def __init__(self, conn, started: float) -> None:
        self.conn = conn
        self.marks: list[tuple[str, float]] = [("load", started)]
        self.current = "load"
        conn.send(("phase", "load", started))

    def __call__(self, name: str) -> None:
        now = time.time()
        self.marks.append((name, now))
        self.current = name
        self.conn.send(("phase", name, now))

    def durations(self) -> dict[str, float]:
        ends = [t for _, t in self.marks[1:]] + [time.time()]
        return {name: end - t for (name, t), end in zip(self.marks, ends, strict=True)}


def load(spec: TrialSpec) -> tuple[torch.nn.Module, Any, Any]:
    """The workload's model, loss and metric: unpickled, or rebuilt when they could not be."""
    path = Path(spec.cache_dir) / WORKLOAD_FILE
    if path.exists():
        saved = torch.load(path, weights_only=False)
        return saved["model"], saved["loss"], saved["metric"]
    from advisor.workload import build

    workload = build(spec.ref)
    return workload.model, loss_fn(workload), metric_fn(workload)


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
    settings = spec.settings
    knobs = Knobs.from_dict(spec.knobs)
    cache = Path(spec.cache_dir)
    model, loss, metric = load(spec)
    train = MappedSplit(cache / "data" / "train")
    val = MappedSplit(cache / "data" / "val")
    lengths = batching.lengths_of(train, spec.lengths) if spec.lengths is not None else None
    model.to(device)
    batch_size = spec.batch_size
    if spec.role == "baseline" and spec.train_baseline:
        phase("baseline_train")
        _train_baseline(model, train, loss, spec, device, batch_size)
    else:
        state = torch.load(cache / BASELINE_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state)

    precision_cfg = PrecisionConfig(knobs.precision)
    compile_cfg = CompileConfig(knobs.compile)
    batch, _ = val.batch(measure.fixed_batches(len(val), settings.latency_batch)[0][0])
    batch = to_device(batch, device)
    one, _ = val.batch(slice(0, 1))
    one = to_device(one, device)

    # The fixed order of trial/compress.py: prune -> fine-tune -> quantize -> compile -> measure.
    phase("prune")
    distill_cfg = DistillationConfig(knobs.distill_alpha, knobs.distill_temperature)
    teacher = distillation.teacher(model, distill_cfg)  # the baseline, before compression
    student, pruned = compress.student(model, knobs, batch, spec.keep)

    phase("train")
    wrapped = checkpointing.apply(student, CheckpointConfig(knobs.checkpoint_every))
    compiled = compile_technique.apply(student, compile_cfg)
    trainer = Trainer(student, compiled, train, loss, precision_cfg=precision_cfg,
                      accumulation=AccumulationConfig(knobs.accumulation),
                      compile_cfg=compile_cfg, batch_size=batch_size, lr=knobs.lr,
                      steps=settings.trial_steps, device=device, seed=settings.seed,
                      teacher=teacher, distill=distill_cfg,
                      batching_cfg=BatchingConfig(knobs.max_tokens), lengths=lengths)
    meter = MemoryMeter(device)
    report = fine_tune(trainer, settings.trial_steps, settings.warmup_steps, meter)

    phase("quantize")
    began = time.perf_counter()
    calibration = (calibration_batches(train, settings.latency_batch, device)
                   if QuantizationConfig(knobs.quantization).calibrated else [])
    deploy = compress.deployable(student, knobs, batch, calibration)
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

    serve = None
    if settings.serving_rate > 0 and knobs.serving_max_batch:
        phase("serving")
        serve = measure_serving(infer, val, knobs, settings, device)

    phase("evaluate")
    accuracy = measure.evaluate(deploy.run, val, metric, batch=settings.latency_batch,
                                device=device, autocast=precision.autocast(autocast_on, device.type))

    phase("size")
    artifact = cache / "artifacts" / ("baseline" if spec.number < 0 else str(spec.number))
    artifact.mkdir(parents=True, exist_ok=True)
    size = measure.artifact_bytes(deploy.module, artifact / measure.ARTIFACT_NAME)
    shutil.rmtree(artifact)

    phase("memory")
    memory = training_memory(trainer, meter)

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
        "latency": latency.to_dict(),
        "latency_batch1": latency_b1.to_dict(),
        **({"serving": {**serve["result"].to_dict(), "rate": settings.serving_rate,
                        "deadline_ms": settings.serving_deadline_ms,
                        "max_batch": knobs.serving_max_batch, "max_wait_ms": knobs.serving_max_wait_ms,
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


def measure_serving(infer, val: MappedSplit, knobs: Knobs, settings, device: torch.device) -> dict:
    """Request latency under the study's Poisson load: the simulated batcher and server of
    ``advisor/serving.py``, fed by this model's measured median time at each padded batch size
    the simulation forms (measured once each, on first use, like the latency objective)."""
    timings: dict[int, measure.Timing] = {}

    def time_batch(size: int) -> float:
        inputs, _ = val.batch(np.arange(size) % len(val))
        inputs = to_device(inputs, device)
        timings[size] = measure.time_calls(lambda: infer(inputs), device,
                                           budget_s=settings.latency_seconds / 2)
        return timings[size].median_ms / 1e3

    padded = serving.ServiceTimes(time_batch)
    config = serving.ServingConfig(knobs.serving_max_batch, knobs.serving_max_wait_ms)
    arrivals = serving.poisson_arrivals(settings.serving_rate, settings.serving_requests, settings.seed)
    result = serving.simulate(arrivals, lambda n: padded(serving.bucket(n, config.max_batch)), config,
                              deadline_ms=settings.serving_deadline_ms)
    return {"result": result, "timings": dict(sorted(timings.items()))}


def calibration_batches(train: MappedSplit, batch: int, device: torch.device,
                        samples: int = 512) -> list:
    """Inputs to calibrate static quantization: a fixed subset of the training data."""
    idx = np.random.default_rng(0).permutation(len(train))[:samples]
    return [to_device(train.batch(idx[i:i + batch])[0], device) for i in range(0, len(idx), batch)]


def _train_baseline(model, train: MappedSplit, loss, spec: TrialSpec, device, batch_size) -> None:
    """Train the workload's model with the default knobs and save its weights for the study."""
    settings = spec.settings
    trainer = Trainer(model, model, train, loss, precision_cfg=PrecisionConfig(),
                      accumulation=AccumulationConfig(), compile_cfg=CompileConfig(),
                      batch_size=batch_size, lr=settings.lr, steps=settings.baseline_steps,
                      device=device, seed=settings.seed)
    model.train()
    for i in range(settings.baseline_steps):
        trainer.step()
        if (i + 1) % 50 == 0:
            trainer.take_loss(50)
    tmp = Path(spec.cache_dir) / (BASELINE_FILE + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, Path(spec.cache_dir) / BASELINE_FILE)
