"""advisor: measures which PyTorch optimization techniques to use for your model.

The pipeline, in the order the data flows: ``workload`` (what the user gives) -> ``knobs``
(the table of what a trial can change; ``techniques/``, one module each) -> ``space`` (the
knobs' values this hardware can run) -> ``trial`` (the cache, then an isolated prune,
fine-tune, quantize and measurement) -> ``study`` (Optuna storage, baseline, the trial loop,
the study's record) -> ``recommend`` (constraints, goals) -> ``export`` (the versioned file)
-> ``apply`` (rebuild it); ``report``, ``dashboard`` and ``cli`` show it. The functions here
mirror the subcommands: ``run()`` is ``advisor run``, and so on.
"""

from __future__ import annotations

from advisor.api import apply, load_config, run, show, studies, training_setup
from advisor.errors import AdvisorError
from advisor.knobs import Knobs
from advisor.objectives import OBJECTIVES, Objective
from advisor.study import RunResult
from advisor.version import __version__
from advisor.workload import Workload

__all__ = [
    "OBJECTIVES",
    "AdvisorError",
    "Knobs",
    "Objective",
    "RunResult",
    "Workload",
    "__version__",
    "apply",
    "load_config",
    "run",
    "show",
    "studies",
    "training_setup",
]
