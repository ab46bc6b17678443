"""The Python API: the same core as the CLI, one function per subcommand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from advisor import apply as _apply
from advisor import export as _export
from advisor import recommend as _recommend
from advisor import report
from advisor.constraints import LIMITS, Constraints
from advisor.errors import AdvisorError
from advisor.files import CACHE_DIR
from advisor.study import Events, RunOptions, RunResult, StudyRecord, load, storage
from advisor.study import run as run_study


def _ref(model: str | Callable | None) -> str | None:
    if model is None or isinstance(model, str):
        return model
    if callable(model) and "<locals>" not in getattr(model, "__qualname__", "<locals>"):
        return f"{model.__module__}:{model.__qualname__}"
    raise AdvisorError(
        f"model must be 'module:function' or a module-level function; got {model!r}")


def run(model: str | Callable | None = None, *, data: str | Callable | None = None,
        trials: int = 20, progress: bool = True, **options) -> RunResult:
    """Run or resume a study, like ``advisor run``; keyword options mirror the CLI flags
    (``study``, ``storage``, ``sampler``, ``seed``, ``device``, ``trial_timeout``,
    ``trial_steps``, ``baseline_steps``, ``lr``, ``latency_batch``, ``latency_seconds``,
    ``serving_rate``, ``serving_requests``, ``serving_deadline_ms``, ``threads``, ``cache_dir``)."""
    known = set(RunOptions.__dataclass_fields__) - {"model", "data", "trials"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise AdvisorError(f"unknown options {unknown}; the known ones are {sorted(known)}")
    opts = RunOptions(model=_ref(model), data=_ref(data), trials=trials, **options)
    return run_study(opts, report.Progress(trials) if progress else Events())


def show(study: str | None = None, storage_url: str = storage.DEFAULT_URL, *,
         goal: str = "balanced", **constraints) -> str:
    """The baseline, the Pareto front, the recommendation and the failures of a stored
    study, as text; ``constraints`` (``max_latency_ms=...``) replace the study's own."""
    loaded = load(study, storage_url)
    return report.study_report(loaded, goal, _constraints(loaded, constraints))


def recommend(study: str | None = None, storage_url: str = storage.DEFAULT_URL, *,
              goal: str = "balanced", **constraints) -> _recommend.Recommendation:
    """The recommended trial of a stored study, with why, what it misses, and caveats."""
    loaded = load(study, storage_url)
    return _recommend.recommend(loaded, _constraints(loaded, constraints), goal)


def export(study: str | None = None, storage_url: str = storage.DEFAULT_URL, *,
           output: str = "recommended.yaml", goal: str = "balanced",
           **constraints) -> tuple[str, Path]:
    """Write the recommendation to ``output`` (YAML); returns its text report and the path."""
    loaded = load(study, storage_url)
    rec = _recommend.recommend(loaded, _constraints(loaded, constraints), goal)
    path = _export.write(_export.to_dict(rec, loaded, storage_url), output)
    return report.render_recommendation(rec, hint=False), path


def dashboard(study: str | None = None, storage_url: str = storage.DEFAULT_URL, *,
              output: str | Path | None = None, goal: str = "balanced") -> Path:
    """Write a study's HTML dashboard (default ``dashboards/<study>.html``); its path."""
    from advisor import dashboard as _dashboard

    return _dashboard.write(load(study, storage_url), output, goal)


def studies(storage_url: str = storage.DEFAULT_URL) -> str:
    """The studies in a storage, a line each with their trial counts, as text."""
    return report.studies_table(storage.open_storage(storage_url), storage_url)


def load_config(path: str | Path) -> _export.Config:
    """A recommendation file written by ``advisor export``, validated."""
    return _export.load_config(path)


def apply(config: _export.Config | str | Path, model: str | Callable | None = None, *,
          data: str | Callable | None = None, steps: int | None = None,
          output: str | Path | None = None, device: str = "auto", threads: int | None = None,
          cache_dir: str = CACHE_DIR) -> _apply.Applied:
    """Rebuild a recommendation on a workload, like ``advisor apply``; the returned
    ``Applied`` holds the optimized model (``.model``) and its re-measured figures."""
    if not isinstance(config, _export.Config):
        config = _export.load_config(config)
    return _apply.apply(config, _ref(model), _ref(data), steps=steps, output=output,
                        device=device, threads=threads, cache_dir=cache_dir)


def training_setup(config: _export.Config | str | Path, model, device_type: str | None = None):
    """The training-side knobs of a config for your own training loop (see
    ``advisor.apply.TrainingSetup``)."""
    if not isinstance(config, _export.Config):
        config = _export.load_config(config)
    return _apply.training_setup(config, model, device_type)


def _constraints(record: StudyRecord, given: dict) -> Constraints:
    known = {limit.key for limit in LIMITS}
    unknown = sorted(set(given) - known)
    if unknown:
        raise AdvisorError(f"unknown constraints {unknown}; the known ones are {sorted(known)}")
    return Constraints.from_dict({**record.constraints.to_dict(), **given})
