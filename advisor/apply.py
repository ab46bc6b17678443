"""``advisor apply``: rebuild an exported recommendation on the user's workload, and help
their own training loop.

``apply`` runs the trial pipeline once more with the recorded knobs and measurement settings:
the baseline (trained with the recorded settings unless the workload is trained) in a process
of its own, as a study runs it, then the trial in this process: prune, fine-tune, quantize,
compile, measure. It keeps the deployable model, ships it as the file a user runs
(``ship.py``: a ``torch.export`` program, with its compile recipe for PT2E int8, or an
AOTInductor package), measures that file in a fresh process, and returns the re-measured
figures beside the study's.

``training_setup`` gives a training loop of the user's own the training-side knobs: the
autocast context, the grad scaler, the accumulation steps (or the token budget's
micro-batches) and the checkpointed, compiled model.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from advisor import hardware, ship, space
from advisor.errors import AdvisorError
from advisor.export import Config
from advisor.files import CACHE_DIR
from advisor.knobs import baseline as baseline_knobs
from advisor.study import driver
from advisor.techniques import checkpointing, precision
from advisor.techniques import compile as compile_technique
from advisor.techniques.accumulation import AccumulationConfig
from advisor.techniques.batching import BatchingConfig, TokenBudgetSampler
from advisor.techniques.checkpointing import CheckpointConfig
from advisor.techniques.compile import CompileConfig
from advisor.techniques.precision import PrecisionConfig
from advisor.techniques.schedule import ScheduleConfig
from advisor.trial import pipeline
from advisor.trial.cache import StudyCache
from advisor.trial.process import output_to
from advisor.trial.runner import TrialRunner
from advisor.trial.spec import Settings, TrialSpec
from advisor.workload import WorkloadRef, build

BASELINE_TIMEOUT_S = 3600.0


@dataclass
class Applied:
    model: nn.Module  # the deployable model: pruned, quantized (not compiled)
    result: dict  # this run's measurements, like a trial's
    baseline: dict  # this run's baseline measurements
    config: Config
    shipped: ship.Shipped | None = None
    shipped_measured: dict | None = None  # the shipped file, measured in a fresh process
    notes: list[str] = field(default_factory=list)


def apply(config: Config, model: str | None = None, data: str | None = None, *,
          steps: int | None = None, output: str | os.PathLike | None = None, device: str = "auto",
          cache_dir: str = CACHE_DIR, threads: int | None = None) -> Applied:
    """Rebuild ``config`` on the workload ``model`` names (default: the one it was measured on)."""
    recorded = config.provenance.get("workload") or {}
    model = model or recorded.get("model")
    if not model:
        raise AdvisorError("the config names no workload; pass --model MODULE:FUNCTION")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise AdvisorError(f"--steps must be a positive integer; got {steps!r}")
    if output is not None:
        ship.writable(Path(output))
    hw = hardware.detect(device)
    ref = WorkloadRef(model=model, data=data or recorded.get("data"), cwd=os.getcwd())
    workload = build(ref)
    stored = dict(config.provenance.get("settings") or {})
    if steps is not None:
        stored["trial_steps"] = steps
    settings = Settings.from_dict(stored) if stored else Settings(latency_batch=workload.batch_size)
    cache = StudyCache.of_apply(cache_dir, workload.name)
    cache.prepare(workload, ref)
    search = space.of_workload(hw, workload, cache, settings)
    knobs = config.knobs
    search.check_values({k: v for k, v in knobs.to_dict().items() if k != "lr"})
    notes = []
    if config.provenance.get("device") not in (None, hw.device):
        notes.append(f"measured on {config.provenance['device']}, applied on {hw.device}: the "
                     f"figures are not comparable")

    config.layers.check(workload.model, "the config")
    spec = TrialSpec.template(workload, ref, cache, settings, hw.device, threads or hw.cores)
    if workload.trained:
        cache.save_baseline(workload.model.state_dict())
    log = cache.log(0).with_name("apply.log")
    with _compiler_cache(cache), output_to(log):
        # The baseline in a process of its own, as a study runs it: its training-memory window
        # pins glibc's mmap threshold for the rest of its process (``measure.pin_mmap_threshold``),
        # which would slow the eager reference model this process times the trial against.
        outcome = TrialRunner(preload=driver.preload_modules(workload, ref)).run(
            spec.baseline(baseline_knobs(settings.lr, settings.serving_rate > 0), not workload.trained),
            timeout=BASELINE_TIMEOUT_S)
        if not outcome.ok:
            raise AdvisorError(f"the baseline failed ({outcome.phase}): {outcome.reason}; see {log.parent}")
        baseline = outcome.result
        result, deploy = pipeline.measure_trial(replace(spec.trial(0, knobs), layers=config.layers), _no_phase)
    notes.append(f"log: {log}")
    applied = Applied(model=deploy.module, result=result, baseline=baseline, config=config,
                      notes=notes)
    if output is not None:
        autocast = knobs.config(PrecisionConfig) if deploy.autocast else PrecisionConfig()
        with _compiler_cache(cache), output_to(log):
            applied.shipped = ship.package(deploy, cache.probe_inputs(), Path(output), autocast=autocast,
                                           variable_length=workload.lengths is not None,
                                           knobs=knobs.to_dict())
        if applied.shipped.format != "state_dict":
            applied.shipped_measured = ship.check(applied.shipped, ref, cache.root,
                                                  latency_batch=settings.latency_batch,
                                                  latency_seconds=settings.latency_seconds,
                                                  device=hw.device, threads=spec.threads)
    return applied


def _no_phase(name: str) -> None:
    pass


@contextlib.contextmanager
def _compiler_cache(cache: StudyCache):
    """Share the compiler cache with studies in the same cache directory."""
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache.compiler_dir)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


@dataclass
class TrainingSetup:
    """The training-side knobs of a config, for a training loop of your own::

        setup = advisor.training_setup(config, model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=setup.lr)
        for i, (x, y) in enumerate(micro_batches):  # batch_size / accumulation_steps each
            with setup.autocast():
                loss = loss_fn(setup.model(x), y) / setup.accumulation_steps
            (setup.scaler.scale(loss) if setup.scaler else loss).backward()
            if (i + 1) % setup.accumulation_steps == 0:
                ...  # optimizer step (through setup.scaler when it is set), zero_grad

    With a token budget (``max_tokens`` > 0, accumulation 1), ``steps(lengths, batch_size)``
    gives each optimizer step's micro-batches of sample indices instead: cut each one's
    padding with ``advisor.techniques.batching.trim`` and weight its loss by its share of
    the step's samples, ``len(micro_batch) / sum(len(m) for m in step)``.
    """

    model: nn.Module  # checkpointed and compiled as recorded: call this one
    accumulation_steps: int
    scaler: torch.amp.GradScaler | None
    lr: float
    precision: str
    device_type: str
    checkpointed_blocks: int
    max_tokens: int = 0  # 0: fixed-size batches

    def autocast(self) -> contextlib.AbstractContextManager:
        return precision.autocast(PrecisionConfig(self.precision), self.device_type)

    def micro_batch(self, batch_size: int) -> int:
        return AccumulationConfig(self.accumulation_steps).micro_batch(batch_size)

    def steps(self, lengths, batch_size: int, seed: int = 0) -> TokenBudgetSampler:
        """Under a token budget: a sampler whose ``next_step()`` gives a step's micro-batches
        (index arrays); ``lengths`` are the samples' token counts."""
        if not BatchingConfig(self.max_tokens).enabled:
            raise AdvisorError("this config trains fixed-size batches (max_tokens 0); use micro_batch()")
        return TokenBudgetSampler(lengths, self.max_tokens, batch_size, seed)


def training_setup(config: Config, model: nn.Module, device_type: str | None = None) -> TrainingSetup:
    """Apply ``config``'s training-side knobs to ``model`` (checkpointing is applied in place)."""
    knobs = config.knobs
    device_type = device_type or next((p.device.type for p in model.parameters()), "cpu")
    precision_cfg = knobs.config(PrecisionConfig)
    wrapped = checkpointing.apply(model, knobs.config(CheckpointConfig))
    return TrainingSetup(
        model=compile_technique.apply(model, knobs.config(CompileConfig)),
        accumulation_steps=knobs.config(AccumulationConfig).steps,
        scaler=precision.grad_scaler(precision_cfg, device_type),
        lr=knobs.config(ScheduleConfig).lr, precision=precision_cfg.dtype, device_type=device_type,
        checkpointed_blocks=wrapped, max_tokens=knobs.config(BatchingConfig).max_tokens)
