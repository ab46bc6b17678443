"""Per-layer choices: the sensitivity table finds planted layers, the plans spare them, and
the deployable model really keeps what the plan says."""

from __future__ import annotations

import copy

import pytest
import torch
from test_search_bench import FULL as BEFORE
from torch import nn

from advisor import knobs as table
from advisor.errors import AdvisorError
from advisor.knobs import Knobs
from advisor.techniques import layers, pruning, quantization
from advisor.techniques.layers import LayerPlan
from advisor.techniques.pruning import PruningConfig
from advisor.techniques.quantization import QuantizationConfig
from advisor.trial import compress, sensitivity
from advisor.workload import TokenLoss

FULL = BEFORE.narrowed(quant_protect=quantization.PROTECT_RANGE, prune_alloc=pruning.ALLOCS)


class Split:
    """A training split as the sensitivity measurement reads one: ``len`` and ``batch``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, idx):
        idx = torch.as_tensor(idx)
        return self.x[idx], self.y[idx]


class Three(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, hidden), nn.Linear(hidden, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def labelled(model: nn.Module, n: int = 256) -> Split:
    """Inputs with the model's own fp32 predictions as targets: any change of its outputs costs."""
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return Split(x, model(x).argmax(-1))


def quantization_planted() -> Three:
    """``fc2`` reads a feature that is always 0 through a weight of 100 in every row: per-channel
    int8 then rounds its other weights (about 0.1) to 0, and its output to its bias alone."""
    torch.manual_seed(0)
    model = Three().eval()
    with torch.no_grad():
        model.head.weight *= 50  # confident on its own predictions, as a trained model is
        model.fc1.weight[0] = 0.0
        model.fc1.bias[0] = -10.0
        model.fc2.weight[:, 0] = 100.0
    return model


def test_the_quantization_ranking_finds_the_planted_layer_and_protect_keeps_it():
    model = quantization_planted()
    table_ = sensitivity.measure(model, TokenLoss(), labelled(model), ["int8-static", "int8-dynamic"],
                                 torch.device("cpu"), batch=64)
    rows = {row["name"]: row for row in table_["layers"]}
    assert set(rows) == {"fc1", "fc2", "head"}
    for family in ("pt2e", "int8-dynamic"):
        rises = {name: row["quant"][family] for name, row in rows.items()}
        assert max(rises, key=rises.get) == "fc2", (family, rises)
        assert rises["fc2"] > 10 * max(rises["fc1"], rises["head"], 1e-6), (family, rises)
    assert rows["fc2"]["params"] == 32 * 8 + 8 and 0 < rows["fc2"]["time_share"] < 1
    # fc2 holds 264 of the 588 quantizable parameters: a 0.4 budget cannot keep it, 0.5 can.
    assert layers.protected_layers(table_, "pt2e", 0.4) == ()
    assert layers.protected_layers(table_, "pt2e", 0.5) == ("fc2",)
    plan = layers.plan(QuantizationConfig("qat-int8", 0.5), PruningConfig(), table_)
    assert plan == LayerPlan(protected=("fc2",))


@pytest.mark.parametrize("mode", ["int8-static", "int8-dynamic"])
def test_protected_layers_stay_unquantized_in_the_deployable_model(mode):
    model = quantization_planted()
    data = labelled(model)
    inputs = data.x[:64]
    knobs = Knobs(quantization=mode, quant_protect=0.5)
    loss = TokenLoss()

    def deployed(plan: LayerPlan):
        deploy = compress.deployable(copy.deepcopy(model), knobs, inputs, [inputs], plan)
        with torch.no_grad():
            return deploy, float(loss(deploy.module(inputs), data.y[:64]))

    kept, kept_loss = deployed(LayerPlan(protected=("fc2",)))
    _, whole_loss = deployed(LayerPlan())
    with torch.no_grad():
        fp32_loss = float(loss(model(inputs), data.y[:64]))
    assert kept.info["protected"] == ["fc2"]
    assert abs(kept_loss - fp32_loss) < 0.05 < whole_loss - fp32_loss, (fp32_loss, kept_loss, whole_loss)
    if mode == "int8-static":
        # The converted graph still reads fc2's fp32 weight; fc1's became an int8 constant.
        read = {n.target for n in kept.module.graph.nodes if n.op == "get_attr"}
        assert "fc2.weight" in read and "fc1.weight" not in read
        assert kept.module.get_parameter("fc2.weight").dtype == torch.float32
    else:
        assert type(kept.module.fc2.weight) is nn.Parameter
        assert type(kept.module.fc1.weight) is not nn.Parameter  # a torchao quantized tensor


class Encoder(nn.Module):
    """``nn.TransformerEncoderLayer``: its attention's ``out_proj`` is a Linear whose forward never
    runs (the attention op reads its weight), and PT2E's x86 quantizer leaves it in fp32."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack([x, x.flip(-1)], 1)  # two tokens of width 8
        return self.head(self.layer(tokens).mean(1))


def test_attention_projections_no_layer_forward_reaches_are_not_in_the_table():
    model = Encoder().eval()
    table_ = sensitivity.measure(model, TokenLoss(), labelled(model), ["int8-static", "int8-dynamic"],
                                 torch.device("cpu"), batch=64)
    measured = {row["name"]: set(row["quant"]) for row in table_["layers"]}
    assert measured == {name: {"pt2e", "int8-dynamic"} for name in ("layer.linear1", "layer.linear2", "head")}
    for mode in ("int8-static", "int8-dynamic"):
        assert "layer.self_attn.out_proj" not in quantization.layers(model, QuantizationConfig(mode))


class Spread(nn.Module):
    """Two prunable units: ``fc1``'s 32 channels all carry the signal; ``fc2`` has 4 live
    channels of 32 (the rest are zero, in and out, which L1 pruning removes first, at no cost)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        with torch.no_grad():
            self.fc2.weight[4:] = 0.0
            self.fc2.bias[4:] = 0.0
            self.head.weight *= 50
            self.head.weight[:, 4:] = 0.0  # nothing reads the dead channels either

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_pruning_allocation_spares_the_sensitive_unit_and_removes_what_uniform_removes():
    model = Spread()
    data = labelled(model)
    measured = sensitivity.measure(model, TokenLoss(), data, [sensitivity.STRUCTURED], torch.device("cpu"),
                                   batch=64)
    table_, floor = measured["pruning"], layers.ROUNDING * abs(measured["loss"])
    units = {unit["name"]: unit for unit in table_["units"]}
    assert set(units) == {"fc1", "fc2"}
    assert units["fc2"]["ratios"]["0.8"]["loss"] < 1e-4 < units["fc1"]["ratios"]["0.5"]["loss"]
    example = data.x[:8]
    for ratio in (0.3, 0.5):
        removes = lambda ratios: pruning.removed(model, example, (), ratios)  # noqa: E731
        ratios = dict(layers.allocate(table_, ratio, removes, floor=floor))
        assert ratios["fc2"] > ratios["fc1"], ratios
        uniform = table_["uniform"][f"{ratio:g}"]
        guided = removes(ratios)
        # The same parameter reduction as the global ratio: at least it, and within one 0.1
        # step of one unit (4 of 32 channels, at most 9 + 32 parameters each).
        assert uniform <= guided <= uniform + 4 * 41, (ratio, uniform, guided, ratios)
        pruned = copy.deepcopy(model)
        info = pruning.apply(pruned, PruningConfig("structured", ratio, "sensitivity"), example, ratios=ratios)
        assert info["parameters_before"] - info["parameters_after"] == guided
        assert pruned.fc1.out_features == round(32 * (1 - ratios["fc1"]))


def test_rounding_in_a_harmless_units_rises_does_not_prune_it_past_the_target():
    # A unit whose pruning does not matter measures rises of a few 1e-9 of either sign (how
    # they round differs between CPUs); read as differences, the lowest (here at 0.8) won and
    # the plan removed 962 parameters for a target of 680.
    noise = {"0.5": -1e-9, "0.6": 2e-9, "0.7": 1e-9, "0.8": -3e-9}
    free = {r: {"loss": rise, "removed": int(1110 * float(r))} for r, rise in noise.items()}
    table_ = {"units": [
        {"name": "free", "ratios": free},
        {"name": "costly", "ratios": {"0.5": {"loss": 0.3, "removed": 656}}}],
        "uniform": {"0.6": 680}}
    ratios = layers.allocate(table_, 0.6, lambda plan: sum(int(1110 * r) for n, r in plan.items() if n == "free")
                             + 656 * (plan["costly"] > 0), floor=layers.ROUNDING * 1.0)
    assert dict(ratios) == {"free": 0.7, "costly": 0.0}  # 777: the least of the free unit's ratios past 680


def test_a_plan_needs_the_study_table_and_a_file_names_real_layers():
    with pytest.raises(AdvisorError, match=r"quant_protect needs the study's per-layer sensitivity"):
        layers.plan(QuantizationConfig("int8-static", 0.2), PruningConfig(), None)
    with pytest.raises(AdvisorError, match=r"prune_alloc needs the study's per-layer sensitivity"):
        layers.plan(QuantizationConfig(), PruningConfig("structured", 0.5, "sensitivity"), {"layers": []})
    assert layers.plan(QuantizationConfig("int8-static"), PruningConfig("structured", 0.5), None) == layers.NO_PLAN
    plan = LayerPlan.from_dict({"protected": ["fc2"], "prune_ratios": {"fc1": 0.3}})
    assert LayerPlan.from_dict(plan.to_dict()) == plan
    plan.check(Three(), "the config")
    with pytest.raises(AdvisorError, match=r"layers names 'blocks\.0', which the model does not have"):
        LayerPlan(prune_ratios=(("blocks.0", 0.5),)).check(Three(), "the config")
    with pytest.raises(AdvisorError, match=r"layers\.prune_ratios must map layer names to ratios"):
        LayerPlan.from_dict({"prune_ratios": {"fc1": 1.5}})


def test_the_knobs_validate_and_a_tried_configuration_keeps_the_whole_model_default():
    with pytest.raises(ValueError, match="quant_protect keeps layers out of int8"):
        Knobs(quantization="bf16", quant_protect=0.2)
    with pytest.raises(ValueError, match=r"quant_protect must be a number from 0 to 0\.5"):
        Knobs(quantization="int8-static", quant_protect=0.9)
    with pytest.raises(ValueError, match="prune_alloc spreads a structured pruning ratio"):
        Knobs(prune_kind="unstructured", prune_ratio=0.5, prune_alloc="sensitivity")
    assert FULL.offers(table.row("quant_protect")) and FULL.offers(table.row("prune_alloc"))
    tried = FULL.check_values({"quantization": "int8-static", "prune_kind": "structured", "prune_ratio": 0.5})
    assert tried["quant_protect"] == 0.0 and tried["prune_alloc"] == "uniform"
    assert "quant_protect" not in FULL.check_values({"quantization": "none"})
    # A study stored before the per-layer knobs resumes over its own space, without them.
    old = BEFORE.to_dict()
    assert FULL.to_dict() != old
    resumed = FULL.as_stored(old)
    assert resumed.to_dict() == old and not resumed.offers(table.row("quant_protect"))


def test_the_layers_benchmark_judges_each_pair_by_its_median_drop():
    from types import SimpleNamespace

    from advisor.bench import layers as bench

    def result(accuracy: float, size: int) -> dict:
        return {"metrics": {"accuracy": accuracy}, "size_bytes": size,
                "confirmation": {"accuracy": accuracy, "samples": [100, 100]},
                "paired": {"latency": {"ratio": 0.5}}, "compression": {"parameters_after": size}}

    base = result(0.95, 1000)

    def seed(whole: float, guided: float) -> tuple:
        return (base, SimpleNamespace(result=result(whole, 500)), SimpleNamespace(result=result(guided, 490)))

    pair = ({"prune_kind": "structured", "prune_ratio": 0.7},
            {"prune_kind": "structured", "prune_ratio": 0.7, "prune_alloc": "sensitivity"})
    # Whole-model loses 3 points (median); guided 1 then 2: halved only in the first case.
    halved = bench._row(pair, [seed(0.92, 0.94), seed(0.92, 0.94), seed(0.90, 0.93)])
    assert halved["whole"]["drop_points"] == pytest.approx(3.0) and halved["applies"] and halved["met"]
    short = bench._row(pair, [seed(0.92, 0.93)] * 3)
    assert short["applies"] and short["met"] is False
    small = bench._row(pair, [seed(0.945, 0.90)] * 3)  # whole loses 0.5 point: the goal does not apply
    assert not small["applies"] and small["met"] is None
    failed = (base, SimpleNamespace(result=result(0.92, 500)),
              SimpleNamespace(result=None, failure={"reason": "boom"}, state="fail"))
    assert bench._row(pair, [failed])["guided"]["drop_points"] is None
    goal = bench._goal([halved, short, small])
    assert goal == {**goal, "judged": 2, "met": 1, "all_met": False}
    # The table says what the guided trial changed: a quantization pair that kept nothing
    # is the whole-model trial again, and reads so.
    spread = result(0.94, 490) | {"layers": {"protected": [], "prune_ratios": {"a": 0.3, "b": 0.9, "c": 0.6}}}
    guided = bench._row(pair, [(base, SimpleNamespace(result=result(0.92, 500)), SimpleNamespace(result=spread))])
    assert bench._choice(guided["guided"]) == "0.3-0.9 over 3 units"
    assert bench._choice(halved["guided"]) == "kept 0 layers"


def test_a_benchmark_repeat_varies_the_measurement_seed_not_only_the_sampler():
    from advisor.study.options import RunOptions, resolve_settings

    assert resolve_settings(RunOptions(seed=3), None, 64, "s").seed == 0  # the sampler's seed alone
    assert resolve_settings(RunOptions(seed=3, trial_seed=2), None, 64, "s").seed == 2
    with pytest.raises(AdvisorError, match="was measured with --seed 0"):
        resolve_settings(RunOptions(trial_seed=2), {"seed": 0}, 64, "s")


def test_the_layers_benchmark_pairs_int4_and_float8_where_cuda_offers_them_and_says_why_not_on_cpu():
    import dataclasses

    from advisor import space
    from advisor.bench import layers as bench
    from advisor.bench.offered import split_offered
    from test_space import CPU_NO_BF16

    configs = [c for pair in bench.PAIRS for c in pair]
    h100 = dataclasses.replace(CPU_NO_BF16, device="cuda", bf16=True, fp16_fast=True, capability=(9, 0))
    # Two Linear layers (so one can be protected), with in_features a multiple of 128 (int4's kernels).
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
    on_gpu, _ = split_offered(configs, space.build(h100, model, 16, torch.randn(4, 128)))
    on_cpu, left_out = split_offered(configs, space.build(CPU_NO_BF16, model, 16, torch.randn(4, 128)))
    for mode in ("int4-weight-only", "float8"):
        pair = [{"quantization": mode}, {"quantization": mode, "quant_protect": bench.PROTECT}]
        assert all(c in on_gpu for c in pair) and not any(c in on_cpu for c in pair)
        reasons = [why for c, why in left_out if c.get("quantization") == mode]
        assert len(reasons) == 2 and all("needs CUDA" in why for why in reasons)
    # PT2E int8 is the CPU's pair, and CUDA's table leaves it out.
    assert {"quantization": "int8-static"} in on_cpu and {"quantization": "int8-static"} not in on_gpu
