"""Workers sharing one study: race-free creation, one baseline, and storage errors.

Real processes against a new SQLite file and a real PostgreSQL server (tests/postgres.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import FAST_ARGS, PLAIN, cli, plain_args

TESTS = Path(__file__).resolve().parent


def start_worker(workdir: Path, url: str, trials: int = 1, *extra: str,
                 model: str = "workloads:tensor_mlp", study: str = "shared") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "advisor", "run", "--model", model, "--study", study,
         "--storage", url, "--trials", str(trials), *FAST_ARGS, *(extra or plain_args(trials))],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its own process group: the test kills it with its trial


def run_together(workdir: Path, url: str, workers: int, trials: int, *extra: str) -> list[tuple[int, str, str]]:
    procs = [start_worker(workdir, url, trials, *extra) for _ in range(workers)]
    return [(p.wait(timeout=600), *p.communicate()) for p in procs]


def check_shared_study(url: str, outcomes, expected: int) -> list:
    for code, _, err in outcomes:
        assert code == 0, err[-2000:]
    storage = optuna.storages.RDBStorage(url)
    try:
        trials = optuna.load_study(study_name="shared", storage=storage).get_trials(deepcopy=False)
        names = optuna.get_all_study_names(storage)
    finally:
        storage.engine.dispose()  # close the pooled connections (psycopg warns otherwise)
    trials = [t for t in trials if t.state != TrialState.WAITING]  # knobs queued but not needed
    assert [t.state for t in trials].count(TrialState.COMPLETE) == expected == len(trials)
    # Unique, not necessarily contiguous: a --try queued by a late worker may be left waiting
    # (and keep its number) when an earlier worker asked while the queue was empty.
    numbers = [t.number for t in trials]
    assert len(set(numbers)) == len(numbers), "no duplicated trial numbers"
    trained = [err for _, _, err in outcomes if "training and measuring the baseline" in err]
    assert len(trained) == 1, "the baseline is trained once, by one worker"
    assert names == ["shared"], "the study was created once"
    return trials


@pytest.mark.slow
def test_four_processes_with_two_workers_each_on_a_new_sqlite_file(workdir):
    url = f"sqlite:///{workdir / 'new.db'}"
    outcomes = run_together(workdir, url, 4, 2, "--workers", "2", *plain_args(2))
    check_shared_study(url, outcomes, expected=8)


@pytest.mark.slow
def test_two_processes_with_two_workers_each_on_a_new_postgresql_database(workdir, postgres):
    url = postgres.create_database("advisor_two_workers")
    outcomes = run_together(workdir, url, 2, 3, "--workers", "2", *plain_args(3))
    trials = check_shared_study(url, outcomes, expected=6)
    # Each process ran its trials on two workers, each on its own core of this machine.
    cpus = {tuple(t.user_attrs["worker"]["cpus"]) for t in trials}
    assert len(cpus) == 2 and all(len(c) == 1 for c in cpus)


@pytest.mark.slow
def test_a_study_wide_budget_is_shared_by_every_worker(workdir):
    url = f"sqlite:///{workdir / 'budget.db'}"
    outcomes = run_together(workdir, url, 2, 10, "--workers", "2", "--study-trials", "5", *plain_args(3))
    check_shared_study(url, outcomes, expected=5)


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


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_and_retried_by_the_next_worker(workdir):
    url = f"sqlite:///{workdir / 'killed.db'}"
    (workdir / "hang.flag").write_text("")
    # Accumulation 2 (micro-batch 8) hangs while hang.flag exists; the baseline (16) does not.
    hanging = ",".join(f"{k}={v}" for k, v in {**PLAIN, "accumulation": 2}.items())
    first = start_worker(workdir, url, 1, "--heartbeat", "1", "--try", hanging,
                         model="workloads:hang_when_flagged", study="killed")
    storage = optuna.storages.RDBStorage(url)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            names = optuna.get_all_study_names(storage)
            study = optuna.load_study(study_name="killed", storage=storage) if names else None
            if study and study.get_trials(states=[TrialState.RUNNING]):
                break
            assert first.poll() is None, first.communicate()
            time.sleep(0.5)
        time.sleep(2)  # a heartbeat or two recorded while it hangs
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)  # reaps it and closes its pipes
        (workdir / "hang.flag").unlink()
        time.sleep(4)  # past the grace period (2 heartbeats; the storage keeps whole seconds)
        second = start_worker(workdir, url, 1, "--heartbeat", "1", "--sampler", "random",
                              model="workloads:hang_when_flagged", study="killed")
        code, (out, err) = second.wait(timeout=300), second.communicate()
        assert code == 0, err[-2000:]
        trials = optuna.load_study(study_name="killed", storage=storage).get_trials()
    finally:
        storage.engine.dispose()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params, "the retry runs the killed trial's knobs"
    assert "#0 fp32 accum=2" in out and "its worker stopped sending heartbeats (killed or lost); " \
        "retried as #1" in out
