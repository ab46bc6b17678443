"""The search space is hardware- and model-aware and says what it left out."""

from __future__ import annotations

import dataclasses
import platform

import optuna
import pytest
import torch
from torch import nn

from advisor import hardware, knobs, space
from advisor.errors import AdvisorError
from advisor.space import Knobs
from advisor.trial.spec import Settings
from workloads import MLP


def build(hw, model, batch_size, **kw):
    return space.build(hw, model, batch_size, torch.randn(4, model.in_features
                                                         if isinstance(model, nn.Linear) else 8), **kw)


CPU_NO_BF16 = hardware.Hardware(device="cpu", name="old cpu", cores=2, bf16=False, fp16_fast=False,
                                compiler=True, compiler_note="", capability=None, torch_version="x")


def test_cpu_without_fast_half_precision_offers_fp32_only():
    s = build(CPU_NO_BF16, MLP(), 16)
    assert s.precision == ("fp32",)
    reasons = {(e.knob, e.value): e.reason for e in s.excluded}
    assert "no fast bf16 kernels" in reasons[("precision", "bf16")]
    assert "no fast fp16 kernels" in reasons[("precision", "fp16")]
    assert s.compile == ("none", "default", "max-autotune-no-cudagraphs")
    assert ("compile", "reduce-overhead") in reasons


def test_cuda_offers_cuda_graph_modes_and_both_half_precisions():
    gpu = dataclasses.replace(CPU_NO_BF16, device="cuda", bf16=True, fp16_fast=True, capability=(9, 0))
    s = build(gpu, MLP(), 64)
    assert s.precision == ("fp32", "bf16", "fp16")
    assert s.compile == ("none", "default", "reduce-overhead", "max-autotune")
    assert s.accumulation == (1, 2, 4, 8)


def test_no_compiler_means_no_compile_modes():
    bare = dataclasses.replace(CPU_NO_BF16, compiler=False, compiler_note="needs a C++ compiler")
    s = build(bare, MLP(), 16)
    assert s.compile == ("none",)
    assert all("C++ compiler" in e.reason for e in s.excluded if e.knob == "compile")


def test_model_without_blocks_gets_no_checkpointing():
    s = build(CPU_NO_BF16, nn.Linear(4, 2), 16)
    assert s.checkpoint_every == (0,)
    assert s.blocks == "none"


def test_this_machine_detects_consistently():
    hw = hardware.detect("cpu")
    assert hw.device == "cpu" and hw.cores >= 1
    assert build(hw, MLP(), 16).to_dict() == build(hw, MLP(), 16).to_dict()


def test_suggest_gives_knobs_inside_the_space():
    s = build(CPU_NO_BF16, MLP(), 16, lr=1e-3)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        knobs = s.suggest(study.ask())
        assert knobs.precision in s.precision and knobs.compile in s.compile
        assert knobs.accumulation in s.accumulation
        assert knobs.checkpoint_every in s.checkpoint_every
        assert 1e-4 <= knobs.lr <= 3e-3
        assert knobs.prune_kind in s.prune_kind and knobs.quantization in s.quantization
        assert (knobs.prune_ratio > 0) == (knobs.prune_kind in ("structured", "unstructured"))
        assert 0 <= knobs.prune_ratio <= 0.8 and 0 <= knobs.distill_alpha <= 1


def test_conditional_knobs_are_sampled_only_where_they_matter():
    s = build(dataclasses.replace(CPU_NO_BF16, bf16=True), MLP(), 16)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        knobs = s.suggest(trial)
        seen.add(knobs.quantization)
        assert ("prune_ratio" in trial.params) == (knobs.prune_kind in ("structured", "unstructured"))
        assert ("distill_temperature" in trial.params) == (knobs.distill_alpha > 0)
        if knobs.quantization == "qat-int8":
            assert "precision" not in trial.params and knobs.precision == "fp32"
            assert knobs.checkpoint_every == 0
        assert Knobs.from_dict(trial.params) == knobs, "params alone give the trial's knobs"
    assert "qat-int8" in seen


def test_knobs_round_trip_and_refuse_unknown_ones():
    k = Knobs(precision="bf16", accumulation=4, checkpoint_every=2, compile="default", lr=3e-4)
    assert Knobs.from_dict(k.to_dict()) == k
    with pytest.raises(ValueError, match=r"unknown knobs \['pruning'\]; the known ones are"):
        Knobs.from_dict({**k.to_dict(), "pruning": 0.5})
    with pytest.raises(ValueError, match="lr must be a positive float"):
        Knobs(lr=-1.0)


def test_knobs_to_try_are_checked_against_the_space():
    s = build(CPU_NO_BF16, MLP(), 16)
    assert s.check_values({"compile": "default", "accumulation": 2}) == {"compile": "default",
                                                                         "accumulation": 2}
    with pytest.raises(AdvisorError, match=r"precision must be one of \['fp32'\] here; got 'bf16' "
                                           r"\(cpu has no fast bf16 kernels\)"):
        s.check_values({"precision": "bf16"})
    with pytest.raises(AdvisorError, match="unknown knob 'prune'"):
        s.check_values({"prune": 0.5})
    with pytest.raises(AdvisorError, match=r"prune_ratio must be between 0 and 0\.8; got 0\.9"):
        s.check_values({"prune_kind": "structured", "prune_ratio": 0.9})
    with pytest.raises(AdvisorError, match=r"quantization must be one of .* got 'float8' \(needs CUDA\)"):
        s.check_values({"quantization": "float8"})
    with pytest.raises(AdvisorError, match=r"lr must be between 0\.0001 and 0\.003"):
        s.check_values({"lr": 1.0})


def test_an_integer_learning_rate_gives_a_baseline():
    # Settings take any number (advisor.run(lr=1)); the baseline's knobs once refused an int.
    settings = Settings(lr=1)
    base = knobs.baseline(settings.lr)
    assert base.lr == 1.0 and isinstance(base.lr, float)
    s = build(CPU_NO_BF16, MLP(), 16, lr=settings.lr)
    assert s.lr == (0.1, 3)


def test_cpu_fp16_is_offered_only_with_amx_fp16(monkeypatch):
    """oneDNN reports fp16 support on AVX512-FP16 alone, where a fp16 fine-tune step ran
    10-100x slower than fp32: the CPU must also have AMX-FP16."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: True)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512f", "avx512_fp16"}))
    assert not hardware.detect("cpu").fp16_fast
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_fp16", "amx_tile", "amx_fp16"}))
    assert hardware.detect("cpu").fp16_fast
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    assert not hardware.detect("cpu").fp16_fast
    monkeypatch.undo()
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        assert "sse2" in hardware.cpu_flags()  # this machine's, read for real (every x86-64 has SSE2)
