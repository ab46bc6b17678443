"""The fine-tune every trial runs: AdamW on the schedule of ``techniques/schedule.py``, under the knobs.

One optimizer step takes ``accumulation`` micro-batches of ``batch_size / accumulation``
samples under the trial's autocast (with a GradScaler for fp16); with distillation, the
teacher's logits for the same micro-batch come from a forward without gradients. With a
token budget (``max_tokens``, variable-length workloads) the step's ``batch_size`` samples
are packed into trimmed micro-batches under the budget instead, each loss weighted by its
share of the step's samples (``techniques/batching.py``). Throughput counts samples (and,
where lengths are known, real and padded tokens), so batchings compare fairly. The first
``warmup_steps`` steps (where compilation and lazy initialization happen) are timed apart;
throughput comes from the steps after them. A trial the study may stop at its first rung runs
the steps before it uncompiled (``eager_steps``): a stop there then saves compiling the
fine-tune, which on a 2-core CPU cost 10-25 s of a 60-step trial, paid before its first step;
the warm-up steps follow them. Peak memory is measured in a window of its own
(``training_memory``), after the timed work, because measuring it well on CPU changes how
the C library allocates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from advisor.errors import AdvisorError
from advisor.knobs import Knobs
from advisor.techniques import batching, distillation, precision
from advisor.techniques.accumulation import AccumulationConfig
from advisor.techniques.batching import BatchingConfig, Lengths, TokenBudgetSampler
from advisor.techniques.compile import CompileConfig
from advisor.techniques.distillation import DistillationConfig
from advisor.techniques.precision import PrecisionConfig
from advisor.techniques.schedule import ScheduleConfig, warmup_cosine
from advisor.trial.mapped import MappedSplit
from advisor.trial.measure import (
    MIB,
    MemoryMeter,
    graph_pool_bytes,
    model_state_bytes,
    optimizer_state_bytes,
    peak_in_fresh_arena,
    synchronize,
)
from advisor.workload import LossFn, call_model, logits_of, to_device


class TrainingDiverged(RuntimeError):
    """The loss stopped being a finite number."""


class Sampler:
    """Epoch-wise shuffled indices; a batch never straddles two epochs."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(n)
        self.pos = 0

    def take(self, k: int) -> np.ndarray:
        if k > self.n:
            return self.rng.integers(0, self.n, size=k)
        if self.pos + k > self.n:
            self.order = self.rng.permutation(self.n)
            self.pos = 0
        idx = self.order[self.pos:self.pos + k]
        self.pos += k
        return idx


@dataclass
class TrainReport:
    steps: int
    micro_batches: int
    warmup_s: float
    measured_s: float
    throughput: float  # samples per second over the measured steps
    step_ms: float  # mean time per optimizer step over the measured steps
    compile_s: float  # warm-up time above steady-state steps, when compiled
    runtime_init_mib: float  # memory the warm-up steps added (allocator, kernels, compiler)
    final_loss: float
    eager_steps: int = 0  # first steps run uncompiled, before the warm-up (a rung could stop the trial there)
    samples: int = 0  # samples of the measured steps
    tokens: int = 0  # their real tokens (0 when the workload gives no lengths)
    padded_tokens: int = 0  # the token positions computed, padding included

    @property
    def tokens_per_s(self) -> float:
        return self.tokens * self.throughput / self.samples if self.samples else 0.0

    @property
    def padding_share(self) -> float:
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0


@dataclass
class MemoryReport:
    transient_mib: float  # measured peak of training steps above the level before them
    state_mib: float  # parameters and buffers (model, teacher) plus optimizer state, counted exactly
    steps: int
    graph_pool_mib: float = 0.0  # CUDA-graph private pools, included in transient_mib

    @property
    def memory_mib(self) -> float:
        return self.state_mib + self.transient_mib


class Trainer:
    """Runs optimizer steps of ``model`` (``compiled`` is what is called) under the knobs."""

    def __init__(self, model: nn.Module, compiled: nn.Module, data: MappedSplit, loss: LossFn,
                 knobs: Knobs, *, batch_size: int, steps: int, device: torch.device, seed: int,
                 teacher: nn.Module | None = None, lengths: Lengths | None = None) -> None:
        self.model, self.compiled, self.data, self.loss = model, compiled, data, loss
        self.teacher, self.distill = teacher, knobs.config(DistillationConfig)
        self.device = device
        accumulation = knobs.config(AccumulationConfig)
        self.accumulation = accumulation.steps
        self.micro = accumulation.micro_batch(batch_size)
        self.lengths = lengths
        self.budget: TokenBudgetSampler | None = None
        batching_cfg = knobs.config(BatchingConfig)
        if batching_cfg.enabled:
            if lengths is None:
                raise AdvisorError(f"{batching.KNOB} {batching_cfg.max_tokens} needs per-sample lengths; "
                                   f"name the attention-mask input in Workload.lengths")
            self.budget = TokenBudgetSampler(lengths.tokens, batching_cfg.max_tokens, batch_size, seed)
        self.samples = self.tokens = self.padded_tokens = 0
        precision_cfg = knobs.config(PrecisionConfig)
        self.autocast = lambda: precision.autocast(precision_cfg, device.type)
        self.scaler = precision.grad_scaler(precision_cfg, device.type)
        self.cudagraphs = knobs.config(CompileConfig).cudagraphs and device.type == "cuda"
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=knobs.config(ScheduleConfig).lr)
        self.schedule = warmup_cosine(self.optimizer, steps)
        self.sampler = Sampler(len(data), seed)
        self.micro_batches = 0
        self.loss_sum = torch.zeros((), device=device)
        self.eager = False  # call ``model`` rather than ``compiled`` (``fine_tune``'s eager steps)

    def step(self, batches: list[np.ndarray] | None = None) -> None:
        """One optimizer step over ``accumulation`` micro-batches (or the token budget's), or
        over the given micro-batches (index arrays)."""
        if self.cudagraphs:
            # Once per optimizer step, not per micro-batch: a new CUDA-graph generation would
            # overwrite the gradients the earlier micro-batches accumulated.
            torch.compiler.cudagraph_mark_step_begin()
        if batches is None and self.budget is not None:
            batches = self.budget.next_step()
        elif batches is None:
            batches = [self.sampler.take(self.micro) for _ in range(self.accumulation)]
        step_samples = sum(len(idx) for idx in batches)
        for idx in batches:
            inputs, target = self.batch(idx)
            with self.autocast():
                outputs = call_model(self.model if self.eager else self.compiled, inputs)
                loss = self.loss(outputs, target)
                if self.teacher is not None:
                    with torch.no_grad():
                        teacher = logits_of(call_model(self.teacher, inputs))
                    loss = distillation.combine(self.distill, loss, logits_of(outputs), teacher)
                # Under a budget, each micro-batch's share of the step's samples: the step's
                # loss is the mean over its samples, however they were split.
                loss = (loss / self.accumulation if self.budget is None
                        else loss * (len(idx) / step_samples))
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            self.loss_sum += loss.detach().float()
            self.micro_batches += 1
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()

    def batch(self, idx: np.ndarray) -> tuple:
        """The micro-batch ``idx`` on the device, trimmed under a token budget; counted."""
        inputs, target = self.data.batch(idx)
        self.samples += len(idx)
        if self.lengths is not None:
            width = self.lengths.width
            if self.budget is not None:
                width = int(self.lengths.tokens[idx].max())
                inputs = batching.trim(inputs, width, self.lengths.width)
                target = batching.trim(target, width, self.lengths.width)
            self.tokens += int(self.lengths.tokens[idx].sum())
            self.padded_tokens += len(idx) * width
        return to_device(inputs, self.device), target.to(self.device)

    def counts(self) -> tuple[int, int, int]:
        """Samples, real tokens and computed (padded) token positions trained so far."""
        return self.samples, self.tokens, self.padded_tokens

    def take_loss(self, steps: int) -> float:
        """Mean loss per step since the last call; raises if it is not finite."""
        value = self.loss_sum.item() / max(1, steps)
        self.loss_sum.zero_()
        if not math.isfinite(value):
            raise TrainingDiverged(f"the training loss became {value} (diverged)")
        return value


def fine_tune(trainer: Trainer, steps: int, warmup_steps: int, meter: MemoryMeter,
              on_step: Callable[[int], None] | None = None, eager_steps: int = 0) -> TrainReport:
    """Run ``steps`` optimizer steps: the first ``eager_steps`` uncompiled, then
    ``warmup_steps`` (compiling), then the timed ones. ``on_step(i)`` runs after step ``i``
    (a rung's evaluation), its time left out of the steps'."""
    device = trainer.device
    compiled = trainer.compiled is not trainer.model
    eager_steps = max(0, min(eager_steps, steps - warmup_steps - 1)) if compiled else 0
    aside = [0.0]  # seconds spent in on_step

    def step_done(i: int) -> None:
        if on_step is None:
            return
        synchronize(device)
        began = time.perf_counter()
        on_step(i)
        synchronize(device)
        aside[0] += time.perf_counter() - began
    trainer.model.train()
    synchronize(device)
    level0 = meter.level()  # what every step before the timed ones adds (optimizer state, compiler)
    trainer.eager = True
    try:
        for i in range(eager_steps):
            trainer.step()
            step_done(i)
    finally:
        trainer.eager = False
    aside[0] = 0.0
    began = time.perf_counter()
    for i in range(eager_steps, eager_steps + warmup_steps):
        trainer.step()
        step_done(i)
    trainer.take_loss(eager_steps + warmup_steps)
    synchronize(device)
    warmup_s = time.perf_counter() - began - aside[0]
    runtime_init = meter.level() - level0
    counted = trainer.counts()
    aside[0] = 0.0
    began = time.perf_counter()
    for i in range(eager_steps + warmup_steps, steps):
        trainer.step()
        step_done(i)
    synchronize(device)
    measured_s = time.perf_counter() - began - aside[0]
    samples, tokens, padded = (now - before for now, before in zip(trainer.counts(), counted, strict=True))
    measured_steps = steps - warmup_steps - eager_steps
    final_loss = trainer.take_loss(measured_steps)
    step_s = measured_s / measured_steps
    return TrainReport(
        steps=steps,
        micro_batches=trainer.micro_batches,
        warmup_s=warmup_s,
        measured_s=measured_s,
        throughput=samples / measured_s,
        step_ms=step_s * 1e3,
        compile_s=max(0.0, warmup_s - warmup_steps * step_s) if compiled else 0.0,
        runtime_init_mib=max(0, runtime_init) / MIB,
        final_loss=final_loss,
        eager_steps=eager_steps,
        samples=samples, tokens=tokens, padded_tokens=padded,
    )


def training_memory(trainer: Trainer, meter: MemoryMeter, steps: int = 2,
                    graph_pools: int | None = None) -> MemoryReport:
    """Peak memory of ``steps`` more optimizer steps, after warm-up (and compilation).

    Transient memory (activations, gradients, workspaces) is measured; the state that lives
    across steps (weights, buffers, optimizer moments) is counted exactly from its tensors,
    so memory the runtime or compiler set aside once per process is not charged to the model.
    Run it after anything timed: on CPU it pins the C library's mmap threshold (see
    ``measure.peak_in_fresh_arena``).
    """
    trainer.model.train()
    # One step outside the window: whatever was set up lazily again since the fine-tune is
    # not charged to it (PT2E's torch.export of the same forward evicts the compiled
    # training graph; recompiling it in the window was measured at +29 MiB).
    trainer.step()
    trainer.take_loss(1)

    def window() -> None:
        # Under a token budget, steps differ in shape: the window holds the one that costs the
        # most (the longest samples at a full micro-batch), which the next steps may not.
        for i in range(steps):
            trainer.step(trainer.budget.longest_step() if trainer.budget is not None and i == 0 else None)

    transient, _ = peak_in_fresh_arena(window, meter)
    trainer.take_loss(steps)
    state = model_state_bytes(trainer.model) + optimizer_state_bytes(trainer.optimizer)
    if trainer.teacher is not None:
        state += model_state_bytes(trainer.teacher)
    # CUDA graphs keep their activations in private pools filled when they were recorded,
    # before the window: count them, as the caller measured them after training and before
    # any inference graph was recorded (``graph_pools``), or now.
    graphs = graph_pool_bytes(meter.device) if graph_pools is None else graph_pools
    return MemoryReport(transient_mib=(transient + graphs) / MIB, state_mib=state / MIB,
                        steps=steps, graph_pool_mib=graphs / MIB)
