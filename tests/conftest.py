"""Shared fixtures: a scratch working directory, fast study settings, a CLI runner."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass

import pytest
import torch

from advisor.cli import main

# Study settings that keep a trial of a tiny model to about a second.
FAST = {"trial_steps": 4, "baseline_steps": 10, "latency_seconds": 0.05}
FAST_ARGS = ["--trial-steps", "4", "--baseline-steps", "10", "--latency-seconds", "0.05"]
# Knobs of a quick trial: no compilation, no compression (the sampler still draws lr). Tests
# that are not about the knobs enqueue it, so what they run does not depend on the sampler,
# nor on what this machine's space offers.
PLAIN = {"precision": "fp32", "accumulation": 1, "checkpoint_every": 0, "compile": "none",
         "prune_kind": "none", "quantization": "none", "distill_alpha": 0.0}


def plain(trials: int = 1) -> dict:
    """``advisor.run`` keywords whose first ``trials`` trials are PLAIN."""
    return {"sampler": "random", "seed": 0, "enqueue": [PLAIN] * trials}


def plain_args(trials: int = 1) -> list[str]:
    """The command-line form of :func:`plain`."""
    knobs = ",".join(f"{k}={v}" for k, v in PLAIN.items())
    return ["--sampler", "random", "--seed", "0"] + ["--try", knobs] * trials


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


def require(found, variable: str, what: str):
    """``found``, or skip the test, or fail it where ``.ci/run`` set ``variable``: there a
    missing tool is a broken CI machine, not a reason to skip."""
    if found is None:
        if os.environ.get(variable):
            pytest.fail(f"{variable} is set but this machine lacks {what}")
        pytest.skip(f"needs {what}")
    return found


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on loopback for this test session (see tests/postgres.py)."""
    from postgres import Server, bin_dir

    found = require(bin_dir(), "ADVISOR_REQUIRE_POSTGRES",
                    "PostgreSQL server binaries (initdb, pg_ctl); .ci/run has them")
    server = Server(found)
    yield server
    server.stop()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
