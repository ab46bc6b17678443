"""Rebuild an exported recommendation on the user's workload (advisor apply), and help their
own training loop.

``apply`` runs the trial pipeline once more, in this process, with the recorded knobs and
measurement settings: the baseline (trained with the recorded settings unless the workload
is trained), prune, fine-tune, quantize, compile, measure. It keeps the deployable model,
saves it (a ``torch.export`` program where the model allows, else its state dict with the
knobs), and returns the re-measured figures beside the study's.

``training_setup`` gives a training loop of the user's own the training-side knobs: the
autocast context, the grad scaler, the accumulation steps (or the token budget's
micro-batches) and the checkpointed, compiled model.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from advisor import hardware, space
from advisor import study as core
from advisor.data import to_device
from advisor.errors import AdvisorError
from advisor.export import Config
from advisor.techniques import checkpointing, precision
from advisor.techniques import compile as compile_technique
from advisor.techniques.accumulation import AccumulationConfig
from advisor.techniques.batching import BatchingConfig, TokenBudgetSampler
from advisor.techniques.checkpointing import CheckpointConfig
from advisor.techniques.compile import CompileConfig
from advisor.techniques.precision import PrecisionConfig
from advisor.trial import worker
from advisor.trial.spec import Settings, TrialSpec
from advisor.workload import WorkloadRef, build, call_args


@dataclass
class Applied:
    model: nn.Module  # the deployable model: pruned, quantized (not compiled)
    result: dict  # this run's measurements, like a trial's
    baseline: dict  # this run's baseline measurements
    config: Config
    artifact: Path | None = None
    artifact_format: str = ""
    notes: list[str] = field(default_factory=list)


def apply(config: Config, model: str | None = None, data: str | None = None, *,
          steps: int | None = None, output: str | os.PathLike | None = None, device: str = "auto",
          cache_dir: str = "studies/cache", threads: int | None = None) -> Applied:
    """Rebuild ``config`` on the workload ``model`` names (default: the one it was measured on)."""
    recorded = config.provenance.get("workload") or {}
    model = model or recorded.get("model")
    if not model:
        raise AdvisorError("the config names no workload; pass --model MODULE:FUNCTION")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise AdvisorError(f"--steps must be a positive integer; got {steps!r}")
    hw = hardware.detect(device)
    ref = WorkloadRef(model=model, data=data or recorded.get("data"), cwd=os.getcwd())
    workload = build(ref)
    stored = dict(config.provenance.get("settings") or {})
    if steps is not None:
        stored["trial_steps"] = steps
    settings = Settings.from_dict(stored) if stored else Settings(latency_batch=workload.batch_size)
    cache = Path(cache_dir).resolve() / ("apply-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", workload.name or "model"))
    core.prepare_cache(workload, ref, cache)
    search = space.build(hw, workload.model, workload.batch_size, core.probe_inputs(cache),
                         lr=settings.lr, keep=workload.keep, serving=settings.serving_rate > 0,
                         lengths=core.sample_lengths(workload, cache))
    knobs = config.knobs.to_dict()
    search.check_values({k: v for k, v in knobs.items() if k != "lr"})
    notes = []
    if config.provenance.get("device") not in (None, hw.device):
        notes.append(f"measured on {config.provenance['device']}, applied on {hw.device}: the "
                     f"figures are not comparable")

    def spec(role: str, number: int, values: dict, train: bool = False) -> TrialSpec:
        return TrialSpec(role=role, number=number, knobs=values, settings=settings,
                         cache_dir=str(cache), ref=ref, batch_size=workload.batch_size,
                         device=hw.device, threads=threads or hw.cores, keep=workload.keep,
                         lengths=workload.lengths, train_baseline=train)

    weights = cache / worker.BASELINE_FILE
    if workload.trained:
        torch.save(workload.model.state_dict(), weights)
    baseline_knobs = space.baseline(settings.lr, settings.serving_rate > 0).to_dict()
    log = worker.log_path(cache, 0).with_name("apply.log")
    with _compiler_cache(cache), _output_to(log):
        baseline, _ = worker.measure_trial(spec("baseline", -1, baseline_knobs, not workload.trained),
                                           _no_phase)
        result, deploy = worker.measure_trial(spec("trial", 0, knobs), _no_phase)
    notes.append(f"log: {log}")
    applied = Applied(model=deploy.module, result=result, baseline=baseline, config=config,
                      notes=notes)
    if output is not None:
        inputs = core.probe_inputs(cache)
        applied.artifact, applied.artifact_format = save(deploy.module, inputs, Path(output), knobs)
    return applied


def _no_phase(name: str) -> None:
    pass


@contextlib.contextmanager
def _output_to(log: Path):
    """Send this process's stdout and stderr (the compiler's and profiler's chatter, and
    library warnings) to ``log`` while the pipeline runs, as a trial process does."""
    import sys

    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


@contextlib.contextmanager
def _compiler_cache(cache: Path):
    """Share the compiler cache with studies in the same cache directory."""
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache.parent / "inductor")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def save(model: nn.Module, inputs, path: Path, knobs: dict) -> tuple[Path, str]:
    """Save the deployable model: a ``torch.export`` program, or where the model cannot be
    exported, its state dict with the knobs (``.pt`` beside the asked path)."""
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    args, kwargs = call_args(to_device(inputs, device))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as exc:
        raise AdvisorError(f"cannot write {path}: {exc.strerror or exc}; choose another -o PATH") from None
    try:
        program = torch.export.export(model, args, kwargs)
        torch.export.save(program, path)
        return path, "torch.export program (torch.export.load(path).module())"
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fallback = path.with_suffix(".pt")
        torch.save({"state_dict": model.state_dict(), "knobs": knobs,
                    "why_not_exported": f"{type(exc).__name__}: {first}"}, fallback)
        return fallback, f"state dict with the knobs (torch.export failed: {type(exc).__name__}: {first})"


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
    precision_cfg = PrecisionConfig(knobs.precision)
    wrapped = checkpointing.apply(model, CheckpointConfig(knobs.checkpoint_every))
    return TrainingSetup(
        model=compile_technique.apply(model, CompileConfig(knobs.compile)),
        accumulation_steps=knobs.accumulation,
        scaler=precision.grad_scaler(precision_cfg, device_type),
        lr=knobs.lr, precision=knobs.precision, device_type=device_type,
        checkpointed_blocks=wrapped, max_tokens=knobs.max_tokens)
