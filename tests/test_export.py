"""The exported file round-trips, refuses what it does not understand, and applies."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution

import advisor
from advisor import api, export, objectives, recommend, ship
from advisor.errors import AdvisorError
from advisor.knobs import Knobs
from advisor.report import render_applied
from advisor.techniques.layers import LayerPlan
from advisor.trial import pipeline
from conftest import FAST, cli
from test_recommend import BASELINE, result
from workloads import MLP

# Every knob away from its default, so a round trip that drops or retypes one fails.
ALL_KNOBS = {"precision": "bf16", "accumulation": 4, "checkpoint_every": 2,
             "compile": "max-autotune-no-cudagraphs", "lr": 3e-4, "prune_kind": "structured",
             "prune_ratio": 0.3, "quantization": "int8-static", "distill_alpha": 0.7,
             "distill_temperature": 2.5, "serving_max_batch": 16, "serving_max_wait_ms": 2.0,
             "quant_protect": 0.2}
PROTECTED = ["blocks.0.0", "head"]  # the trial's per-layer choice under quant_protect 0.2


def exported(tmp_path, knobs: dict = ALL_KNOBS) -> dict:
    study = optuna.create_study(directions=objectives.DIRECTIONS, study_name="s")
    study.set_user_attr("baseline", {"metrics": BASELINE, "knobs": {}, **result(BASELINE)})
    study.set_user_attr("constraints", recommend.Constraints(max_size_mb=8.0).to_dict())
    study.set_user_attr("hardware", {"device": "cpu", "name": "test cpu", "torch_version": "2.13"})
    metrics = {"accuracy": 0.895, "latency_ms": 3.0, "memory_mib": 30.0, "size_mib": 3.0}
    dists = {k: CategoricalDistribution([v]) if isinstance(v, str | int) and not isinstance(v, float)
             else FloatDistribution(v / 2, v * 2) for k, v in knobs.items()}
    study.add_trial(optuna.trial.create_trial(params=knobs, distributions=dists,
                                              values=objectives.values(metrics),
                                              user_attrs={"result": {**result(metrics),
                                                                     "layers": {"protected": PROTECTED}}}))
    rec = recommend.recommend(study, with_importance=False)
    return export.to_dict(rec, study, "sqlite:///studies/advisor.db")


def test_the_file_round_trips_every_knob(tmp_path):
    content = exported(tmp_path)
    path = export.write(content, tmp_path / "recommended.yaml")
    text = path.read_text()
    assert text.startswith("# advisor recommendation (schema 3): trial #0 of study 's'")
    config = export.load_config(path)
    assert config.knobs == Knobs(**ALL_KNOBS)
    assert config.constraints.max_size_mb == 8.0 and config.goal == "balanced" and config.feasible
    assert config.measured["size_mib"] == 3.0 and config.baseline == BASELINE
    assert config.provenance["device_name"] == "test cpu" and config.provenance["trial"] == 0
    assert config.provenance["advisor"] == advisor.__version__
    assert config.layers.protected == tuple(PROTECTED)
    # The trial's paired ratios travel with it; a schema-1 file (before them) still loads.
    pair = {"ratio": 0.45, "low": 0.43, "high": 0.47, "rounds": 40}
    config = export.load_config(export.write({**content, "paired": {"latency": pair}}, tmp_path / "p.yaml"))
    assert config.paired == {"latency": pair}
    old = {k: v for k, v in content.items() if k not in ("paired", "layers")} | {"advisor_config": 1}
    old["knobs"] = {k: v for k, v in old["knobs"].items() if k != "quant_protect"}
    config = export.load_config(export.write(old, tmp_path / "old.yaml"))
    assert config.paired == {} and not config.layers and config.knobs.quant_protect == 0


def _set(path: tuple, value):
    def mutate(content: dict) -> None:
        node = content
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return mutate


_DELETE = object()

MALFORMED = [
    (_set(("advisor_config",), 4), "has schema 4, newer than this advisor"),
    (_set(("advisor_config",), "one"), "advisor_config must be an integer schema version"),
    (_set(("knobz",), {}), "unknown key 'knobz'; the keys are advisor_config, goal"),
    (_set(("knobs", "pruning"), 0.5), r"knobs: unknown key 'pruning'; the keys are precision"),
    (_set(("knobs", "prune_ratio"), "high"), "knobs.prune_ratio must be a float; got 'high'"),
    (_set(("knobs", "accumulation"), 2.5), "knobs.accumulation must be a int; got 2.5"),
    (_set(("knobs", "quantization"), "int3"), "knobs: quantization must be one of 'none'"),
    (_set(("knobs", "lr"), _DELETE), "knobs: missing key 'lr'"),
    (_set(("measured", "accuracy"), "good"), "measured.accuracy must be a number; got 'good'"),
    (_set(("constraints", "max_latency_ms"), -3), "constraints: --max-latency-ms must be > 0"),
    (_set(("goal",), "cheapest"), "goal must be one of balanced"),
    (_set(("feasible",), "yes"), "feasible must be true or false"),
    (_set(("provenance", "gpu"), "h100"), "provenance: unknown key 'gpu'"),
    (_set(("paired",), {"latency": {"ratio": "fast", "low": 0.4, "high": 0.5}}),
     "paired.latency.ratio must be a positive number; got 'fast'"),
    (_set(("paired",), {"p50": {}}), "paired: unknown key 'p50'; the keys are latency"),
    (_set(("layers",), _DELETE), "knobs.quant_protect is 0.2 but the file has no layers section"),
    (_set(("layers", "protected"), "head"), "layers.protected must be a list of layer names; got 'head'"),
    (_set(("layers", "pruned"), {}), "layers: unknown key 'pruned'; the keys are protected, prune_ratios"),
    (_set(("layers", "prune_ratios"), {"blocks.0": "half"}), "layers.prune_ratios must map layer names to ratios"),
]


@pytest.mark.parametrize("mutate, message", MALFORMED,
                         ids=[m for _, m in MALFORMED])
def test_each_malformed_file_gets_its_error(mutate, message, tmp_path):
    content = copy.deepcopy(exported(tmp_path))
    mutate(content)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(AdvisorError, match=message) as info:
        export.load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text, message", [
    ("goal: balanced\nknobs: [1, 2", r"is not valid YAML \(line 2\)"),
    ("- a\n- b\n", "is not an advisor config"),
])
def test_files_that_are_not_configs(text, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(AdvisorError, match=message):
        export.load_config(path)
    with pytest.raises(AdvisorError, match="cannot read"):
        export.load_config(tmp_path / "missing.yaml")
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04\xfb\xff")
    with pytest.raises(AdvisorError, match="is not a text file"):
        export.load_config(tmp_path / "model.pt")
    with pytest.raises(AdvisorError, match=r"cannot write /proc/r\.yaml"):
        export.write(exported(tmp_path), "/proc/r.yaml")


def test_training_setup_gives_a_loop_the_training_knobs(tmp_path):
    path = export.write(exported(tmp_path, {**ALL_KNOBS, "compile": "none"}), tmp_path / "r.yaml")
    model = MLP()
    setup = advisor.training_setup(path, model)
    assert setup.accumulation_steps == 4 and setup.micro_batch(64) == 16
    assert setup.checkpointed_blocks >= 1 and setup.scaler is None and setup.lr == 3e-4
    with setup.autocast():
        out = setup.model.blocks[0](torch.randn(2, 8))
    assert out.dtype == torch.bfloat16


# -- end to end: run, export, apply -----------------------------------------------------------------

COMPRESSED = {"precision": "fp32", "accumulation": 1, "checkpoint_every": 0, "compile": "none",
              "prune_kind": "structured", "prune_ratio": 0.5, "prune_alloc": "sensitivity",
              "quantization": "int8-static", "quant_protect": 0.5, "distill_alpha": 0.5,
              "distill_temperature": 2.0}


def test_apply_reproduces_the_exported_trial(workdir, monkeypatch):
    # Four fine-tune steps lose accuracy; the test is about reproducing, not about the limit.
    run = advisor.run("workloads:tiny_cnn", trials=1, progress=False, sampler="random", seed=0,
                      enqueue=[COMPRESSED], max_accuracy_drop=50.0, **FAST)
    text, path = api.export(output="recommended.yaml")
    assert "Recommended (goal balanced): #0" in text
    refused = cli("apply", "recommended.yaml", "-o", "/proc/advisor/optimized.pt2")  # before any work
    assert refused.code == 2 and refused.err.startswith("advisor: error: cannot write /proc/advisor/optimized.pt2")
    roles = []
    measure_trial = pipeline.measure_trial
    monkeypatch.setattr(pipeline, "measure_trial",
                        lambda spec, phase: roles.append(spec.role) or measure_trial(spec, phase))
    applied = advisor.apply(path, output="optimized.pt2")
    # The baseline ran in a process of its own, as in a study: its memory window (which pins
    # glibc's mmap threshold for the rest of a process) never preceded the trial's timing here.
    assert roles == ["trial"] and applied.baseline["metrics"]["latency_ms"] > 0
    config = applied.config
    now, then = applied.result["metrics"], config.measured
    assert abs(now["accuracy"] - then["accuracy"]) <= 0.005, (now, then)
    assert now["size_mib"] == pytest.approx(then["size_mib"], rel=0.01)
    # The per-layer choice travelled in the file and was rebuilt as it was, with no sensitivity
    # table: each pruning unit's own ratio, and the same parameters left.
    trial = optuna.load_study(study_name=run.study_name, storage=run.storage).trials[0].user_attrs["result"]
    assert config.layers == LayerPlan.from_dict(trial["layers"]) and len(config.layers.prune_ratios) == 2
    assert applied.result["layers"] == trial["layers"]
    assert applied.result["compression"]["parameters_after"] == trial["compression"]["parameters_after"]
    # What ships is what the trial ran: its int8 program, with the recipe that compiles it as
    # the trial did (freezing, static shapes); its weights' bytes are the size objective.
    shipped = applied.shipped
    assert shipped.format == "compile" and shipped.path == Path("optimized.pt2") and shipped.path.exists()
    assert shipped.weights_bytes == applied.result["size_bytes"] == round(then["size_mib"] * 2**20)
    as_fp32 = sum(t.numel() * 4 for t in applied.model.state_dict().values())
    assert shipped.weights_bytes < as_fp32 / 2, (as_fp32, shipped.weights_bytes)  # int8 stays int8
    assert shipped.file_bytes > shipped.weights_bytes
    # A user's process loads it with the line apply prints (torch and torchao), at any batch size.
    code = (f"import sys, torch; {shipped.load}; "
            "print([tuple(model(torch.randn(b, 1, 8, 8)).shape) for b in (1, 8, 64)], 'advisor' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split("\n")[-2] == "[(1, 3), (8, 3), (64, 3)] False"
    # Without the per-call input checks .module() adds as pre-hooks (10-20% of this model's time).
    assert "torch.fx.GraphModule(m, m.graph)" in shipped.load
    assert not ship.load(shipped.path, shipped.format).compiled._orig_mod._forward_pre_hooks
    # Measured in a fresh process, it scores what this run's model scored.
    fresh = applied.shipped_measured
    assert fresh["accuracy"] == pytest.approx(now["accuracy"], abs=0.002)
    assert fresh["confirmation"] == pytest.approx(applied.result["confirmation"]["accuracy"], abs=0.002)
    paired = fresh["paired"]["latency"]
    assert paired["low"] <= paired["ratio"] <= paired["high"] and paired["rounds"] >= 20
    assert "The shipped file, loaded in a fresh process" in render_applied(applied)
    # The model removed channels for real and holds int8 weights.
    convs = [t for t in applied.model.state_dict().values() if t.dim() == 4]
    assert convs and all(t.dtype == torch.int8 for t in convs)


def test_cli_studies_export_and_apply_bad_input(workdir):
    result = cli("studies")
    assert result.code == 0 and "no studies in sqlite:///studies/advisor.db" in result.out
    result = cli("export")
    assert result.code == 2 and "--study is needed" in result.err
    result = cli("apply", "nosuch.yaml")
    assert result.code == 2 and "cannot read nosuch.yaml" in result.err
    result = cli("show", "--goal", "cheapest")
    assert result.code == 2 and "invalid choice: 'cheapest'" in result.err
