"""The study: storage, baseline, and the run that hands the trial loop to ``workers``.

``run(RunOptions)`` is the one core behind ``advisor run`` and ``advisor.run()``:

1. build and check the workload, materialize its data into the memory-mapped cache;
2. create or resume the Optuna study (directions from the objectives table) and record the
   workload, the measurement settings, the hardware and the search space with it;
3. measure the baseline once per study (training it first when ``trained=False``; its
   weights are stored in the study's database so a resumed run reuses them);
4. ask the sampler for knobs, run each trial in its own process, and tell the study the
   measured objectives, or a failure with its reason (``advisor.workers``, one thread per
   local worker).
"""

from __future__ import annotations

import io
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import torch

from advisor import __version__, data, hardware, objectives, space, storage, workers
from advisor.errors import AdvisorError
from advisor.recommend import LIMITS, Constraints
from advisor.report import Progress, short_result
from advisor.techniques import batching
from advisor.trial.runner import TrialRunner
from advisor.trial.spec import Settings, TrialSpec, flag
from advisor.trial.worker import BASELINE_FILE, WORKLOAD_FILE
from advisor.workload import (
    DEFAULT_MODEL,
    Workload,
    WorkloadRef,
    build,
    call_model,
    describe_exception,
    logits_of,
    loss_fn,
    metric_fn,
    metric_value,
)

SAMPLERS = ("tpe", "nsga2", "gp", "random")
SETTING_OPTIONS = ("trial_steps", "baseline_steps", "lr", "latency_batch", "latency_seconds",
                   "serving_rate", "serving_requests", "serving_deadline_ms")
FORMAT = 2  # 2: compression knobs in the space
PROBE_BATCH = 8  # inputs the space tries pruning and PT2E capture with


@dataclass
class RunOptions:
    """Everything ``advisor run`` takes; the CLI and ``advisor.run()`` both fill one."""

    model: str | None = None
    data: str | None = None
    trials: int = 20
    study: str | None = None
    storage: str = storage.DEFAULT_URL
    sampler: str = "tpe"
    seed: int | None = None
    device: str = "auto"
    trial_timeout: float = 600.0
    trial_memory_mb: float | None = None  # a trial allocating more fails as out of memory
    heartbeat: int = 10  # seconds between a running trial's heartbeats (see storage.open_storage)
    workers: int = 1  # trials run at once by this run, each on its own cores or GPU
    study_trials: int | None = None  # stop when the study holds this many trials (all workers)
    cache_dir: str = "studies/cache"
    threads: int | None = None
    # Measurement settings: None takes the study's stored value (or the default when new).
    trial_steps: int | None = None
    baseline_steps: int | None = None
    lr: float | None = None
    latency_batch: int | None = None
    latency_seconds: float | None = None
    serving_rate: float | None = None  # requests/s: measure p99 latency under this load
    serving_requests: int | None = None
    serving_deadline_ms: float | None = None
    # Knobs to try first, each a (partial) dict of knob values; the sampler fills the rest.
    enqueue: list[dict] = field(default_factory=list)
    # Constraints (recommend.Constraints): None takes the study's stored value, or the default.
    max_accuracy_drop: float | None = None
    max_latency_ms: float | None = None
    max_memory_mb: float | None = None
    max_size_mb: float | None = None


@dataclass
class RunResult:
    study_name: str
    storage: str
    baseline: dict
    completed: int
    failed: int
    front: list[int] = field(default_factory=list)
    interrupted: bool = False
    # Per trial, where the wall time went: sampler, trial process, storage writes.
    timings: list[dict] = field(default_factory=list)
    setup_s: dict = field(default_factory=dict)
    loop_s: float = 0.0  # wall time of the trial loop (all workers), after the baseline


def _check_options(options: RunOptions) -> None:
    if isinstance(options.trials, bool) or not isinstance(options.trials, int) or options.trials < 1:
        raise AdvisorError(f"--trials must be a positive integer; got {options.trials!r}")
    if options.sampler not in SAMPLERS:
        raise AdvisorError(
            f"--sampler must be one of {', '.join(SAMPLERS)}; got {options.sampler!r}")
    if not options.trial_timeout > 0:
        raise AdvisorError(f"--trial-timeout must be > 0 seconds; got {options.trial_timeout!r}")
    for name in ("workers", "study_trials"):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise AdvisorError(f"{flag(name)} must be a positive integer; got {value!r}")
    if isinstance(options.heartbeat, bool) or not isinstance(options.heartbeat, int) or options.heartbeat < 1:
        raise AdvisorError(f"--heartbeat must be a positive number of seconds; got {options.heartbeat!r}")
    if options.trial_memory_mb is not None and not options.trial_memory_mb > 0:
        raise AdvisorError(f"--trial-memory-mb must be > 0 MiB; got {options.trial_memory_mb!r}")
    if options.threads is not None and options.threads < 1:
        raise AdvisorError(f"--threads must be a positive integer; got {options.threads!r}")
    storage.parse_url(options.storage)
    Settings(**_explicit_settings(options))  # refuse bad values before anything is written
    Constraints(**_explicit_constraints(options))


def _explicit_constraints(options: RunOptions) -> dict:
    return {limit.key: getattr(options, limit.key) for limit in LIMITS
            if getattr(options, limit.key) is not None}


def _resolve_constraints(options: RunOptions, stored: dict | None, study_name: str) -> Constraints:
    explicit = _explicit_constraints(options)
    if stored is None:
        return Constraints(**explicit)
    for limit in LIMITS:
        if limit.key in explicit and stored.get(limit.key) != explicit[limit.key]:
            had = stored.get(limit.key)
            runs = f"runs with {limit.flag} {had:g}" if had is not None else f"runs without {limit.flag}"
            raise AdvisorError(
                f"study {study_name!r} {runs}; this run asks for {explicit[limit.key]:g}. Drop "
                f"{limit.flag} to resume it (advisor export "
                f"{limit.flag} {explicit[limit.key]} recommends under another limit without "
                f"new trials), or start a new study with --study NAME")
    return Constraints.from_dict(stored)


def _explicit_settings(options: RunOptions) -> dict:
    return {k: getattr(options, k) for k in SETTING_OPTIONS if getattr(options, k) is not None}


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            # group: conditional knobs (a ratio only with a pruning kind) are modelled jointly.
            return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if name == "gp":
            # The GP models the knobs every trial has; conditional ones (a pruning ratio, a
            # distillation temperature) it samples at random, by design, without a warning each.
            return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
        return optuna.samplers.RandomSampler(seed=seed)


def check_consumable(workload: Workload, splits: dict[str, data.MappedSplit]) -> None:
    """Run a batch of each split through the model, loss and metric, naming what breaks."""
    model = workload.model
    was_training = model.training
    model.eval()
    loss, metric = loss_fn(workload), metric_fn(workload)
    try:
        for name, split in splits.items():
            inputs, target = split.batch(np.arange(min(2, len(split))))
            with torch.no_grad():
                try:
                    output = call_model(model, inputs)
                except Exception as exc:
                    raise AdvisorError(
                        f"the model cannot consume a batch of Workload.{name}: inputs "
                        f"{data.shapes_of(inputs)} -> {describe_exception(exc)}") from None
                logits = logits_of(output)
                try:
                    value = loss(output, target)
                except Exception as exc:
                    raise AdvisorError(
                        f"the loss fails on a batch of Workload.{name} (outputs "
                        f"{data.shapes_of(logits)}, target {data.shapes_of(target)}): "
                        f"{describe_exception(exc)}") from None
                if not (isinstance(value, torch.Tensor) and value.numel() == 1):
                    raise AdvisorError(
                        f"Workload.loss must return a scalar Tensor; got "
                        f"{data.shapes_of(value) if isinstance(value, torch.Tensor) else type(value).__name__}")
                try:
                    metric_value(metric, logits.float(), target)
                except AdvisorError:
                    raise
                except Exception as exc:
                    raise AdvisorError(
                        f"Workload.metric fails on a batch of Workload.{name} (outputs "
                        f"{data.shapes_of(logits)}, target {data.shapes_of(target)}): "
                        f"{describe_exception(exc)}") from None
    finally:
        model.train(was_training)


def save_workload(workload: Workload, cache: Path) -> bool:
    """Pickle model, loss and metric for trial processes; False when they cannot be pickled
    (a lambda loss, say): trial processes then call the build function again."""
    path = cache / WORKLOAD_FILE
    buffer = io.BytesIO()
    try:
        torch.save({"model": workload.model, "loss": loss_fn(workload),
                    "metric": metric_fn(workload)}, buffer)
    except Exception:
        path.unlink(missing_ok=True)
        return False
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return True


def _resolve_settings(options: RunOptions, stored: dict | None, workload: Workload,
                      study_name: str) -> Settings:
    explicit = _explicit_settings(options)
    if stored:
        different = {k: v for k, v in explicit.items() if stored.get(k) != v}
        if different:
            name, value = next(iter(different.items()))
            option = flag(name)
            raise AdvisorError(
                f"study {study_name!r} was measured with {option} {stored.get(name)}; this run asks "
                f"for {value}. Drop {option} to resume it, or start a new study with --study NAME")
        return Settings.from_dict(stored)
    return Settings(**{"latency_batch": workload.batch_size, **explicit})


def prepare_cache(workload: Workload, ref: WorkloadRef, cache: Path) -> dict:
    """Materialize the data, check a batch end to end, pickle the workload for trials;
    returns what the study records about the workload."""
    fingerprints = {split: data.materialize(getattr(workload, split), cache / "data" / split, split)
                    for split in ("train", "val")}
    splits = {s: data.MappedSplit(cache / "data" / s) for s in ("train", "val")}
    check_consumable(workload, splits)
    lengths = sample_lengths(workload, cache)  # a bad mask is refused here, before any trial
    save_workload(workload, cache)
    return {
        "name": workload.name, "model": ref.model, "data": ref.data,
        "batch_size": workload.batch_size, "trained": workload.trained,
        "metric": workload.metric if isinstance(workload.metric, str) else "custom",
        "parameters": sum(p.numel() for p in workload.model.parameters()),
        "train_samples": len(splits["train"]), "fingerprints": fingerprints,
        **({"lengths": {"input": workload.lengths, "width": lengths.width,
                        "mean": float(lengths.tokens.mean()), "max": int(lengths.tokens.max())}}
           if lengths is not None else {}),
    }


def sample_lengths(workload: Workload, cache: Path) -> batching.Lengths | None:
    """A variable-length workload's training-sample lengths (None for the others)."""
    if workload.lengths is None:
        return None
    return batching.lengths_of(data.MappedSplit(cache / "data" / "train"), workload.lengths)


def probe_inputs(cache: Path):
    """A few validation inputs, to try pruning and PT2E capture on copies of the model."""
    val = data.MappedSplit(cache / "data" / "val")
    return val.batch(np.arange(min(len(val), PROBE_BATCH)))[0]


def _check_resume(study_name: str, attrs: dict, info: dict, hw: hardware.Hardware,
                  space_dict: dict) -> None:
    if attrs.get("advisor", {}).get("format") is None:
        raise AdvisorError(
            f"study {study_name!r} exists in this storage but was not made by advisor; "
            f"choose another name with --study NAME")
    old = attrs.get("workload", {})
    if old.get("fingerprints") != info["fingerprints"] or old.get("parameters") != info["parameters"]:
        raise AdvisorError(
            f"the workload of study {study_name!r} changed since it began (its data or model "
            f"differ from the stored ones); start a new study with --study NAME")
    old_device = attrs.get("hardware", {}).get("device")
    if old_device != hw.device:
        raise AdvisorError(
            f"study {study_name!r} was measured on {old_device} ({attrs['hardware'].get('name')}) "
            f"and this run would use {hw.device}; use --device {old_device} or a new --study NAME")
    if not space.same_search(attrs.get("space"), space_dict):
        raise AdvisorError(
            f"study {study_name!r} was searched over another space (other hardware or model); "
            f"start a new study with --study NAME")


def run(options: RunOptions, progress: Progress | None = None) -> RunResult:
    """Run (or resume) a study; see the module docstring for the steps."""
    _check_options(options)
    clock = time.perf_counter()
    hw = hardware.detect(options.device)
    worker_slots = workers.slots(options.workers, hw)
    ref = WorkloadRef(model=options.model or DEFAULT_MODEL, data=options.data, cwd=os.getcwd())
    workload = build(ref)
    study_name = options.study or workload.name
    cache_root = Path(options.cache_dir).resolve()
    cache = cache_root / _safe(study_name)
    with storage.local_lock(cache):  # workers on this machine share the cache
        info = prepare_cache(workload, ref, cache)
    setup = {"workload_and_data_s": time.perf_counter() - clock}

    rdb = storage.open_storage(options.storage, heartbeat_s=options.heartbeat)
    runner = TrialRunner(preload=_modules_of(workload, ref))
    env = (("TORCHINDUCTOR_CACHE_DIR", str(cache_root / "inductor")),
           ("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1"))
    threads = options.threads or hw.cores

    def spec(role: str, number: int, knobs: space.Knobs, train_baseline: bool = False,
             slot: workers.Slot | None = None) -> TrialSpec:
        # ``settings`` is the study's, bound by _open_study below before any spec is made.
        slot = slot or workers.Slot(0, 1)
        return TrialSpec(role=role, number=number, knobs=knobs.to_dict(), settings=settings,
                         cache_dir=str(cache), ref=ref, batch_size=workload.batch_size,
                         device=hw.device, threads=len(slot.cpus) or threads, env=env + slot.env,
                         train_baseline=train_baseline, keep=workload.keep, lengths=workload.lengths,
                         memory_limit_mb=options.trial_memory_mb, cpus=slot.cpus)

    # One worker at a time creates (or checks) the study and trains its baseline: workers
    # starting together wait here, then find both done.
    with storage.lock(options.storage, f"study:{study_name}"):
        study, settings, search = _open_study(rdb, study_name, options, workload, hw, info,
                                              probe_inputs(cache), sample_lengths(workload, cache))
        progress = progress or Progress(options.trials)
        clock = time.perf_counter()
        with storage.local_lock(cache):
            baseline = _ensure_baseline(study, rdb, workload, cache, spec, runner, options,
                                        progress, settings)
        setup["baseline_s"] = time.perf_counter() - clock
    constraints = Constraints.from_dict(study.user_attrs.get("constraints", {}))
    result = RunResult(study_name=study_name, storage=options.storage, baseline=baseline,
                       completed=0, failed=0, setup_s=setup)
    loop = workers.Loop(study, rdb, search, runner, spec, options, progress, result, constraints)
    began = time.perf_counter()
    try:
        workers.run_trials(loop, worker_slots)
    finally:
        result.loop_s = time.perf_counter() - began
        result.front = [t.number for t in study.best_trials]
    return result


def _open_study(rdb, study_name: str, options: RunOptions, workload: Workload,
                hw: hardware.Hardware, info: dict, example,
                lengths: batching.Lengths | None = None) -> tuple[optuna.Study, Settings, space.Space]:
    """Resume the study after checking it is the same experiment, or create it; only once
    every check passed, so a refused run leaves no empty study behind."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = objectives.DIRECTIONS
    sampler = make_sampler(options.sampler, options.seed)
    study = None
    if study_name in storage.study_names(rdb):
        study = optuna.load_study(study_name=study_name, storage=rdb, sampler=sampler)
        if [d.name.lower() for d in study.directions] != directions:
            raise AdvisorError(f"study {study_name!r} has other objectives than advisor's; "
                               f"choose another name with --study NAME")
    attrs = study.user_attrs if study else {}
    settings = _resolve_settings(options, attrs.get("settings"), workload, study_name)
    constraints = _resolve_constraints(options, attrs.get("constraints") if study else None, study_name)
    search = space.build(hw, workload.model, workload.batch_size, example, lr=settings.lr,
                         keep=workload.keep, serving=settings.serving_rate > 0, lengths=lengths)
    queued = [search.check_values(values) for values in options.enqueue]
    if study:
        _check_resume(study_name, attrs, info, hw, search.to_dict())
    else:
        study = optuna.create_study(storage=rdb, study_name=study_name, directions=directions,
                                    sampler=sampler, load_if_exists=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(objectives.NAMES))
        study.set_user_attr("advisor", {"version": __version__, "format": FORMAT})
        study.set_user_attr("workload", info)
        study.set_user_attr("settings", settings.to_dict())
        study.set_user_attr("constraints", constraints.to_dict())
        study.set_user_attr("hardware", hw.to_dict())
        study.set_user_attr("space", search.to_dict())
        study.set_user_attr("objectives", [{"name": o.name, "direction": o.direction,
                                            "unit": o.unit} for o in objectives.OBJECTIVES])
    for values in queued:
        study.enqueue_trial(values)
    return study, settings, search


def _ensure_baseline(study, rdb, workload, cache, spec, runner, options, progress,
                     settings) -> dict:
    """The study's baseline: its weights in the cache and its measured objectives."""
    weights = cache / BASELINE_FILE
    need_training = False
    if workload.trained:
        torch.save(workload.model.state_dict(), weights)
    else:
        blob = storage.get_blob(rdb, study.study_name, BASELINE_FILE)
        if blob is not None:
            weights.write_bytes(blob)
        else:
            weights.unlink(missing_ok=True)
            need_training = True
    baseline = study.user_attrs.get("baseline")
    if baseline is not None and not need_training:
        return baseline
    label = "training and measuring the baseline" if need_training else "measuring the baseline"
    progress.start(0, label)
    knobs = space.baseline(settings.lr, settings.serving_rate > 0)
    outcome = runner.run(spec("baseline", -1, knobs, need_training),
                         options.trial_timeout, on_tick=progress.tick)
    if not outcome.ok:
        raise AdvisorError(
            f"the baseline run failed, so no trial can be compared: {outcome.reason}"
            f" (log: {cache / 'logs' / 'baseline.log'})")
    if need_training:
        storage.put_blob(rdb, study.study_name, BASELINE_FILE, weights.read_bytes())
    baseline = {**outcome.result, "knobs": knobs.to_dict()}
    study.set_user_attr("baseline", baseline)
    progress.finish(f"baseline: {short_result(outcome.result)}")
    return baseline


def _modules_of(workload: Workload, ref: WorkloadRef) -> list[str]:
    """The modules a trial process imports to unpickle the workload: preload them once."""
    names = {ref.model.partition(":")[0], type(workload.model).__module__}
    if ref.data:
        names.add(ref.data.partition(":")[0])
    return sorted(n for n in names if n and n != "__main__")


def _safe(name: str) -> str:
    import hashlib
    import re

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".-")[:60] or "study"
    return safe if safe == name else f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def load_study(study_name: str | None, storage_url: str) -> optuna.Study:
    """An existing advisor study, or one line naming the ones the storage holds."""
    rdb = storage.open_storage(storage_url)
    names = storage.study_names(rdb)
    if study_name is None:
        if len(names) == 1:
            study_name = names[0]
        else:
            raise AdvisorError(
                f"--study is needed: the storage {storage.display(storage_url)} holds "
                f"{len(names)} studies ({', '.join(names) or 'none'})")
    if study_name not in names:
        raise AdvisorError(
            f"no study {study_name!r} in {storage.display(storage_url)}; it holds "
            f"{', '.join(names) or 'no studies'}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study_name, storage=rdb)

