"""advisor: measures which PyTorch optimization techniques to use for your model.

The pipeline, one module each: ``workload`` (what the user gives) -> ``space`` (knobs this
hardware can run) -> ``trial`` (an isolated fine-tune and measurement) -> ``study``
(Optuna storage, baseline, the loop) -> ``report``. ``run()`` mirrors ``advisor run``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from advisor.api import run, show
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
    "run",
    "show",
]
