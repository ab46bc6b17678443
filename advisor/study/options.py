"""What ``advisor run`` takes (``RunOptions``), its checks, and how a resumed study's stored
settings and constraints are reconciled with the ones a run asks for.

The CLI's flags and ``advisor.run()``'s keywords both fill one ``RunOptions``; every value is
refused here, with the flag's name, before anything is written.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import optuna

from advisor.constraints import LIMITS, Constraints
from advisor.errors import AdvisorError
from advisor.files import CACHE_DIR
from advisor.study import storage
from advisor.trial.spec import Settings, flag

SAMPLERS = ("tpe", "nsga2", "gp", "random")
SETTING_OPTIONS = ("trial_steps", "baseline_steps", "lr", "latency_batch", "latency_seconds",
                   "serving_rate", "serving_requests", "serving_deadline_ms")


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
    cache_dir: str = CACHE_DIR
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
    # The measurement seed (Settings.seed: data order and initialization of every trial;
    # ``seed`` above is the sampler's). Python API only: a benchmark's repeats vary it.
    trial_seed: int | None = None
    # Search policy (not stored with the study: each run may choose): stop trials at rungs
    # (study/rungs.py), or only measure each trial's points there and never stop ("observe":
    # what the search benchmark's table records); stop starting trials this many seconds
    # after the run started.
    early_stop: bool | str = True
    time_budget: float | None = None
    # A new study first tries the fronts of earlier studies of its workload on this kind of
    # machine in its storage (study/warm.py); not when the run enqueues knobs of its own.
    warm_start: bool = True
    # Knobs to try first, each a (partial) dict of knob values; the sampler fills the rest.
    enqueue: list[dict] = field(default_factory=list)
    # Constraints (advisor.constraints): None takes the study's stored value, or the default.
    max_accuracy_drop: float | None = None
    max_latency_ms: float | None = None
    max_memory_mb: float | None = None
    max_size_mb: float | None = None


def check(options: RunOptions) -> None:
    """Refuse a bad option with the flag's name, before anything is written."""
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
    if options.time_budget is not None and (isinstance(options.time_budget, bool)
                                            or not isinstance(options.time_budget, (int, float))
                                            or not options.time_budget > 0):
        raise AdvisorError(f"--time-budget must be a positive duration (90s, 20m, 1.5h); "
                           f"got {options.time_budget!r}")
    if not (isinstance(options.early_stop, bool) or options.early_stop == "observe"):
        raise AdvisorError(f"early_stop must be True, False or 'observe'; got {options.early_stop!r}")
    if not isinstance(options.warm_start, bool):
        raise AdvisorError(f"warm_start must be True or False; got {options.warm_start!r}")
    if options.threads is not None and options.threads < 1:
        raise AdvisorError(f"--threads must be a positive integer; got {options.threads!r}")
    storage.parse_url(options.storage)
    Settings(**_explicit_settings(options))
    Constraints(**_explicit_constraints(options))


def _explicit_constraints(options: RunOptions) -> dict:
    return {limit.key: getattr(options, limit.key) for limit in LIMITS
            if getattr(options, limit.key) is not None}


def _explicit_settings(options: RunOptions) -> dict:
    explicit = {k: getattr(options, k) for k in SETTING_OPTIONS if getattr(options, k) is not None}
    return explicit if options.trial_seed is None else {**explicit, "seed": options.trial_seed}


def resolve_constraints(options: RunOptions, stored: dict | None, study_name: str) -> Constraints:
    """A new study's constraints, or a resumed one's (refusing a run that asks for others)."""
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


def resolve_settings(options: RunOptions, stored: dict | None, batch_size: int,
                     study_name: str) -> Settings:
    """A new study's measurement settings, or a resumed one's (refusing other ones)."""
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
    return Settings(**{"latency_batch": batch_size, **explicit})


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
