"""CUDA code paths: autocast and GradScaler, synchronized timing, CUDA graphs, a study.

Marked ``gpu``: skipped where torch sees no CUDA device (conftest), run by
``scripts/gpu-check.sh`` on a GPU machine (it runs every ``gpu``-marked test, such as the
CUDA case of the known-allocation test in test_measure.py).
"""

from __future__ import annotations

import pytest
import torch

import advisor
from advisor import hardware, space
from advisor.errors import AdvisorError
from advisor.knobs import Knobs
from advisor.study import storage
from advisor.trial import measure
from advisor.trial.measure import MemoryMeter
from advisor.trial.train import Trainer, fine_tune, training_memory
from advisor.workload import default_loss
from conftest import FAST, plain
from test_techniques import Recorder, split

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)


def cuda_trainer(model, train, *, dtype="fp32", mode="none", compiled=None, batch_size=64):
    model.to(CUDA)
    return Trainer(model, compiled if compiled is not None else model, train, default_loss,
                   Knobs(precision=dtype, compile=mode, lr=1e-2), batch_size=batch_size, steps=10,
                   device=CUDA, seed=0)


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_cuda_autocast_and_grad_scaler(dtype, expected, tmp_path):
    model = Recorder()
    t = cuda_trainer(model, split(tmp_path), dtype=dtype)
    before = model.fc1.weight.detach().clone()
    for _ in range(3):
        t.step()
    assert model.dtypes[0] == expected
    assert (t.scaler is not None) == (dtype == "fp16")
    assert not torch.equal(before, model.fc1.weight)


def test_cuda_space_offers_gpu_modes():
    hw = hardware.detect("cuda")
    s = space.build(hw, Recorder(), 64, torch.randn(4, 8, device=CUDA))
    assert "fp16" in s.precision and "reduce-overhead" in s.compile
    assert hw.capability is not None and hw.capability >= (7, 0)


@torch.no_grad()
def test_cuda_latency_is_synchronized():
    w = torch.randn(4096, 4096, device=CUDA)
    x = torch.randn(4096, 4096, device=CUDA)

    def once():
        return x @ w

    def twice():
        return (x @ w) @ w

    fast = measure.time_calls(once, CUDA, budget_s=0.2)
    slow = measure.time_calls(twice, CUDA, budget_s=0.2)
    # Without synchronization both would time the launch only (microseconds, ratio ~1).
    assert fast.median_ms > 0.05
    assert 1.7 < slow.median_ms / fast.median_ms < 2.3


def test_reduce_overhead_trains_under_cuda_graphs(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    model = Recorder().to(CUDA)
    compiled = torch.compile(model, mode="reduce-overhead")
    t = cuda_trainer(model, split(tmp_path), mode="reduce-overhead", compiled=compiled)
    assert t.cudagraphs
    before = model.fc1.weight.detach().clone()
    report = fine_tune(t, steps=6, warmup_steps=3, meter=MemoryMeter(CUDA))
    assert report.compile_s > 0 and report.throughput > 0
    assert not torch.equal(before, model.fc1.weight)
    memory = training_memory(t, MemoryMeter(CUDA))
    assert memory.graph_pool_mib > 0, "CUDA-graph pools are counted in the training memory"
    assert memory.transient_mib >= memory.graph_pool_mib


def test_reduce_overhead_with_accumulation_keeps_gradients(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    model = Recorder().to(CUDA)
    compiled = torch.compile(model, mode="reduce-overhead")
    t = Trainer(model, compiled, split(tmp_path), default_loss,
                Knobs(precision="bf16", accumulation=2, compile="reduce-overhead", lr=1e-2),
                batch_size=64, steps=10, device=CUDA, seed=0)
    for _ in range(5):
        t.step()
    t.take_loss(5)


def test_a_study_runs_on_cuda(workdir):
    result = advisor.run("workloads:tensor_mlp", trials=2, device="cuda", progress=False,
                         storage=storage.DEFAULT_URL, **plain(), **FAST)
    assert result.completed == 2, advisor.show("tensor-mlp")
    import optuna

    study = optuna.load_study(study_name="tensor-mlp", storage=storage.DEFAULT_URL)
    assert study.user_attrs["hardware"]["device"] == "cuda"
    for t in study.trials:
        r = t.user_attrs["result"]
        assert r["metrics"]["memory_mib"] > 0 and r["latency"]["median_ms"] > 0


@pytest.mark.parametrize("knobs", [{"quantization": "fp16"}, {"quantization": "int8-dynamic"},
                                   {"quantization": "int4-weight-only"}, {"quantization": "float8"},
                                   {"prune_kind": "2:4"},
                                   {"prune_kind": "structured", "prune_ratio": 0.5,
                                    "distill_alpha": 0.5, "distill_temperature": 2.0}],
                         ids=["fp16", "int8-dynamic", "int4", "float8", "2:4", "structured-kd"])
def test_cuda_compression_runs_end_to_end_and_reports_its_artifact(knobs, tmp_path, monkeypatch):
    from test_compression import assert_size_is_what_ships, prepared_trial, run_in_process, trial_inputs
    from workloads import WideMLP

    hw = hardware.detect("cuda")
    s = space.build(hw, WideMLP(), 32, torch.randn(4, WideMLP.FEATURES))
    try:
        s.check_values(knobs)
    except AdvisorError as exc:
        pytest.skip(f"not offered on this GPU: {exc}")
    spec = prepared_trial(tmp_path, "workloads:wide_mlp", knobs, device="cuda")
    result, deploy = run_in_process(spec)
    assert_size_is_what_ships(result, deploy, trial_inputs(spec), tmp_path)
    assert result["metrics"]["latency_ms"] > 0 and 0 <= result["metrics"]["accuracy"] <= 1


def test_cuda_trial_of_the_transformer_under_bf16_and_cuda_graphs(tmp_path, monkeypatch):
    from test_compression import assert_size_is_what_ships, prepared_trial, run_in_process, trial_inputs

    spec = prepared_trial(tmp_path, "advisor.examples.vit:build",
                          {"precision": "bf16", "compile": "reduce-overhead", "quantization": "int8-dynamic"},
                          device="cuda")
    result, deploy = run_in_process(spec)
    assert_size_is_what_ships(result, deploy, trial_inputs(spec), tmp_path)
    # Trained under CUDA graphs: their pools are training memory (inference's are not).
    assert result["memory"]["graph_pool_mib"] > 0 and result["latency"]["median_ms"] > 0
    assert result["memory"]["graph_pool_mib"] <= result["memory"]["transient_mib"]
