"""advisor: measures which PyTorch optimization techniques to use for your model.

The pipeline, one module each: ``workload`` (what the user gives) -> ``space`` (knobs this
hardware can run) -> ``trial`` (an isolated prune, fine-tune, quantize and measurement) ->
``study`` (Optuna storage, baseline, the loop) -> ``recommend`` (constraints, goals) ->
``export`` (the versioned file) -> ``rebuild`` (apply it) and ``report``. The functions
here mirror the subcommands: ``run()`` is ``advisor run``, and so on.
"""

from __future__ import annotations

__version__ = "0.1.0"

from advisor.api import apply, load_config, run, show, studies, training_setup
from advisor.errors import AdvisorError
from advisor.objectives import OBJECTIVES, Objective
from advisor.space import Knobs
from advisor.study import RunResult
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
