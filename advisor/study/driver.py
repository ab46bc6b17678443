"""``run(RunOptions)``: the one core behind ``advisor run`` and ``advisor.run()``.

1. build and check the workload, materialize its data into the study's cache on this
   machine (``trial/cache.py``);
2. create or resume the Optuna study (``open.py``: directions from the objectives table,
   the workload, the measurement settings, the hardware and the search space recorded; a
   new one first tries the fronts of earlier studies of its workload, ``warm.py``);
3. measure the baseline once per study (``baseline.py``), and with it each layer's
   sensitivity where the space searches per-layer choices (``trial/sensitivity.py``);
4. hand the trial loop to ``loop.py``: ask the sampler for knobs, run each trial in its own
   process, tell the study the measured objectives, or a failure with its reason.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

from advisor import hardware, knobs, space
from advisor.study import loop, record, rungs, storage
from advisor.study.baseline import ensure_baseline
from advisor.study.loop import Events, RunResult
from advisor.study.open import open_study
from advisor.study.options import RunOptions, check
from advisor.techniques import quantization
from advisor.trial import sensitivity
from advisor.trial.cache import StudyCache
from advisor.trial.runner import TrialRunner
from advisor.trial.spec import Settings, TrialSpec
from advisor.workload import DEFAULT_MODEL, Workload, WorkloadRef, build


def run(options: RunOptions, events: Events | None = None) -> RunResult:
    """Run (or resume) a study; see the module docstring for the steps."""
    check(options)
    events = events or Events()
    started = time.monotonic()  # --time-budget counts from here: the baseline is part of the run
    clock = time.perf_counter()
    hw = hardware.detect(options.device)
    worker_slots = loop.slots(options.workers, hw)
    ref = WorkloadRef(model=options.model or DEFAULT_MODEL, data=options.data, cwd=os.getcwd())
    workload = build(ref)
    study_name = options.study or workload.name
    cache = StudyCache.of_study(options.cache_dir, study_name)
    with cache.lock():  # workers on this machine share the cache
        info = cache.prepare(workload, ref)
    setup = {"workload_and_data_s": time.perf_counter() - clock}

    rdb = storage.open_storage(options.storage, heartbeat_s=options.heartbeat)
    runner = TrialRunner(preload=preload_modules(workload, ref))

    def build_space(settings: Settings) -> space.Space:
        return space.of_workload(hw, workload, cache, settings)

    # One worker at a time creates (or checks) the study and trains its baseline: workers
    # starting together wait here, then find both done.
    with storage.lock(options.storage, f"study:{study_name}"):
        study, settings, constraints, search, warmed = open_study(rdb, study_name, options, hw, info,
                                                                  workload.batch_size, build_space)
        if warmed:
            events.warm_started([c.origin for c in warmed])
        spec = TrialSpec.template(workload, ref, cache, settings, hw.device, options.threads or hw.cores,
                                  options.trial_memory_mb)
        clock = time.perf_counter()
        with cache.lock():
            baseline = ensure_baseline(study, rdb, workload, replace(spec, per_layer=per_layer_modes(search)),
                                       runner, options.trial_timeout, events, worker_slots[0])
        setup["baseline_s"] = time.perf_counter() - clock
    spec = replace(spec, sensitivity=baseline.get("sensitivity"))
    result = RunResult(study_name=study_name, storage=options.storage, baseline=baseline,
                       completed=0, failed=0, setup_s=setup)
    if options.early_stop:
        spec = replace(spec, rungs=rungs.rung_steps(settings.trial_steps, settings.warmup_steps))
    trials = loop.Loop(study, rdb, search, runner, spec, options, events, result, constraints, began=started)
    began = time.perf_counter()
    try:
        loop.run_trials(trials, worker_slots)
    finally:
        result.loop_s = time.perf_counter() - began
        result.front = [t.number for t in record.StudyRecord.of(study).front(constraints).front]
    return result


def per_layer_modes(search: space.Space) -> tuple[str, ...]:
    """What the baseline measures the layers' sensitivity for: the quantization modes, one
    per family among those offered, where the space searches per-layer protection, and
    structured pruning's units where it searches their allocation."""
    protect = search.offers(knobs.row(quantization.PROTECT_KNOB))
    modes = sensitivity.families(search.quantization) if protect else ()
    if search.offers(knobs.row("prune_alloc")):
        modes += (sensitivity.STRUCTURED,)
    return modes


def preload_modules(workload: Workload, ref: WorkloadRef) -> list[str]:
    """The modules a trial process imports to unpickle the workload: preload them once."""
    names = {ref.model.partition(":")[0], type(workload.model).__module__}
    if ref.data:
        names.add(ref.data.partition(":")[0])
    return sorted(n for n in names if n and n != "__main__")
