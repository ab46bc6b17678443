"""The study side of trial isolation: start a trial process, watch it, name how it ended.

Trial processes are forked from a ``multiprocessing`` fork server that imported torch (and
its compiler) once, so each trial starts in milliseconds while a segfault, an abort, an
out-of-memory kill or a hang stays inside its process and becomes a failed trial with a
reason a user understands.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from advisor.trial.spec import TrialSpec

# Imported once in the fork server: what every trial would otherwise import itself.
PRELOAD = ["advisor.trial.process", "torch._dynamo", "torch._inductor.compile_fx"]

_SIGNALS = {
    signal.SIGKILL: "killed (SIGKILL; the system may have run out of memory)",
    signal.SIGABRT: "aborted (SIGABRT)",
    signal.SIGSEGV: "crashed with a segmentation fault (SIGSEGV)",
    signal.SIGBUS: "crashed with a bus error (SIGBUS)",
    signal.SIGFPE: "crashed with a floating-point exception (SIGFPE)",
    signal.SIGTERM: "terminated (SIGTERM)",
}


@dataclass
class Outcome:
    ok: bool
    result: dict | None = None
    reason: str = ""
    phase: str = ""
    traceback: str = ""
    log_tail: str = ""
    wall_s: float = 0.0
    stopped: bool = False  # the study stopped it at a rung; ``result`` holds what it measured


class TrialRunner:
    """Runs :class:`TrialSpec` s in isolated processes, one at a time."""

    def __init__(self, preload: list[str] | None = None) -> None:
        # The fork server (one per process, started by the first trial) also imports the
        # workload's own modules, so unpickling its model imports nothing. A CUDA check there
        # must not initialize CUDA, or no trial forked from it could use the GPU.
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD + list(preload or []))

    def run(self, spec: TrialSpec, timeout: float,
            on_tick: Callable[[str, float], None] | None = None,
            stop: threading.Event | None = None,
            on_rung: Callable[[dict, dict], bool] | None = None) -> Outcome:
        """Run ``spec`` in a new process; ``stop`` (set on Ctrl-C) ends it as "interrupted".
        At each of ``spec.rungs`` the trial sends its point and cheap costs, and ``on_rung``
        answers whether it goes on (without one, it always does)."""
        from advisor.trial import process as trial_process

        began = time.time()
        spec = replace(spec, spawned_at=began)
        receiver, sender = self.ctx.Pipe(duplex=True)
        process = self.ctx.Process(target=trial_process.main, args=(spec, sender), daemon=True)
        with _main_not_reimported():
            process.start()
        sender.close()
        phase, outcome = "start", None
        try:
            while outcome is None:
                if receiver.poll(0.25):
                    try:
                        message = receiver.recv()
                    except EOFError:
                        break  # the process died; its exit status says how
                    if message[0] == "phase":
                        phase = message[1]
                    elif message[0] == "rung":
                        go_on = on_rung is None or on_rung(message[1], message[2])
                        with contextlib.suppress(OSError):  # the trial died meanwhile: its exit says how
                            receiver.send("go" if go_on else "stop")
                    elif message[0] == "result":
                        outcome = Outcome(ok=True, result=message[1], phase=phase)
                    elif message[0] == "stopped":
                        step = message[1]["rungs"][-1]["step"]
                        outcome = Outcome(ok=False, result=message[1], phase=message[2], stopped=True,
                                          reason=f"stopped early at step {step}")
                    else:
                        _, reason, tb, phase = message
                        outcome = Outcome(ok=False, reason=reason, traceback=tb, phase=phase)
                elif not process.is_alive() and not receiver.poll(0):
                    break
                if outcome is None and stop is not None and stop.is_set():
                    process.kill()
                    outcome = Outcome(ok=False, phase=phase, reason="interrupted")
                if outcome is None and time.time() - began > timeout:
                    process.kill()
                    outcome = Outcome(ok=False, phase=phase,
                                      reason=f"timed out after {timeout:g} s (during {phase}); "
                                             f"raise --trial-timeout if it needs longer")
                if on_tick:
                    on_tick(phase, time.time() - began)
        except BaseException:
            process.kill()
            process.join()
            raise
        finally:
            receiver.close()
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()
        if outcome is None:
            outcome = Outcome(ok=False, phase=phase,
                              reason=f"trial process {_exit_reason(process.exitcode)} during {phase}")
        outcome.wall_s = time.time() - began
        if not outcome.ok:
            outcome.log_tail = _tail(spec.log)
        return outcome


@contextlib.contextmanager
def _main_not_reimported():
    """Keep the trial process from running the user's ``__main__`` script again.

    multiprocessing re-imports a script that started it in every child, so a script calling
    ``advisor.run()`` without an ``if __name__ == "__main__":`` guard would start studies
    inside trials. Trials need nothing from it (the workload comes from ``module:function``),
    and a main module whose spec is named ``__main__`` is one multiprocessing skips.
    """
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None:
        yield
        return
    main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
    try:
        yield
    finally:
        main.__spec__ = None


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            sig = signal.Signals(-code)
        except ValueError:
            return f"was killed by signal {-code}"
        return _SIGNALS.get(sig, f"was killed by {sig.name}")
    return f"exited with status {code} without a result"


def _tail(path, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""
