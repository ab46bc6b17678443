"""The study: an Optuna study of trials, stored through SQLAlchemy, and the run that fills it.

``driver.run`` is ``advisor run``: ``options`` (what it takes) -> ``open`` (create, or resume
after checking it is the same experiment; a new one first tries earlier studies' fronts,
``warm``) -> ``baseline`` (the reference, once per study) ->
``loop`` (workers ask, run a trial process, tell) -> ``record`` (the stored study, typed, for
whoever reads it). ``storage`` holds the database side: URLs, locks shared by every worker,
the baseline's weights.
"""

from advisor.study.driver import run
from advisor.study.loop import Events, RunResult
from advisor.study.open import load_study
from advisor.study.options import SAMPLERS, RunOptions
from advisor.study.record import Front, StudyRecord, TrialRecord


def load(study_name: str | None, storage_url: str) -> StudyRecord:
    """The record of a stored study (``--study`` may be omitted when the storage holds one)."""
    return StudyRecord.of(load_study(study_name, storage_url))


__all__ = ["SAMPLERS", "Events", "Front", "RunOptions", "RunResult", "StudyRecord", "TrialRecord", "load",
           "load_study", "run"]
