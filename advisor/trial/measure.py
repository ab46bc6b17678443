"""Measurements a user can trust: latency, memory, size and the workload's metric.

Latency: warm-up calls first (the first call, where compilation happens, is timed apart),
the device synchronized around every timed call, repeated until a time budget and a minimum
count are both met; the median is reported with the 10th and 90th percentiles.

Memory: on CPU the resident-set high-water mark (VmHWM) is reset by writing ``5`` to
``/proc/self/clear_refs`` after ``malloc_trim`` returns freed heap pages, so the peak over
the level at the reset is what the measured code touched. glibc keeps freed multi-MiB
tensors in its heap (its mmap threshold grows with use), where they stay resident and hide
what a technique saves: a 12-block MLP measured 110 MiB plain vs 92 MiB checkpointed that
way. Pinning the threshold for the whole process fixes that but slows CPU training 2-3x, so
``peak_in_fresh_arena`` pins it only for the memory window and runs the window on a new
thread, whose new malloc arena holds no retained chunks: freed tensors leave the resident
set and the peak follows live memory (101 vs 35 MiB, as with the threshold pinned from the
start). On CUDA the caching allocator's peak of allocated bytes is reset instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import operator
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from advisor.errors import AdvisorError
from advisor.objectives import CONFIDENCE
from advisor.trial.mapped import MappedSplit
from advisor.workload import MetricFn, call_model, logits_of, metric_value, to_device

MIB = 1024 * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- memory -------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AdvisorError(f"/proc/self/status has no {field}; CPU peak memory needs Linux")


_libc = None


def _malloc_trim() -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def pin_mmap_threshold(size: int = 64 * 1024) -> bool:
    """Serve allocations above ``size`` by mmap, returned to the system when freed.

    Setting it also turns glibc's dynamic threshold off for the rest of the process, so it
    is done only where timing no longer matters. False where the C library has no mallopt.
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return hasattr(_libc, "mallopt") and bool(_libc.mallopt(M_MMAP_THRESHOLD, size))


class MemoryMeter:
    """Peak memory of a code region above the level where it started."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def level(self) -> int:
        """Bytes in use now: resident set on CPU, allocated tensors on CUDA."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_kib("VmRSS") * 1024

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _malloc_trim()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError as exc:
                raise AdvisorError(
                    f"cannot reset the peak resident set through /proc/self/clear_refs ({exc}); "
                    "CPU peak memory needs Linux"
                ) from None
        self.base = self.level()

    def peak(self) -> int:
        """Bytes of the peak since :meth:`start`, above the level at the start."""
        return max(0, self.process_peak() - self.base)

    def process_peak(self) -> int:
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status_kib("VmHWM") * 1024


def peak_in_fresh_arena(fn: Callable[[], Any], meter: MemoryMeter) -> tuple[int, Any]:
    """``(peak bytes above the start level, fn's result)`` of ``fn`` run as the module
    docstring says: on CPU on a new thread with the mmap threshold pinned, on CUDA in place.
    """
    def window():
        meter.start()
        value = fn()
        return meter.peak(), value

    if meter.device.type != "cpu":
        return window()
    pin_mmap_threshold()
    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = window()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="advisor-memory-window")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def graph_pool_bytes(device: torch.device) -> int:
    """Bytes allocated in the CUDA allocator's private pools (CUDA graphs' activations), as
    every other figure counts allocated, not reserved, bytes; 0 on CPU."""
    if device.type != "cuda":
        return 0
    index = device.index or 0
    return sum(s["allocated_size"] for s in torch.cuda.memory_snapshot()
               if s.get("device", index) == index
               and tuple(s.get("segment_pool_id", (0, 0))) != (0, 0))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def model_state_bytes(model: nn.Module) -> int:
    """Parameters and buffers, plus the tensors pruning derives from them: a module pruned
    through ``torch.nn.utils.prune`` holds ``weight_orig`` and ``weight_mask`` and, from its
    first forward on, the masked ``weight`` as a plain attribute, which lives across steps."""
    from torch.nn.utils import prune

    derived = [getattr(m, hook._tensor_name) for m in model.modules() for hook in m._forward_pre_hooks.values()
               if isinstance(hook, prune.BasePruningMethod)
               and isinstance(getattr(m, hook._tensor_name, None), torch.Tensor)]
    return tensor_bytes(model.parameters()) + tensor_bytes(model.buffers()) + tensor_bytes(derived)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(state.values()) for state in optimizer.state.values())


# -- latency ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int
    first_ms: float  # the first call: compilation and lazy initialization
    samples_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)  # every timed call

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how much the repeats disagree."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms else 0.0

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "samples_ms"}
        return {**out, "spread": self.spread}

    @classmethod
    def of(cls, samples_ms: list[float], first_ms: float) -> Timing:
        q = np.percentile(np.array(samples_ms), [10, 50, 90])
        return cls(median_ms=float(q[1]), p10_ms=float(q[0]), p90_ms=float(q[2]), reps=len(samples_ms),
                   first_ms=first_ms, samples_ms=tuple(samples_ms))


def time_calls(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3,
               min_reps: int = 10, max_reps: int = 500, budget_s: float = 0.5) -> Timing:
    """Time ``fn`` like an inference benchmark: warm up, synchronize, repeat, take medians."""
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - t
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - began < budget_s):
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return Timing.of([t * 1e3 for t in times], first_ms=first * 1e3)


@dataclass(frozen=True)
class Paired:
    """A model's time over a reference's, both timed in the same process, on the same cores,
    threads and inputs, interleaved in short rounds: a slowdown of the machine (another
    process, a frequency change) hits both sides of a round alike and cancels in its ratio."""

    ratio: float  # the median of the rounds' ratios
    low: float  # its bootstrap confidence interval
    high: float
    rounds: int
    ms: float  # each side's median call, over every round
    reference_ms: float
    # each round's seconds, per side: for a simulation fed by them (not stored)
    seconds: tuple[list[float], list[float]] = field(default=((), ()), repr=False, compare=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "seconds"}



PAIRED_PRECISION = 0.02  # timing goes on past its budget until the interval is within +-2%...
PAIRED_EXTEND = 4.0  # ...for at most 4x the budget in all
PAIRED_CHECK_EVERY = 10  # rounds between two checks of the interval


def time_paired(fn: Callable[[], Any], reference: Callable[[], Any], device: torch.device, *,
                calls: int = 1, min_rounds: int = 20, max_rounds: int = 4000, budget_s: float = 0.5,
                precision: float = PAIRED_PRECISION, extend: float = PAIRED_EXTEND,
                warmup: int = 3, settle: int = 1, clock: Callable[[], float] = time.perf_counter,
                seed: int = 0) -> Paired:
    """Time ``fn`` against ``reference``: after warm-up calls of each, rounds of ``calls``
    calls of one then ``calls`` of the other, the order alternating (ABBA), until a time
    budget and a minimum number of rounds are both met. Each round gives the ratio of the two
    medians; their median is the ratio, with a bootstrap interval (resampled rounds).

    Past the budget, rounds go on while the interval is wider than ``precision`` of the ratio
    either side, for at most ``extend`` times the budget in all: a quiet machine's 0.5 s gave
    intervals of +-4-5% on the digits CNN (and so repeats 4-5% apart), which more rounds
    narrow; a busy one stops at the cap with the wide interval it has.

    One timed call a side per round by default: a competing process's bursts are shorter than
    a block of calls, so longer blocks let one side meet a burst the other did not (a 2x model
    measured 3.3x, interval 2.0-4.6, with blocks of 3 beside a busy process; 2.0-2.2x with
    single calls). Each block starts with ``settle`` untimed calls: the first call after the
    other model ran pays for the switch (its weights and kernels cold), which a server calling
    one model never does. Timed at once, a structured + int8 CNN alternating with its fp32
    baseline measured 0.33x where the two timed apart measure 0.30x (0.27x against 0.21x on
    one thread); with one settling call, 0.30-0.31x (0.21-0.22x)."""
    sides = (fn, reference)
    for side in sides:
        for _ in range(warmup):
            side()
    synchronize(device)
    ratios: list[float] = []
    medians: tuple[list[float], list[float]] = ([], [])
    began = clock()

    def more() -> bool:
        rounds, elapsed = len(ratios), clock() - began
        if rounds >= max_rounds:
            return False
        if rounds < min_rounds or elapsed < budget_s:
            return True
        if elapsed >= budget_s * extend:
            return False
        if rounds % PAIRED_CHECK_EVERY:
            return True
        low, high = bootstrap_median(ratios, CONFIDENCE, seed, resamples=500)
        return (high - low) / 2 > precision * float(np.median(ratios))

    while more():
        order = (0, 1) if len(ratios) % 2 == 0 else (1, 0)
        block = [0.0, 0.0]
        for i in order:
            for _ in range(settle):
                sides[i]()
            synchronize(device)
            times = []
            for _ in range(calls):
                t = clock()
                sides[i]()
                synchronize(device)
                times.append(clock() - t)
            block[i] = float(np.median(times))
        medians[0].append(block[0])
        medians[1].append(block[1])
        ratios.append(block[0] / block[1] if block[1] > 0 else float("inf"))
    low, high = bootstrap_median(ratios, CONFIDENCE, seed)
    return Paired(ratio=float(np.median(ratios)), low=low, high=high, rounds=len(ratios),
                  ms=float(np.median(medians[0])) * 1e3, reference_ms=float(np.median(medians[1])) * 1e3,
                  seconds=medians)


def bootstrap_median(values: list[float], confidence: float = CONFIDENCE, seed: int = 0,
                     resamples: int = 2000) -> tuple[float, float]:
    """The percentile bootstrap interval of the median of ``values``."""
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    medians = np.median(data[rng.integers(0, len(data), size=(resamples, len(data)))], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return float(low), float(high)


# -- size -----------------------------------------------------------------------------------

def weight_bytes(model: nn.Module) -> int:
    """The bytes the deployable model's tensors take, each storage once: what its shipped
    ``torch.export`` program stores (``advisor apply -o``; read back from the file in the
    tests). int8 stays int8, a tied tensor counts once, and a quantized tensor subclass
    (torchao) counts the plain tensors it holds. No archive records: a tiny model is not
    charged a per-tensor overhead a large one would not feel."""
    storages: dict[tuple[int, int], int] = {}

    def add(tensor: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(tensor):
            names, _ = tensor.__tensor_flatten__()
            for name in names:
                add(getattr(tensor, name))
            return
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()

    for tensor in model.state_dict(keep_vars=True).values():
        add(tensor)
    for module in model.modules():  # a graph module's constants that are not in its state dict
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "get_attr":
                    value = operator.attrgetter(node.target)(module)
                    if isinstance(value, torch.Tensor):
                        add(value)
    return sum(storages.values())


# -- the workload's metric --------------------------------------------------------------------

def fixed_batches(n: int, batch: int) -> list[tuple[np.ndarray, int]]:
    """Index arrays of exactly ``batch`` samples covering ``0..n-1``, with the real count.

    The last batch is padded with repeats so a compiled model sees one static shape; the
    padded rows are dropped from the outputs.
    """
    out = []
    for start in range(0, n, batch):
        idx = np.arange(start, min(start + batch, n))
        real = len(idx)
        if real < batch:
            idx = np.concatenate([idx, np.resize(np.arange(n), batch - real)])
        out.append((idx, real))
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data: MappedSplit, metric: MetricFn, *, batch: int,
             device: torch.device, autocast) -> float:
    """The workload's metric over the whole split, computed on ``model``'s outputs."""
    outputs, targets = _outputs(model, data, metric, batch=batch, device=device, autocast=autocast)
    return metric_value(metric, outputs, targets)


@torch.no_grad()
def evaluate_parts(model: nn.Module, data: MappedSplit, metric: MetricFn, *, batch: int,
                   device: torch.device, autocast) -> dict:
    """The workload's metric on the split's two parts (``parts``): ``selection``, which the
    study selects on (constraints, the front, the sampler), and ``confirmation``, which only
    reports the recommendation's accuracy, so the best of many trials is not judged on the
    data it was chosen on. ``confirmation`` is None for a split of one sample."""
    outputs, targets = _outputs(model, data, metric, batch=batch, device=device, autocast=autocast)
    selection, confirmation = (torch.from_numpy(p) for p in parts(len(data)))
    return {"selection": metric_value(metric, outputs[selection], targets[selection]),
            "confirmation": (metric_value(metric, outputs[confirmation], targets[confirmation])
                             if len(confirmation) else None),
            "samples": [len(selection), len(confirmation)],
            # One target per sample (a class), or several (a token each): a point is then not a sample.
            "per_sample": targets.dim() <= 1}


def evaluate_selection(model: nn.Module, data: MappedSplit, metric: MetricFn, *, batch: int,
                       device: torch.device, autocast) -> float:
    """The workload's metric on the split's selection part alone (``parts``): what
    ``evaluate_parts`` gives as ``selection``, for half the forward passes (a rung's read)."""
    selection, _ = parts(len(data))
    outputs, targets = _outputs(model, data, metric, batch=batch, device=device, autocast=autocast,
                                order=selection)
    return metric_value(metric, outputs, targets)


def parts(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A split of ``n`` samples in two: the even positions select, the odd ones confirm (a
    split sorted by class keeps its balance in both)."""
    return np.arange(0, n, 2), np.arange(1, n, 2)


def _outputs(model: nn.Module, data: MappedSplit, metric: MetricFn, *, batch: int, device: torch.device,
             autocast, order: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs and targets of the split's samples, or of ``order`` (their indices) alone."""
    order = np.arange(len(data)) if order is None else order
    outputs, targets = [], []
    # A metric that needs only part of the logits (the built-in accuracy: their argmax)
    # reduces each batch, so a language model's [samples, tokens, vocabulary] is never held.
    reduce = getattr(metric, "reduce", None) or (lambda out: out.float())
    for idx, real in fixed_batches(len(order), batch):
        inputs, target = data.batch(order[idx])
        with autocast:
            out = logits_of(call_model(model, to_device(inputs, device)))
        outputs.append(reduce(out[:real]).cpu())
        targets.append(target[:real])
    return torch.cat(outputs), torch.cat(targets)
