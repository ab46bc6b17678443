"""What a benchmark may ask of this machine: the default workload's search space here, and
which of a recipe's configurations it offers (the others are reported with the space's reason,
never sent to a study that would refuse them)."""

from __future__ import annotations

from pathlib import Path

from advisor import hardware, space
from advisor.errors import AdvisorError
from advisor.trial.cache import StudyCache
from advisor.trial.spec import Settings
from advisor.workload import DEFAULT_MODEL, Workload, WorkloadRef, build


def workload_space(model: str | None, device: str, cache_dir: Path,
                   lr: float) -> tuple[hardware.Hardware, Workload, space.Space]:
    """The hardware, the workload ``model`` names (default: the embedded one) and its space."""
    hw = hardware.detect(device)
    ref = WorkloadRef(model=model or DEFAULT_MODEL, data=None, cwd=str(Path.cwd()))
    workload = build(ref)
    cache = StudyCache(cache_dir)
    cache.prepare(workload, ref)
    return hw, workload, space.of_workload(hw, workload, cache, Settings(lr=lr))


def split_offered(configs, search: space.Space) -> tuple[list[dict], list[tuple[dict, str]]]:
    """The configurations (partial knob values) ``search`` offers, and the others with why.

    ``max-autotune`` asks for its ``-no-cudagraphs`` variant where CUDA graphs are not offered.
    """
    runnable, left_out = [], []
    for config in configs:
        config = dict(config)
        if config.get("compile") == "max-autotune" and "max-autotune" not in search.compile:
            config["compile"] = "max-autotune-no-cudagraphs"
        try:
            search.check_values(config)
        except AdvisorError as exc:
            left_out.append((config, str(exc)))
            continue
        runnable.append(config)
    return runnable, left_out
