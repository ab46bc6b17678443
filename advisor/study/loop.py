"""The trial loop of one ``advisor run``: its workers, the budget, heartbeats, its events.

``run_trials`` starts one thread per worker :class:`Slot` (a share of this machine's cores,
or a GPU). Each asks the study for a trial, runs it in a trial process on its slot, and tells
the study the outcome, until this run's ``--trials`` or the study's ``--study-trials`` are
spent, or Ctrl-C. Asking and telling happen under one lock; the study-wide budget is also
checked under the storage's lock, so every worker on every machine sees one count.

What happens is reported to an :class:`Events` object (the terminal's progress display is
one, ``advisor/report.py``); the loop itself prints nothing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field

import optuna
import torch
from optuna.trial import TrialState

from advisor import hardware, objectives, space
from advisor.constraints import Constraints
from advisor.errors import AdvisorError
from advisor.knobs import Knobs
from advisor.study import record, rungs, storage
from advisor.study.options import RunOptions
from advisor.techniques.layers import LayerPlan
from advisor.trial import measure
from advisor.trial.runner import Outcome, TrialRunner
from advisor.trial.spec import TrialSpec


class Events:
    """What a run reports as it goes; this base class ignores it all (a silent run)."""

    def baseline_started(self, training: bool) -> None:
        pass

    def warm_started(self, origins: list[str]) -> None:
        """A new study enqueued these earlier studies' trials ("study#number") first."""

    def baseline_finished(self, result: dict) -> None:
        pass

    def trial_started(self, index: int, number: int, knobs: Knobs) -> None:
        pass

    def tick(self, phase: str, elapsed: float) -> None:
        """A running trial (or the baseline) is in ``phase``, ``elapsed`` seconds in."""

    def trial_finished(self, number: int, outcome: Outcome, front: int | None) -> None:
        """``front``: the study's Pareto-front size after a completed trial (None otherwise)."""


@dataclass
class RunResult:
    study_name: str
    storage: str
    baseline: dict
    completed: int
    failed: int
    front: list[int] = field(default_factory=list)
    interrupted: bool = False
    stopped: int = 0  # trials stopped early at a rung (study/rungs.py), stored as pruned
    out_of_time: bool = False  # --time-budget ended the run
    # Per trial, where the wall time went: sampler, trial process, storage writes.
    timings: list[dict] = field(default_factory=list)
    setup_s: dict = field(default_factory=dict)
    loop_s: float = 0.0  # wall time of the trial loop (all workers), after the baseline


def _store_outcome(trial: optuna.Trial, outcome: Outcome) -> None:
    if outcome.ok:
        record.write_result(trial, dict(outcome.result))
    elif outcome.stopped:
        record.write_partial(trial, dict(outcome.result), outcome.wall_s)
    else:
        record.write_failure(trial, outcome.reason, outcome.phase, outcome.log_tail, outcome.wall_s)


@dataclass(frozen=True)
class Slot:
    """Where one local worker runs its trials: its CPU cores, or its GPU."""

    index: int
    of: int
    cpus: tuple[int, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict:
        return {"worker": self.index, "workers": self.of, "cpus": list(self.cpus),
                **dict(self.env)}


def slots(workers: int, hw: hardware.Hardware) -> list[Slot]:
    """Split this machine between ``workers``: on CUDA one GPU each, on CPU a disjoint set of
    cores each, so no trial is timed on cores or a GPU another trial is training on."""
    if workers == 1:
        return [Slot(0, 1)]
    if hw.device == "cuda":
        gpus = max(1, torch.cuda.device_count())
        if workers > gpus:
            raise AdvisorError(f"--workers {workers} on CUDA needs a GPU per worker, or a trial's "
                               f"latency would be timed on a GPU another trial is training on; this "
                               f"machine has {gpus}: use --workers {gpus} or fewer")
        return [Slot(i, workers, env=(("CUDA_VISIBLE_DEVICES", str(i)),)) for i in range(workers)]
    cores = sorted(os.sched_getaffinity(0))
    if workers > len(cores):
        raise AdvisorError(f"--workers {workers} needs at least that many CPU cores; this machine "
                           f"gives the advisor {len(cores)}")
    share = len(cores) // workers
    return [Slot(i, workers, cpus=tuple(cores[i * share:(i + 1) * share])) for i in range(workers)]


@dataclass
class Loop:
    """What the worker threads of one run share; ``lock`` guards the study and the counts."""

    study: optuna.Study
    rdb: optuna.storages.RDBStorage
    search: space.Space
    runner: TrialRunner
    spec: TrialSpec  # the run's template: each trial's spec is derived from it
    options: RunOptions
    events: Events
    result: RunResult
    constraints: Constraints
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    started: int = 0
    began: float = field(default_factory=time.monotonic)  # for --time-budget
    rule: rungs.Rule = field(default_factory=rungs.Rule)
    stops: dict[int, str] = field(default_factory=dict)  # trial number -> why the rung rule stopped it


def run_trials(loop: Loop, worker_slots: list[Slot]) -> None:
    """Ask, run in a trial process, tell, on each worker's slot, until this run's
    ``--trials`` (or the study's ``--study-trials``) are reached, or Ctrl-C."""
    done = threading.Semaphore(0)

    def work(slot: Slot) -> None:
        try:
            _worker(loop, slot)
        finally:
            done.release()

    for slot in worker_slots:
        threading.Thread(target=work, args=(slot,), name=f"advisor-worker-{slot.index}", daemon=True).start()
    with _terminate_as_interrupt():
        _wait(loop, worker_slots, done)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (what a job scheduler or ``kill`` sends) stops a run as Ctrl-C does: the
    running trials are stored as interrupted, and nothing stored is lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wait(loop: Loop, worker_slots: list[Slot], done: threading.Semaphore) -> None:
    # Wait on a semaphore, not Thread.join: a join interrupted by Ctrl-C can leave the thread
    # marked finished on Python 3.11, and a later join would then return at once.
    finished = 0
    try:
        while finished < len(worker_slots):
            if done.acquire(timeout=0.2):
                finished += 1
    except BaseException as stopped:
        # The workers stop their running trials, store them as "interrupted" and return. Any
        # other exception here (a caller's own timeout) stops them too, before it propagates:
        # a trial process left running would compete with whatever runs next.
        loop.stop.set()
        loop.result.interrupted = True
        while finished < len(worker_slots):
            done.acquire()
            finished += 1
        if not isinstance(stopped, KeyboardInterrupt):
            raise


def _next_trial(loop: Loop) -> tuple[optuna.Trial, Knobs, int] | None:
    """The next trial to run, or None when the budget is spent; under ``loop.lock``."""
    options, study = loop.options, loop.study
    if loop.stop.is_set() or loop.started >= options.trials:
        return None
    if options.time_budget is not None and time.monotonic() - loop.began >= options.time_budget:
        loop.result.out_of_time = True  # the running trials finish; no new one starts
        return None

    def ask():
        with warnings.catch_warnings():
            # Heartbeats are an experimental Optuna feature, meant for Study.optimize: here
            # the trial loop records them itself (_with_heartbeat). Neither note is the user's.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
            # A trial whose worker died (no heartbeat for two intervals) is failed and queued again.
            optuna.storages.fail_stale_trials(study)
            return study.ask()

    if options.study_trials is not None:
        # Counting and asking under the storage's lock: workers on every machine share it.
        with storage.lock(options.storage, f"budget:{study.study_name}"):
            held = study.get_trials(deepcopy=False, states=BUDGET_STATES)
            if len(held) >= options.study_trials:
                return None
            trial = ask()
    else:
        trial = ask()
    loop.started += 1
    return trial, loop.search.suggest(trial), loop.started


BUDGET_STATES = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.RUNNING)


def _worker(loop: Loop, slot: Slot) -> None:
    study, result, events = loop.study, loop.result, loop.events
    while True:
        t0 = time.perf_counter()
        with loop.lock:
            taken = _next_trial(loop)
        if taken is None:
            return
        trial, knobs, i = taken
        t1 = time.perf_counter()
        if slot.of > 1:
            record.write_worker(trial, slot.to_dict())
        events.trial_started(i, trial.number, knobs)
        spec = loop.spec.trial(trial.number, knobs, slot.cpus, slot.env)
        outcome = loop.runner.run(spec, loop.options.trial_timeout,
                                  on_tick=_with_heartbeat(loop.rdb, trial, events.tick), stop=loop.stop,
                                  on_rung=functools.partial(_at_rung, loop, trial, knobs))
        t2 = time.perf_counter()
        if loop.stop.is_set() and not outcome.ok:
            # Ctrl-C reaches the trial process too: whatever it reported, it was interrupted.
            outcome = Outcome(ok=False, reason="interrupted", phase=outcome.phase)
        elif outcome.stopped:
            outcome.reason = loop.stops.pop(trial.number, outcome.reason)
        with loop.lock:
            _store_outcome(trial, outcome)
            if outcome.ok:
                # Constraints go to Optuna before tell, so its samplers learn what is feasible.
                for key, value in loop.constraints.values(outcome.result["metrics"],
                                                          result.baseline["metrics"]).items():
                    trial.set_constraint(key, value)
                study.tell(trial, objectives.told(outcome.result, result.baseline["metrics"]))
                result.completed += 1
            elif outcome.stopped:
                # Optuna's samplers take a pruned trial as worse than the completed ones.
                study.tell(trial, state=TrialState.PRUNED)
                result.stopped += 1
            else:
                study.tell(trial, state=TrialState.FAIL)
                result.failed += 1
            # The front as the report finds it: feasible trials, paired latency ratios.
            front = len(record.StudyRecord.of(study).front(loop.constraints).front) if outcome.ok else None
        t3 = time.perf_counter()
        result.timings.append({
            "number": trial.number, "knobs": knobs.to_dict(), "ok": outcome.ok, "worker": slot.index,
            "ask_s": t1 - t0, "process_s": t2 - t1, "store_s": t3 - t2,
            "phases": (outcome.result or {}).get("phases", {}),
        })
        events.trial_finished(trial.number, outcome, front)


def _at_rung(loop: Loop, trial: optuna.Trial, knobs: Knobs, point: dict, cheap: dict) -> bool:
    """The study's answer to a trial at a rung: store its point, compare it with every other
    trial's point at that rung (``rungs.decide``), store a stop and its reason."""
    base = loop.result.baseline["metrics"]
    measured = {"latency_ms": cheap["latency_ms"]} if "latency_ms" in cheap else {}
    if "size_bytes" in cheap:
        measured["size_mib"] = cheap["size_bytes"] / measure.MIB
    costs = {}
    if "latency_ratio" in cheap:
        costs["latency_ms"] = cheap["latency_ratio"]
    if "size_mib" in measured and base.get("size_mib"):
        costs["size_mib"] = measured["size_mib"] / base["size_mib"]
    here = rungs.Point(trial.number, point["step"], point["accuracy"], costs, rungs.lightness(knobs))
    with loop.lock:
        trials = loop.study.get_trials(deepcopy=False)
        observe = loop.options.early_stop == "observe"  # the search table: what the trial measured only
        if not observe and any(name not in costs for name in rungs.CHEAP) and (
                same := rungs.same_structure(trials, knobs, loop.spec.device, _plan(point))):
            # Not measured by this rung (a compiled deployable is timed at the end): the costs
            # of the same deployed structure, which a completed trial measured.
            number, result = same
            here = here.with_costs(rungs.final_costs(result, base), number)
            measured = {name: result["metrics"][name] for name in rungs.CHEAP} | measured
        record.write_rung(trial, {**here.to_dict(), "seconds": point.get("seconds")})
        if observe:
            return True
        peers, gains = rungs.peers(trials, here.step, base)
        decision = rungs.decide(here, peers, baseline=base, constraints=loop.constraints, measured=measured,
                                gains=gains, rule=loop.rule)
        if decision.stop:
            record.write_stopped(trial, {"step": here.step, "reason": decision.reason, "by": list(decision.by)})
            loop.stops[trial.number] = f"stopped at step {here.step}: {decision.reason}"
    return not decision.stop


def _plan(point: dict) -> LayerPlan | None:
    """The per-layer choice a trial sent with its rung point; ``None`` where it sent none."""
    return LayerPlan.from_dict(point["layers"]) if "layers" in point else None


def _with_heartbeat(rdb: optuna.storages.RDBStorage, trial: optuna.Trial, tick):
    """The runner's tick, also recording the trial's heartbeat at the storage's interval."""
    interval = rdb.get_heartbeat_interval()
    last = [0.0]

    def on_tick(phase: str, elapsed: float) -> None:
        now = time.monotonic()
        if interval and now - last[0] >= interval:
            rdb.record_heartbeat(trial._trial_id)
            last[0] = now
        tick(phase, elapsed)

    return on_tick
