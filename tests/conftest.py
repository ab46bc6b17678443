"""Shared fixtures: a scratch working directory, fast study settings, a CLI runner."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import pytest
import torch

from advisor.cli import main

# Study settings that keep a trial of a tiny model to about a second.
FAST = {"trial_steps": 4, "baseline_steps": 10, "latency_seconds": 0.05}
FAST_ARGS = ["--trial-steps", "4", "--baseline-steps", "10", "--latency-seconds", "0.05"]
# RandomSampler(seed=17) draws compile=none for the first two trials of the test MLPs' space,
# which keeps tests that are not about compilation free of it (only their speed depends on it).
EAGER = {"sampler": "random", "seed": 17}
EAGER_ARGS = ["--sampler", "random", "--seed", "17"]


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def cli(*argv: str) -> CliResult:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty directory, as a new user would: studies/ is created there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _threads():
    # Tests compare timings and memory in this process; keep intra-op threads as CI has them.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
