"""Whole studies: trials in their own processes, storage, resume, failures as data."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import threading

import optuna
import pytest
import torch
from optuna.trial import TrialState

import advisor
import workloads
from advisor import objectives
from advisor.study import storage
from conftest import FAST, FAST_ARGS, PLAIN, cli, plain, plain_args

KNOBS = {**PLAIN, "lr": 1e-3}
# A compressed trial of the default workload that needs no compiler.
COMPRESSED = "prune_kind=structured,prune_ratio=0.5,quantization=int8-dynamic,distill_alpha=0.5"


def load(name: str, url: str = storage.DEFAULT_URL) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def test_default_study_end_to_end(workdir):
    result = cli("run", "--trials", "2", *plain_args(1), "--try", COMPRESSED, *FAST_ARGS,
                 "--baseline-steps", "120")
    assert result.code == 0, result.err
    assert (workdir / "studies" / "advisor.db").exists()
    # The table: the baseline, the front with ratios, and what to run next.
    assert "Pareto front:" in result.out and "baseline" in result.out
    assert "x)" in result.out, "objectives are shown as ratios to the baseline"
    assert "timed interleaved with the baseline's model" in result.out
    assert "confirmed on the 180 validation samples no choice was made on" in result.out
    assert "advisor show --study digits-cnn" in result.out
    assert "Recommended (goal balanced)" in result.out or "Nearest to the constraints" in result.out
    assert "precision=fp16: cpu has no fast fp16 kernels" in result.out
    # Progress: one line per trial with its result.
    assert result.err.count("acc ") == 3, result.err  # baseline + 2 trials
    # A plain Optuna study, readable without advisor.
    study = load("digits-cnn")
    trials = study.get_trials(states=[TrialState.COMPLETE])
    assert len(trials) == 2
    assert study.metric_names == list(objectives.NAMES)
    assert [d.name.lower() for d in study.directions] == objectives.DIRECTIONS
    baseline = study.user_attrs["baseline"]
    assert baseline["metrics"]["accuracy"] > 0.8, "the baseline was trained"
    for t in trials:
        r = t.user_attrs["result"]
        # Optuna learns the latency on the baseline's clock: the paired ratio times its latency.
        told = [baseline["metrics"]["latency_ms"] * r["paired"]["latency"]["ratio"]
                if name == "latency_ms" else r["metrics"][name] for name in objectives.NAMES]
        assert t.values == pytest.approx(told)
        assert r["latency"]["p10_ms"] <= r["latency"]["median_ms"] <= r["latency"]["p90_ms"]
        assert r["train"]["throughput"] > 0 and r["latency_batch1"]["median_ms"] > 0
        assert r["train"]["optimizer_steps"] == FAST["trial_steps"]
        assert r["train"]["micro_batches"] == FAST["trial_steps"] * t.params["accumulation"]
        assert r["profile"]["train"] and r["profile"]["inference"]
        assert r["size_bytes"] == pytest.approx(r["metrics"]["size_mib"] * 2**20)
        assert r["confirmation"]["samples"] == [180, 180] and 0 <= r["confirmation"]["accuracy"] <= 1
        # Each latency ratio was timed against the baseline's model in the trial's process.
        for key in ("latency", "latency_batch1"):
            pair = r["paired"][key]
            assert pair["low"] <= pair["ratio"] <= pair["high"] and pair["rounds"] >= 20
            assert pair["ms"] > 0 and pair["reference_ms"] > 0
            assert t.user_attrs[f"{key}_ratio"] == {k: pair[k] for k in ("ratio", "low", "high")}
        # The default constraint went to Optuna with the trial: a drop in points, minus 1.
        drop = 100 * (study.user_attrs["baseline"]["metrics"]["accuracy"] - r["metrics"]["accuracy"])
        assert t.constraints == {"max_accuracy_drop": pytest.approx(drop - 1.0)}
    space = study.user_attrs["space"]
    assert "fp16" not in space["precision"] and space["blocks"] == "blocks: 3 blocks"
    # The compressed trial: channels removed, the head in int8, the baseline as teacher.
    compressed = trials[1].user_attrs["result"]
    assert trials[1].params["quantization"] == "int8-dynamic"
    assert compressed["compression"]["parameters_after"] < compressed["compression"]["parameters_before"] / 3
    assert compressed["size_bytes"] < baseline["size_bytes"] / 3


def test_resume_adds_trials_and_reuses_the_baseline(workdir):
    first = cli("run", "--model", "workloads:tensor_mlp", "--trials", "1", *FAST_ARGS, *plain_args())
    assert first.code == 0, first.err
    assert "training and measuring the baseline" in first.err
    baseline = load("tensor-mlp").user_attrs["baseline"]

    # Resume without restating the settings: they come from the study.
    second = cli("run", "--model", "workloads:tensor_mlp", "--trials", "2", *plain_args(2))
    assert second.code == 0, second.err
    assert "baseline" not in second.err, "the baseline is measured once per study"

    # Another machine: no local cache, the weights come from the study's database.
    shutil.rmtree(workdir / "studies" / "cache")
    third = cli("run", "--model", "workloads:tensor_mlp", "--trials", "1", *plain_args())
    assert third.code == 0, third.err
    assert "baseline" not in third.err, "the baseline is neither trained nor measured again"

    study = load("tensor-mlp")
    assert len(study.get_trials(states=[TrialState.COMPLETE])) == 4
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    rdb = storage.open_storage(storage.DEFAULT_URL)
    assert storage.get_blob(rdb, "tensor-mlp", "baseline.pt") is not None
    assert study.user_attrs["baseline"]["metrics"]["size_mib"] == baseline["metrics"]["size_mib"]


def test_a_study_goes_on_only_on_a_machine_of_the_kind_it_was_measured_on(workdir):
    first = cli("run", "--model", "workloads:tensor_mlp", "--trials", "1", *FAST_ARGS, *plain_args())
    assert first.code == 0, first.err
    study = load("tensor-mlp")
    machine = study.user_attrs["hardware"]
    assert machine["threads"] >= 1 and "torchao" in machine["libraries"]
    # Another kind of CPU shares the storage: its times would be ratioed to this one's.
    study.set_user_attr("hardware", {**machine, "name": "Another CPU", "cores": 64})
    refused = cli("run", "--model", "workloads:tensor_mlp", "--trials", "1", *plain_args())
    assert refused.code != 0 and "Traceback" not in refused.err
    line = refused.err.strip()
    assert "\n" not in line and "was measured on cpu Another CPU (64 cores" in line
    assert "name Another CPU vs " in line and "--study tensor-mlp-NAME" in line
    # Other threads per trial on the same machine are another kind too.
    study.set_user_attr("hardware", {**machine, "threads": machine["threads"] + 1})
    assert cli("run", "--model", "workloads:tensor_mlp", "--trials", "1", *plain_args()).code != 0
    assert len(load("tensor-mlp").trials) == 1, "nothing was added or lost"
    # A study stored before the fingerprint (no threads, no libraries) goes on where the rest agree.
    study.set_user_attr("hardware", {k: v for k, v in machine.items() if k not in ("threads", "libraries")})
    again = cli("run", "--model", "workloads:tensor_mlp", "--trials", "1", *plain_args())
    assert again.code == 0, again.err
    # A study an earlier advisor measured (format 2: size as torch.save's bytes) is refused for
    # new trials, and still shown.
    study.set_user_attr("advisor", {**study.user_attrs["advisor"], "format": 2})
    old = cli("run", "--model", "workloads:tensor_mlp", "--trials", "1", *plain_args())
    assert old.code != 0 and "\n" not in old.err.strip() and "Traceback" not in old.err
    assert "measured by an earlier advisor (study format 2" in old.err and "--study NAME" in old.err
    assert len(load("tensor-mlp").trials) == 2
    assert cli("show", "--study", "tensor-mlp").code == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two workers need two cores")
def test_with_two_workers_the_baseline_is_measured_on_a_slot_of_the_trials_shape(workdir):
    result = advisor.run("workloads:tensor_mlp", trials=2, workers=2, progress=False, **plain(),
                         storage=storage.DEFAULT_URL, **FAST)
    assert result.completed == 2
    study = load("tensor-mlp")
    share = len(os.sched_getaffinity(0)) // 2
    assert len(study.user_attrs["baseline"]["worker"]["cpus"]) == share
    assert [len(t.user_attrs["worker"]["cpus"]) for t in study.trials] == [share, share]


def test_more_workers_than_gpus_is_refused_before_anything_runs(monkeypatch):
    from advisor import hardware
    from advisor.errors import AdvisorError
    from advisor.study import loop

    gpu = dataclasses.replace(hardware.detect("cpu"), device="cuda", name="H100")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [dict(s.env)["CUDA_VISIBLE_DEVICES"] for s in loop.slots(2, gpu)] == ["0", "1"]
    with pytest.raises(AdvisorError, match=r"--workers 3 on CUDA needs a GPU per worker.*use --workers 2"):
        loop.slots(3, gpu)


def test_a_trained_model_with_other_weights_is_another_experiment(workdir, monkeypatch):
    run = ("run", "--model", "workloads:trained_mlp", "--trials", "1", *FAST_ARGS, *plain_args())
    first = cli(*run)
    assert first.code == 0
    # Its own accuracy, before the baseline's fine-tune, is reported beside the baseline's.
    baseline = load("trained-mlp").user_attrs["baseline"]
    given = baseline["as_given"]["accuracy"]
    model, val = workloads.trained_mlp().model.eval(), workloads.data()[1]  # computed here apart
    x, y = val.tensors
    with torch.no_grad():
        assert given == pytest.approx((model(x[::2]).argmax(1) == y[::2]).float().mean().item())
    assert f"Your trained model as given: accuracy {given:.4g}; the baseline below is it fine-tuned" in first.out
    monkeypatch.setenv("ADVISOR_TEST_CHECKPOINT", "1")  # same shapes, same parameter count
    refused = cli(*run)
    assert refused.code != 0 and "Traceback" not in refused.err
    assert "the trained model of study 'trained-mlp' has other weights than when it began" in refused.err
    monkeypatch.setenv("ADVISOR_TEST_CHECKPOINT", "0")
    assert cli(*run).code == 0, "the same checkpoint goes on"
    assert len(load("trained-mlp").trials) == 2


def test_raise_abort_and_hang_become_failed_trials_and_the_study_goes_on(workdir):
    options = {"storage": storage.DEFAULT_URL, **FAST}
    advisor.run("workloads:faulty", trials=1, progress=False, **plain(), **options)
    study = load("faulty")
    # FaultyMLP raises at micro-batch 8, aborts at 4, hangs at 2 (batch 16 / accumulation).
    for accumulation in (2, 4, 8, 1):
        study.enqueue_trial({**KNOBS, "accumulation": accumulation})
    result = advisor.run("workloads:faulty", trials=4, progress=False, trial_timeout=10, **options)
    assert result.completed >= 1 and result.failed >= 3

    trials = {t.params["accumulation"]: t for t in load("faulty").trials[1:]}
    reasons = {acc: t.user_attrs.get("failure", {}).get("reason", "") for acc, t in trials.items()}
    assert trials[1].state == TrialState.COMPLETE
    assert trials[2].state == TrialState.FAIL
    assert reasons[2].startswith("RuntimeError: injected fault at micro-batch 8 (workloads.py:")
    assert trials[4].state == TrialState.FAIL
    assert reasons[4] == "trial process aborted (SIGABRT) during train"
    assert trials[8].state == TrialState.FAIL
    assert reasons[8].startswith("timed out after 10 s (during train)")
    assert "raise RuntimeError(\"injected fault" in trials[2].user_attrs["failure"]["log_tail"]
    shown = advisor.show("faulty")
    assert "injected fault" in shown and "aborted (SIGABRT)" in shown


def test_nan_loss_and_a_memory_limit_become_failed_trials_with_their_reasons(workdir):
    options = {"storage": storage.DEFAULT_URL, **FAST}
    # UnstableMLP: NaN loss at micro-batch 8 (accumulation 2), 4 GiB at 4 (accumulation 4).
    enqueue = [{**KNOBS, "accumulation": a} for a in (2, 4, 1)]
    result = advisor.run("workloads:unstable", trials=3, progress=False, enqueue=enqueue,
                         trial_memory_mb=512, **options)
    assert result.completed == 1 and result.failed == 2
    trials = {t.params["accumulation"]: t for t in load("unstable").trials}
    reasons = {a: t.user_attrs.get("failure", {}).get("reason", "") for a, t in trials.items()}
    assert reasons[2] == "the training loss became nan (diverged)"
    assert reasons[4].startswith("out of memory (--trial-memory-mb 512): ")
    assert "can't allocate memory" in reasons[4]
    assert trials[1].state == TrialState.COMPLETE
    shown = advisor.show("unstable")
    assert "diverged" in shown and "out of memory (--trial-memory-mb 512)" in shown


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_marks_the_running_trial_and_keeps_the_study(signum, workdir):
    options = {"storage": storage.DEFAULT_URL, **FAST}
    advisor.run("workloads:faulty", trials=1, progress=False, **plain(), **options)
    study = load("faulty")
    study.enqueue_trial({**KNOBS, "accumulation": 8})  # hangs until interrupted
    # Ctrl-C raises KeyboardInterrupt, as in an interactive Python, even where this process was
    # started in the background, which leaves SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(4.0, lambda: os.kill(os.getpid(), signum))
    timer.start()
    try:
        result = advisor.run("workloads:faulty", trials=3, progress=False, **options)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert result.interrupted and result.completed == 0
    last = load("faulty").trials[-1]
    assert last.state == TrialState.FAIL
    assert last.user_attrs["failure"]["reason"] == "interrupted"
    assert len(load("faulty").trials) == 2, "nothing was lost and nothing added after Ctrl-C"


class _CallerTimeout(Exception):
    pass


def test_a_callers_own_exception_stops_the_running_trial_before_it_propagates(workdir):
    options = {"storage": storage.DEFAULT_URL, **FAST}
    advisor.run("workloads:faulty", trials=1, progress=False, **plain(), **options)
    load("faulty").enqueue_trial({**KNOBS, "accumulation": 8})  # hangs until stopped

    def expire(signum, frame):
        raise _CallerTimeout  # as pytest-timeout's signal method does

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(4)
    try:
        with pytest.raises(_CallerTimeout):
            advisor.run("workloads:faulty", trials=3, progress=False, **options)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not [t for t in threading.enumerate() if t.name.startswith("advisor-worker")]
    last = load("faulty").trials[-1]
    assert last.state == TrialState.FAIL and last.user_attrs["failure"]["reason"] == "interrupted"


@pytest.mark.parametrize("model, extra", [
    ("workloads:bare_mlp", ["--data", "workloads:data"]),
    ("workloads:dict_mlp", []),
    ("workloads:tuple_mlp", []),
    ("workloads:lambda_loss", []),  # unpicklable: trial processes call build() again
])
def test_other_workload_forms_run_as_studies(model, extra, workdir):
    result = cli("run", "--model", model, *extra, "--trials", "1", "--study", "s", *FAST_ARGS,
                 *plain_args())
    assert result.code == 0, result.err
    trial = load("s").trials[0]
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("failure")
    assert trial.values[0] > 0.5, "the trial measured a trained model's accuracy"
    pickled = (workdir / "studies" / "cache" / "s" / "workload.pt").exists()
    assert pickled == (model != "workloads:lambda_loss")
