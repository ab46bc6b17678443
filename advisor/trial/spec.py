"""What a trial process is told: the study's measurement settings and one trial's spec."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from advisor.errors import AdvisorError
from advisor.knobs import Knobs
from advisor.techniques.layers import LayerPlan
from advisor.trial.cache import StudyCache
from advisor.workload import Workload, WorkloadRef


@dataclass(frozen=True)
class Settings:
    """Measurement settings fixed for a study, so its trials stay comparable.

    They are stored with the study; a resumed run that asks for different ones is refused.
    """

    trial_steps: int = 60  # optimizer steps of each trial's fine-tune
    baseline_steps: int = 300  # optimizer steps to train the baseline when trained=False
    lr: float = 1e-3  # AdamW peak learning rate of the baseline (trials search around it)
    warmup_steps: int = 2  # first fine-tune steps left out of throughput and memory
    latency_batch: int = 64  # the serving batch size the latency objective uses
    latency_seconds: float = 0.5  # timing budget of each latency measurement
    profile_steps: int = 3  # training steps and inference batches run under the profiler
    seed: int = 0  # data order and initialization of every trial
    # Serving (advisor/serving.py): requests/s of the simulated Poisson load, 0 = off; the
    # requests simulated per trial; the latency past which a served request counts as late.
    serving_rate: float = 0.0
    serving_requests: int = 2000
    serving_deadline_ms: float = 100.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = int if f.type in ("int", int) else float
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AdvisorError(f"{flag(f.name)} must be a number; got {value!r}")
            if kind is int and not isinstance(value, int):
                raise AdvisorError(f"{flag(f.name)} must be an integer; got {value!r}")
        if self.trial_steps <= self.warmup_steps:
            raise AdvisorError(
                f"--trial-steps must exceed the {self.warmup_steps} warm-up steps that "
                f"throughput leaves out; got {self.trial_steps}"
            )
        for name in ("baseline_steps", "profile_steps", "seed", "serving_rate"):
            if getattr(self, name) < 0:
                raise AdvisorError(f"{flag(name)} must be >= 0; got {getattr(self, name)}")
        for name in ("lr", "latency_seconds", "latency_batch", "serving_requests", "serving_deadline_ms"):
            if not getattr(self, name) > 0:
                raise AdvisorError(f"{flag(name)} must be > 0; got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Settings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def flag(name: str) -> str:
    """The command-line flag of a setting (the Python API's keyword is ``name`` itself)."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial process needs; it never touches the study's storage.

    A study (or ``advisor apply``) fills one template per run and derives each trial's
    spec from it with :meth:`baseline` and :meth:`trial`.
    """

    settings: Settings
    cache: StudyCache  # data maps, the pickled workload, the baseline weights, logs
    ref: WorkloadRef  # to rebuild the workload when it could not be pickled
    batch_size: int  # the workload's effective training batch
    device: str
    threads: int
    role: str = "trial"  # "baseline" or "trial"
    number: int = -1  # the Optuna trial number (-1 for the baseline)
    knobs: Knobs = field(default_factory=Knobs)
    env: tuple[tuple[str, str], ...] = ()  # environment of the trial (the compiler cache)
    train_baseline: bool = False  # role "baseline": train before measuring
    trained: bool = False  # Workload.trained: the baseline also evaluates the model as given
    spawned_at: float = 0.0  # wall clock when the parent started the process
    keep: tuple[str, ...] = ()  # layers pruning must leave whole (Workload.keep)
    memory_limit_mb: float | None = None  # --trial-memory-mb: see process.limit_memory
    cpus: tuple[int, ...] = ()  # with --workers: the cores this trial's process may run on
    lengths: str | int | None = None  # Workload.lengths: the input holding the attention mask
    rungs: tuple[int, ...] = ()  # fine-tune steps where the study may stop it (study/rungs.py)
    # Per-layer choices (techniques/layers.py): the baseline measures the sensitivity of the
    # layers of ``per_layer``'s quantization modes; trials choose from that ``sensitivity``
    # table, unless ``layers`` gives the choice itself (advisor apply).
    per_layer: tuple[str, ...] = ()
    sensitivity: dict | None = None
    layers: LayerPlan | None = None

    @classmethod
    def template(cls, workload: Workload, ref: WorkloadRef, cache: StudyCache, settings: Settings,
                 device: str, threads: int, memory_limit_mb: float | None = None) -> TrialSpec:
        env = (("TORCHINDUCTOR_CACHE_DIR", str(cache.compiler_dir)),
               ("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1"))
        return cls(settings=settings, cache=cache, ref=ref, batch_size=workload.batch_size,
                   device=device, threads=threads, env=env, keep=workload.keep,
                   lengths=workload.lengths, memory_limit_mb=memory_limit_mb, trained=workload.trained)

    def baseline(self, knobs: Knobs, train: bool, cpus: tuple[int, ...] = (),
                 env: tuple[tuple[str, str], ...] = ()) -> TrialSpec:
        """The baseline's run, on a slot of the trials' shape (``cpus``, ``env``: a worker's)."""
        return replace(self, role="baseline", number=-1, knobs=knobs, train_baseline=train, cpus=cpus,
                       threads=len(cpus) or self.threads, env=self.env + env)

    def trial(self, number: int, knobs: Knobs, cpus: tuple[int, ...] = (),
              env: tuple[tuple[str, str], ...] = ()) -> TrialSpec:
        """Trial ``number``; on a worker's own ``cpus`` (as many threads), with its ``env``."""
        return replace(self, role="trial", number=number, knobs=knobs, cpus=cpus,
                       threads=len(cpus) or self.threads, env=self.env + env)

    @property
    def log(self) -> Path:
        return self.cache.log(self.number)
