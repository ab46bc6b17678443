"""The workload contract: loading ``module:function``, the input and output forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import advisor
from advisor import workload
from advisor.errors import AdvisorError
from advisor.trial import mapped as datamap
from advisor.trial.cache import check_consumable
from advisor.workload import WorkloadRef


def ref(model: str, data_ref: str | None = None) -> WorkloadRef:
    return WorkloadRef(model=model, data=data_ref, cwd=".")


@pytest.mark.parametrize("spec, message", [
    ("nosuch:build", "could not import module 'nosuch'"),
    ("workloads:missing", "module 'workloads' has no attribute 'missing'; it defines"),
    ("workloads", "must be MODULE:FUNCTION"),
    (":build", "must be MODULE:FUNCTION"),
    ("workloads:FEATURES", "is a int, not a function"),
])
def test_resolve_names_what_is_wrong(spec, message):
    with pytest.raises(AdvisorError, match=message):
        workload.resolve(spec)


def test_build_returns_a_checked_workload_with_a_name():
    built = workload.build(ref("workloads:tensor_mlp"))
    assert isinstance(built, advisor.Workload)
    assert built.name == "tensor-mlp"
    assert workload.build(ref("workloads:tuple_mlp")).name == "workloads-tuple_mlp"


def test_bare_module_takes_its_data_from_data_option():
    built = workload.build(ref("workloads:bare_mlp", "workloads:data"))
    assert isinstance(built.model, torch.nn.Module)
    assert len(built.train) == 96 and len(built.val) == 24


@pytest.mark.parametrize("model, data_ref, message", [
    ("workloads:bare_mlp", None, "returns a bare torch.nn.Module; name its data with --data"),
    ("workloads:raises", None, r"raised ValueError: cannot find the weights \(workloads.py:\d+\)"),
    ("workloads:returns_list", None, "must return an advisor.Workload or a torch.nn.Module; got list"),
    ("workloads:tensor_mlp", "workloads:data", "carries its own data; drop --data"),
    ("workloads:bare_mlp", "workloads:returns_list", "Workload.train must be a map-style dataset"),
    ("workloads:bare_mlp", "workloads:tensor_mlp", r"must return a \(train, val\) pair .*got Workload"),
    ("workloads:bare_mlp", "workloads:raises", "--data: workloads:raises raised ValueError"),
])
def test_build_errors(model, data_ref, message):
    with pytest.raises(AdvisorError, match=message):
        workload.build(ref(model, data_ref))


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "batch_size must be a positive integer; got 0"),
    ("metric", "f1", "metric must be 'accuracy' or callable"),
    ("train", [], "Workload.train is empty"),
    ("val", 3, "must be a map-style dataset"),
    ("model", "resnet", "must be a torch.nn.Module; got str"),
    ("keep", "head", r"Workload.keep must be a tuple of layer names \(strings\); got 'head'"),
])
def test_field_checks(field, value, message):
    built = workload.build(ref("workloads:tensor_mlp"))
    setattr(built, field, value)
    with pytest.raises(AdvisorError, match=message):
        workload.check_fields(built)


def mapped(built: advisor.Workload, tmp_path) -> dict[str, datamap.MappedSplit]:
    for split in ("train", "val"):
        datamap.materialize(getattr(built, split), tmp_path / split, split)
    return {s: datamap.MappedSplit(tmp_path / s) for s in ("train", "val")}


@pytest.mark.parametrize("name", ["tensor_mlp", "tuple_mlp", "dict_mlp", "dict_output_mlp"])
def test_every_input_and_output_form_trains_and_evaluates(name, tmp_path):
    from advisor.knobs import Knobs
    from advisor.trial import measure
    from advisor.trial.train import Trainer

    built = workload.build(ref(f"workloads:{name}"))
    splits = mapped(built, tmp_path)
    check_consumable(built, splits)
    trainer = Trainer(built.model, built.model, splits["train"], workload.loss_fn(built),
                      Knobs(accumulation=2, lr=1e-2), batch_size=16, steps=30,
                      device=torch.device("cpu"), seed=0)
    before = measure.evaluate(built.model, splits["val"], workload.accuracy, batch=16,
                              device=torch.device("cpu"), autocast=torch.autocast("cpu", enabled=False))
    for _ in range(30):
        trainer.step()
    after = measure.evaluate(built.model, splits["val"], workload.accuracy, batch=16,
                             device=torch.device("cpu"), autocast=torch.autocast("cpu", enabled=False))
    assert after > max(before, 0.8), f"{name}: accuracy {before:.2f} -> {after:.2f} after training"


def test_unconsumable_batch_reports_the_shapes(tmp_path):
    built = workload.build(ref("workloads:wrong_shapes"))
    with pytest.raises(AdvisorError, match=r"cannot consume a batch of Workload.train: inputs "
                                           r"Tensor\[2, 8\] -> RuntimeError: mat1 and mat2"):
        check_consumable(built, mapped(built, tmp_path))


def test_metric_returning_a_string_is_refused(tmp_path):
    built = workload.build(ref("workloads:string_metric"))
    with pytest.raises(AdvisorError, match=r"metric must return a number .*got str 'good'"):
        check_consumable(built, mapped(built, tmp_path))


def test_metric_value_accepts_numbers_in_any_wrapper():
    outputs, targets = torch.eye(3), torch.arange(3)
    assert workload.metric_value(lambda o, t: torch.tensor(0.5), outputs, targets) == 0.5
    assert workload.metric_value(lambda o, t: np.float32(0.25), outputs, targets) == 0.25
    assert workload.metric_value(workload.accuracy, outputs, targets) == 1.0
    with pytest.raises(AdvisorError, match="got Tensor\\[3\\]"):
        workload.metric_value(lambda o, t: torch.ones(3), outputs, targets)


def test_logits_of_reads_tensors_fields_and_keys():
    t = torch.ones(2, 3)
    assert workload.logits_of(t) is t
    assert workload.logits_of({"logits": t}) is t

    class Out:
        logits = t

    assert workload.logits_of(Out()) is t
    with pytest.raises(AdvisorError, match="must be a Tensor or have a 'logits' field"):
        workload.logits_of((t, t))
