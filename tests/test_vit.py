"""The embedded vision transformer: its shapes, its search space, and a trial of it on CPU."""

from __future__ import annotations

import torch

from advisor import hardware, space
from advisor.examples import vit
from test_compression import assert_size_is_what_ships, prepared_trial, run_in_process, trial_inputs


def test_both_sizes_build_and_classify_digits():
    small, large = vit.build(), vit.build_gpu()
    assert 1e5 < sum(p.numel() for p in small.model.parameters()) < 1e6
    assert sum(p.numel() for p in large.model.parameters()) > 1e7
    x, _ = large.train[0]
    assert x.shape == (1, 32, 32) and len(large.model.blocks) == 8
    with torch.no_grad():
        assert small.model(torch.stack([small.val[i][0] for i in range(3)])).shape == (3, 10)


def test_its_blocks_and_linear_layers_shape_the_space():
    w = vit.build()
    s = space.build(hardware.detect("cpu"), w.model, w.batch_size, torch.stack([w.val[i][0] for i in range(8)]))
    assert s.blocks == "blocks: 4 blocks" and s.checkpoint_every == (0, 1, 2, 4)
    assert {"int8-dynamic", "int8-weight-only", "int8-static"} <= set(s.quantization)
    # Its attention splits heads with a reshape that Torch-Pruning's channel removal breaks:
    # the space says so instead of offering a kind that would fail every trial.
    reasons = {(e.knob, e.value): e.reason for e in s.excluded}
    assert reasons[("prune_kind", "structured")].startswith("structured pruning failed in Torch-Pruning")
    assert "unstructured" in s.prune_kind


def test_a_compressed_trial_of_the_transformer_runs_on_cpu(tmp_path, monkeypatch):
    spec = prepared_trial(tmp_path, "advisor.examples.vit:build",
                          {"checkpoint_every": 1, "quantization": "int8-dynamic", "distill_alpha": 0.5})
    result, deploy = run_in_process(spec)
    assert result["checkpointed_blocks"] == 4
    assert_size_is_what_ships(result, deploy, trial_inputs(spec), tmp_path)
    assert result["metrics"]["size_mib"] < 0.5 * 202186 * 4 / 2**20, "int8 linear weights"
