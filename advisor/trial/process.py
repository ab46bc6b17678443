"""The trial process: its entry point, its memory limit, its log, and how a failure reads.

It runs in a child process forked from a server that has already imported torch, so a
trial pays milliseconds, not seconds, to start. It runs the pipeline (``pipeline.py``) on
the study's cache, never the storage, and sends back one JSON-able result or one error
through its pipe; its stdout and stderr go to the trial's log file.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
import tqdm

from advisor import logs
from advisor.errors import AdvisorError, first_line
from advisor.trial import measure, pipeline
from advisor.trial.spec import TrialSpec
from advisor.trial.train import TrainingDiverged

# Imported first in the fork server, before the workload's modules: what libraries log
# while those load (torchao's kernel probes) goes to the study's library log.
logs.quiet_libraries(os.environ.get(logs.ENV) or os.devnull)


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
    redirect_output(spec.log)
    logs.to_stream(sys.stderr)
    clock = _PhaseClock(conn, started)
    try:
        if spec.cpus:
            os.sched_setaffinity(0, spec.cpus)
        limit_memory(spec)

        def ask(point: dict, costs: dict) -> bool:
            """The study's decision at a rung (the runner answers with the loop's rung rule)."""
            conn.send(("rung", point, costs))
            return conn.recv() == "go"

        result = pipeline.run(spec, clock, ask if spec.rungs else None)
        result["phases"] = _phases(clock, started, spec)
        conn.send(("result", result))
    except pipeline.Stopped as stopped:
        conn.send(("stopped", {**stopped.partial(), "phases": _phases(clock, started, spec)}, clock.current))
    except BaseException as exc:  # everything becomes data for the study
        traceback.print_exc()
        conn.send(("error", reason_of(exc, spec.memory_limit_mb), traceback.format_exc(), clock.current))
    finally:
        conn.close()


def _phases(clock: _PhaseClock, started: float, spec: TrialSpec) -> dict[str, float]:
    phases = clock.durations()
    phases["start"] = max(0.0, started - spec.spawned_at) if spec.spawned_at else 0.0
    return phases


def redirect_output(log: Path) -> tuple[int, int]:
    """Send this process's stdout and stderr to ``log`` (the compiler's and profiler's
    chatter, and library warnings); returns the saved descriptors for :func:`restore_output`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return saved


def restore_output(saved: tuple[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for target, fd in zip((1, 2), saved, strict=True):
        os.dup2(fd, target)
        os.close(fd)


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """:func:`redirect_output` for the duration of a block (``advisor apply`` runs the
    pipeline in the user's own process)."""
    saved = redirect_output(log)
    try:
        yield
    finally:
        restore_output(saved)


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
    message = first_line(exc)
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
        """Seconds per phase, summed over its spans (the fine-tune is cut by its rungs)."""
        ends = [t for _, t in self.marks[1:]] + [time.time()]
        out: dict[str, float] = {}
        for (name, t), end in zip(self.marks, ends, strict=True):
            out[name] = out.get(name, 0.0) + end - t
        return out
