"""Workers sharing one study: race-free creation, one baseline, and storage errors.

Real processes against a new SQLite file and a real PostgreSQL server (tests/postgres.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import FAST_ARGS, cli, plain_args

TESTS = Path(__file__).resolve().parent


def start_worker(workdir: Path, url: str, trials: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "advisor", "run", "--model", "workloads:tensor_mlp", "--study", "shared",
         "--storage", url, "--trials", str(trials), *FAST_ARGS, *plain_args(trials)],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_together(workdir: Path, url: str, workers: int, trials: int) -> list[tuple[int, str, str]]:
    procs = [start_worker(workdir, url, trials) for _ in range(workers)]
    return [(p.wait(timeout=600), *p.communicate()) for p in procs]


def check_shared_study(url: str, outcomes, expected: int) -> None:
    for code, _, err in outcomes:
        assert code == 0, err[-2000:]
    storage = optuna.storages.RDBStorage(url)
    try:
        trials = optuna.load_study(study_name="shared", storage=storage).get_trials(deepcopy=False)
        names = optuna.get_all_study_names(storage)
    finally:
        storage.engine.dispose()  # close the pooled connections (psycopg warns otherwise)
    assert [t.state for t in trials].count(TrialState.COMPLETE) == expected == len(trials)
    assert sorted(t.number for t in trials) == list(range(expected)), "no duplicated trial numbers"
    trained = [err for _, _, err in outcomes if "training and measuring the baseline" in err]
    assert len(trained) == 1, "the baseline is trained once, by one worker"
    assert names == ["shared"], "the study was created once"


@pytest.mark.slow
def test_four_workers_start_together_on_a_new_sqlite_file(workdir):
    url = f"sqlite:///{workdir / 'new.db'}"
    check_shared_study(url, run_together(workdir, url, workers=4, trials=1), expected=4)


@pytest.mark.slow
def test_two_workers_start_together_on_a_new_postgresql_database(workdir, postgres):
    url = postgres.create_database("advisor_two_workers")
    check_shared_study(url, run_together(workdir, url, workers=2, trials=2), expected=4)


def test_wrong_password_and_unreachable_server_get_one_line_without_the_password(workdir, postgres):
    wrong = postgres.url(password="not-the-password")
    result = cli("run", "--model", "workloads:tensor_mlp", "--storage", wrong)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "password authentication failed" in result.err
    assert "not-the-password" not in result.err and "advisor:***@127.0.0.1" in result.err
    closed = postgres.url().replace(f":{postgres.port}/", ":1/")
    result = cli("studies", "--storage", closed)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "cannot open the storage" in result.err and "s3cret" not in result.err
