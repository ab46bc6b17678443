"""Bad input: one clear line on stderr, exit status 2, no traceback, nothing stored is lost."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest
import torch

from conftest import FAST_ARGS, cli, plain_args


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A storage holding one finished study, which no bad input may damage."""
    root = tmp_path_factory.mktemp("stored")
    url = f"sqlite:///{root / 'advisor.db'}"
    cache = str(root / "cache")
    result = cli("run", "--model", "workloads:tensor_mlp", "--trials", "1", "--storage", url,
                 "--cache-dir", cache, *FAST_ARGS, *plain_args())
    assert result.code == 0, result.err
    yield url, cache
    study = optuna.load_study(study_name="tensor-mlp", storage=url)
    assert len(study.trials) == 1 and "baseline" in study.user_attrs, "the stored study changed"


BAD_RUNS = [
    (["--model", "nosuch:build"], "--model: could not import module 'nosuch'"),
    (["--model", "workloads:missing"], "module 'workloads' has no attribute 'missing'; it defines"),
    (["--model", "workloads:raises"], "workloads:raises raised ValueError: cannot find the weights"),
    (["--model", "workloads:returns_list"], "must return an advisor.Workload or a torch.nn.Module; got list"),
    (["--model", "workloads:bare_mlp"], "returns a bare torch.nn.Module; name its data with --data"),
    (["--model", "workloads:wrong_shapes"],
     r"cannot consume a batch of Workload.train: inputs Tensor\[2, 8\] -> RuntimeError"),
    (["--model", "workloads:string_metric"], "metric must return a number"),
    (["--trials", "0"], "--trials must be a positive integer; got 0"),
    (["--trials", "many"], "argument --trials: invalid int value: 'many'"),
    (["--sampler", "cmaes"], "--sampler must be one of tpe, nsga2, gp, random; got 'cmaes'"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda; got 'tpu'"),
    (["--trial-steps", "2"], "--trial-steps must exceed the 2 warm-up steps"),
    (["--latency-batch", "0"], "--latency-batch must be > 0; got 0"),
    (["--model", "./mymodel.py:build"], "takes a module name, not a file path: use mymodel:build"),
    (["--try", "quantization"], "argument --try: expected KNOB=VALUE pairs separated by commas"),
    (["--model", "workloads:tensor_mlp", "--try", "quantization=float8"],
     r"quantization must be one of \['none', .*\] here; got 'float8' \(needs CUDA\)"),
    (["--model", "workloads:tensor_mlp", "--try", "prune_kind=structured,prune_ratio=2"],
     "prune_ratio must be between 0 and 0.8; got 2"),
    (["--model", "workloads:tensor_mlp", "--try", "quantization=qat-int8,checkpoint_every=1"],
     "qat-int8 fine-tunes a traced fp32 graph with fake quantization"),
    (["--max-size-mb", "-1"], "--max-size-mb must be > 0; got -1"),
    (["--trial-memory-mb", "0"], "--trial-memory-mb must be > 0 MiB; got 0"),
    (["--workers", "999"], "--workers 999 needs at least that many CPU cores; this machine gives"),
    (["--workers", "0"], "--workers must be a positive integer; got 0"),
    (["--study-trials", "0"], "--study-trials must be a positive integer; got 0"),
    (["--heartbeat", "0"], "--heartbeat must be a positive number of seconds; got 0"),
    (["--max-accuracy-drop", "lots"], "argument --max-accuracy-drop: invalid float value: 'lots'"),
    (["--model", "workloads:tensor_mlp", "--max-latency-ms", "5"],
     "study 'tensor-mlp' runs without --max-latency-ms; this run asks for 5. Drop --max-latency-ms"),
    (["--model", "workloads:tensor_mlp", "--trial-steps", "9"],
     "study 'tensor-mlp' was measured with --trial-steps 4; this run asks for 9"),
]


@pytest.mark.parametrize("args, message", BAD_RUNS, ids=[" ".join(a) for a, _ in BAD_RUNS])
def test_bad_run_input(args, message, stored):
    url, cache = stored
    result = cli("run", *args, "--storage", url, "--cache-dir", cache)
    assert result.code == 2
    assert_one_line(result.err, message)


@pytest.mark.parametrize("url, message", [
    ("not a url", "--storage must be a SQLAlchemy URL such as sqlite:///studies/advisor.db"),
    ("postgresql+nosuchdriver://ana:secret@localhost/db",
     "--storage postgresql\\+nosuchdriver://ana:\\*\\*\\*@localhost/db: the database driver"),
])
def test_bad_storage(url, message, workdir):
    result = cli("run", "--model", "workloads:tensor_mlp", "--storage", url)
    assert result.code == 2
    assert_one_line(result.err, message)
    assert "secret" not in result.err


@pytest.mark.parametrize("argv, message", [
    (["show", "--study", "nosuch"], "no study 'nosuch' in sqlite:///.*; it holds tensor-mlp"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_commands(argv, message, stored):
    url, _ = stored
    extra = ["--storage", url] if argv[0] == "show" else []
    result = cli(*argv, *extra)
    assert result.code == 2
    assert_one_line(result.err, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_asked_for_without_cuda(workdir):
    result = cli("run", "--device", "cuda")
    assert result.code == 2
    assert_one_line(result.err, "--device cuda was asked for but torch sees no CUDA device")


def test_show_prints_the_stored_study(stored):
    url, _ = stored
    result = cli("show", "--storage", url)
    assert result.code == 0
    assert "Pareto front: 1 of 1 trials that meet the constraints (accuracy drop <= 1 point), " \
           "of 1 completed (0 failed)" in result.out and "baseline" in result.out
    assert "Recommended (goal balanced): #0" in result.out
    # Other limits for this report only: nothing meets them, the nearest is shown.
    result = cli("show", "--storage", url, "--max-size-mb", "0.0001")
    assert "Pareto front: 0 of 0 trials that meet the constraints" in result.out
    assert "Nearest to the constraints (no trial meets them)" in result.out
    assert "exceeds --max-size-mb 0.0001" in result.out
    result = cli("studies", "--storage", url)
    assert result.code == 0 and "tensor-mlp" in result.out and "completed" in result.out


def test_the_installed_command_prints_one_line_without_traceback(workdir):
    proc = subprocess.run([sys.executable, "-m", "advisor", "run", "--model", "nosuch:build"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, "could not import module 'nosuch'")
    assert not (workdir / "studies").exists(), "a refused run writes nothing"


def assert_one_line(err: str, pattern: str) -> None:
    import re

    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("advisor: error: ")
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    assert "Traceback" not in err
