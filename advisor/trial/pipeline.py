"""One trial, start to end, in the order of ``compress.py``: load the workload and the
baseline's weights from the study's cache, prune, fine-tune, quantize, compile, then measure
latency, serving, accuracy, size, training memory, and profile.

``run`` is what a trial process runs (``process.py``); ``measure_trial`` also hands back the
deployable model, which ``advisor apply`` keeps.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from advisor.errors import AdvisorError
from advisor.knobs import Knobs
from advisor.techniques import checkpointing, distillation, layers, precision, pruning
from advisor.techniques import compile as compile_technique
from advisor.techniques.batcher import BatcherConfig
from advisor.techniques.checkpointing import CheckpointConfig
from advisor.techniques.compile import CompileConfig
from advisor.techniques.distillation import DistillationConfig
from advisor.techniques.precision import PrecisionConfig
from advisor.techniques.pruning import PruningConfig
from advisor.techniques.quantization import QuantizationConfig
from advisor.trial import compress, measure, profile, sensitivity, served
from advisor.trial.cache import StudyCache
from advisor.trial.mapped import MappedSplit
from advisor.trial.measure import MIB, MemoryMeter
from advisor.trial.spec import Settings, TrialSpec
from advisor.trial.train import Trainer, fine_tune, training_memory
from advisor.workload import WorkloadRef, call_model, to_device


def run(spec: TrialSpec, phase, rung: Rung | None = None) -> dict:
    """Run the trial ``spec`` describes; its JSON-able result."""
    return measure_trial(spec, phase, rung)[0]


# Asked at each of ``spec.rungs`` with the trial's point there (its step and accuracy) and the
# cost ratios it has measured: whether the trial goes on (``study/rungs.py`` decides).
Rung = Callable[[dict, dict], bool]


class Stopped(Exception):
    """The study stopped the trial at a rung; what it had measured goes back with it."""

    def __init__(self, points: list[dict], cheap: Timed | None) -> None:
        super().__init__(f"stopped at step {points[-1]['step']}")
        self.points, self.cheap = points, cheap

    def partial(self) -> dict:
        """What a stopped trial stores: its rung points and its cheap objectives."""
        out: dict = {"rungs": self.points}
        if self.cheap is not None:
            out.update(self.cheap.to_dict())
        return out


def measure_trial(spec: TrialSpec, phase, rung: Rung | None = None) -> tuple[dict, compress.Deployable]:
    """The trial's result and its deployable model (``advisor apply`` keeps the model). With
    ``spec.rungs``, the cheap objectives come first and ``rung`` is asked at each rung; a trial
    it stops raises :class:`Stopped`."""
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
    plan = spec.layers if spec.layers is not None else layers.plan(
        knobs.config(QuantizationConfig), knobs.config(PruningConfig), spec.sensitivity,
        removes=lambda ratios: pruning.removed(model, example, spec.keep, ratios))
    teacher = distillation.teacher(model, knobs.config(DistillationConfig))  # the baseline, before compression
    student, pruned = compress.student(model, knobs, example, spec.keep, plan)
    calibrated = knobs.config(QuantizationConfig).calibrated

    def build() -> tuple[compress.Deployable, float]:
        phase("quantize")
        began = time.perf_counter()
        calibration = calibration_batches(train, settings.latency_batch, device) if calibrated else []
        return compress.deployable(student, knobs, example, calibration, plan), time.perf_counter() - began

    def timed(deploy: compress.Deployable) -> Timed:
        # The baseline's model, loaded only to be timed beside this one (not held through the fine-tune).
        reference = reference_model(spec.cache, spec.ref, device) if spec.role != "baseline" else None
        return time_deployable(deploy, precision_cfg, batch, one, val, knobs, settings, device, reference, phase)

    cheap: Timed | None = None
    quantize_s = 0.0
    if spec.rungs and not compress.compiled(knobs):
        # Cheap objectives first: what the structure alone decides, before the fine-tune. A
        # kernel's time does not depend on the weights' values, so the deployable model built
        # from the pruned, untrained weights times as the fine-tuned one will, and its weights
        # take the same bytes. The rung points carry them, so a trial can stop on them. Only
        # where that model is eager: a compiled one would be compiled twice, which cost more
        # than stopping saved (a default study took 11:49 against 9:51 without early stopping).
        early, quantize_s = build()
        cheap = timed(early)
        cheap.size_bytes = measure.weight_bytes(early.module)
        del early

    phase("train")
    wrapped = checkpointing.apply(student, knobs.config(CheckpointConfig))
    compiled = compile_technique.apply(student, knobs.config(CompileConfig))
    trainer = Trainer(student, compiled, train, loss, knobs, batch_size=spec.batch_size,
                      steps=settings.trial_steps, device=device, seed=settings.seed,
                      teacher=teacher, lengths=lengths)
    meter = MemoryMeter(device)
    points: list[dict] = []

    def at_step(i: int) -> None:
        if i + 1 not in spec.rungs:
            return
        phase("rung")
        accuracy = rung_accuracy(student, val, metric, precision_cfg, settings.latency_batch, device)
        # The trial's wall time so far: what stopping it here costs (the search benchmark's unit).
        points.append({"step": i + 1, "accuracy": accuracy,
                       "seconds": time.time() - spec.spawned_at if spec.spawned_at else None})
        # The per-layer choice goes with the point, for the study to find trials deploying the
        # same program (``compress.structure``); it is stored once, with the result.
        go_on = rung is None or rung({**points[-1], "layers": plan.to_dict()}, cheap.cheap() if cheap else {})
        phase("train")
        if not go_on:
            raise Stopped(points, cheap)

    # Uncompiled up to the first rung: a trial stopped there does not pay for compiling its fine-tune.
    report = fine_tune(trainer, settings.trial_steps, settings.warmup_steps, meter, on_step=at_step,
                       eager_steps=spec.rungs[0] if spec.rungs else 0)
    training_pools = measure.graph_pool_bytes(device)  # before inference records graphs of its own

    deploy, seconds = build()
    quantize_s += seconds
    measured = cheap or timed(deploy)
    latency, latency_b1, paired, serve = measured.latency, measured.latency_b1, measured.paired, measured.serve
    autocast_on = precision_cfg if deploy.autocast else PrecisionConfig()
    infer = inference(deploy, precision_cfg, device, batch)
    batcher = knobs.config(BatcherConfig)

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
            "eager_steps": report.eager_steps,
            **({"tokens_per_s": report.tokens_per_s, "padding_share": report.padding_share}
               if lengths is not None else {}),
        },
        "memory": {"transient_mib": memory.transient_mib, "state_mib": memory.state_mib,
                   "graph_pool_mib": memory.graph_pool_mib, "steps": memory.steps},
        "compile_s": compile_s,
        "size_bytes": size,
        "compression": {**pruned, **deploy.info, "quantize_s": quantize_s},
        **({"rungs": points} if points else {}),
        **({"layers": plan.to_dict()} if plan else {}),
        **({"sensitivity": measure_sensitivity(spec, device, phase)} if spec.per_layer else {}),
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


@dataclass
class Timed:
    """What timing a deployable model measured: latency at the serving batch and at batch 1,
    the paired ratios to the baseline, and under a serving load the simulated server."""

    latency: measure.Timing
    latency_b1: measure.Timing
    paired: dict
    serve: dict | None
    size_bytes: int | None = None  # the weights' bytes, where measured with the timing

    def cheap(self) -> dict:
        """What a rung point carries: the latency objective's paired ratio to the baseline
        (in a serving study, the p99's) and the weights' bytes, where measured."""
        pair = self.serve.get("paired") if self.serve else self.paired.get("latency")
        own = self.serve["result"].p99_ms if self.serve else self.latency.median_ms
        return {"latency_ms": own, **({"latency_ratio": pair["ratio"]} if pair else {}),
                **({"size_bytes": self.size_bytes} if self.size_bytes is not None else {})}

    def to_dict(self) -> dict:
        return {"latency": self.latency.to_dict(), "latency_batch1": self.latency_b1.to_dict(),
                **({"paired": self.paired} if self.paired else {}),
                **({"size_bytes": self.size_bytes} if self.size_bytes is not None else {})}


def inference(deploy: compress.Deployable, precision_cfg: PrecisionConfig, device: torch.device, batch):
    """A call of the deployable model on ``batch`` (or the inputs given), under the trial's
    autocast where the model keeps it, without gradients."""
    autocast_on = precision_cfg if deploy.autocast else PrecisionConfig()

    @torch.no_grad()
    def infer(inputs=batch):
        with precision.autocast(autocast_on, device.type):
            return call_model(deploy.run, inputs)

    return infer


def time_deployable(deploy: compress.Deployable, precision_cfg: PrecisionConfig, batch, one, val: MappedSplit,
                    knobs: Knobs, settings: Settings, device: torch.device,
                    reference: torch.nn.Module | None, phase) -> Timed:
    """Latency (its first timed call is where a compiled model compiles for inference), then
    the ratios to the baseline's model timed in this process, interleaved with this one, then
    under a serving load the simulated server."""
    infer = inference(deploy, precision_cfg, device, batch)
    phase("latency")
    latency = measure.time_calls(infer, device, budget_s=settings.latency_seconds)
    latency_b1 = measure.time_calls(lambda: infer(one), device, budget_s=settings.latency_seconds / 2)
    paired = {}
    if reference is not None:
        phase("paired")
        paired = paired_latency(infer, reference, batch, one, device, settings.latency_seconds)
    serve = None
    batcher = knobs.config(BatcherConfig)
    if settings.serving_rate > 0 and batcher.enabled:
        phase("serving")
        serve = served.measure_serving(infer, val, batcher, settings, device, reference)
    return Timed(latency, latency_b1, paired, serve)


def rung_accuracy(student: torch.nn.Module, val: MappedSplit, metric, precision_cfg: PrecisionConfig,
                  batch: int, device: torch.device) -> float:
    """The accuracy of the model being fine-tuned, so far: eager, in eval mode, under the
    trial's training precision, on the validation split's selection part only."""
    student.eval()
    try:
        return measure.evaluate_selection(student, val, metric, batch=batch, device=device,
                                          autocast=precision.autocast(precision_cfg, device.type))
    finally:
        student.train()


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


def measure_sensitivity(spec: TrialSpec, device: torch.device, phase) -> dict:
    """The study's per-layer sensitivity table (``trial/sensitivity.py``), on the baseline's
    weights as trials start from them; the baseline's run measures it last."""
    phase("sensitivity")
    model = reference_model(spec.cache, spec.ref, device).requires_grad_(True)  # Torch-Pruning skips frozen layers
    _, loss, _ = spec.cache.load_workload(spec.ref)
    return sensitivity.measure(model, loss, spec.cache.split("train"), spec.per_layer, device,
                               spec.settings.latency_batch, keep=spec.keep)


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
