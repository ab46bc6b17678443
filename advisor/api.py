"""The Python API: the same core as the CLI, one function per subcommand."""

from __future__ import annotations

from collections.abc import Callable

from advisor import report, storage
from advisor import study as _study
from advisor.errors import AdvisorError


def _ref(model: str | Callable | None) -> str | None:
    if model is None or isinstance(model, str):
        return model
    if callable(model) and "<locals>" not in getattr(model, "__qualname__", "<locals>"):
        return f"{model.__module__}:{model.__qualname__}"
    raise AdvisorError(
        f"model must be 'module:function' or a module-level function; got {model!r}")


def run(model: str | Callable | None = None, *, data: str | Callable | None = None,
        trials: int = 20, progress: bool = True, **options) -> _study.RunResult:
    """Run or resume a study, like ``advisor run``; keyword options mirror the CLI flags
    (``study``, ``storage``, ``sampler``, ``seed``, ``device``, ``trial_timeout``,
    ``trial_steps``, ``baseline_steps``, ``lr``, ``latency_batch``, ``latency_seconds``,
    ``threads``, ``cache_dir``)."""
    known = set(_study.RunOptions.__dataclass_fields__) - {"model", "data", "trials"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise AdvisorError(f"unknown options {unknown}; the known ones are {sorted(known)}")
    opts = _study.RunOptions(model=_ref(model), data=_ref(data), trials=trials, **options)
    shown = None if progress else report.Progress(trials, stream=_Null())
    return _study.run(opts, shown)


def show(study: str | None = None, storage_url: str = storage.DEFAULT_URL) -> str:
    """The baseline, the Pareto front and the failures of a stored study, as text."""
    return report.study_report(_study.load_study(study, storage_url))


class _Null:
    def write(self, _text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False
