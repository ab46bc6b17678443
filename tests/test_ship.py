"""``advisor apply -o``'s file (``advisor/ship.py``): what it holds and how it loads."""

from __future__ import annotations

import torch
from torch import nn

from advisor import ship
from advisor.techniques.precision import PrecisionConfig
from advisor.trial.compress import Deployable


class Cached(nn.Module):
    """Keyword inputs and an output torch.export cannot flatten, as Hugging Face models return."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(50, 16), nn.Linear(16, 4)

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return {"logits": self.head(hidden.mean(1)), "cache": object()}


def _deployable(model: nn.Module, compile: str = "none", input_dtype=None) -> Deployable:
    return Deployable(module=model.eval(), run=model, autocast=True, info={"compile": compile},
                      input_dtype=input_dtype)


def test_an_eager_trial_ships_its_export_program_that_takes_any_batch(tmp_path):
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    shipped = ship.package(_deployable(model), torch.randn(4, 8), tmp_path / "m.pt2", autocast=PrecisionConfig())
    assert shipped.format == "export" and shipped.keys == ()
    assert "torch.export.load" in shipped.load and "torch.export program" in shipped.describe()
    # The weights as stored in the archive: the fp32 parameters' bytes.
    assert shipped.weights_bytes == sum(p.numel() * 4 for p in model.parameters())
    loaded = ship.load(shipped.path, shipped.format)
    x = torch.randn(11, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_keyword_inputs_and_an_unflattenable_output_ship_the_logits_by_position(tmp_path):
    model = Cached()
    batch = {"input_ids": torch.randint(0, 50, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    shipped = ship.package(_deployable(model), batch, tmp_path / "m.pt2", autocast=PrecisionConfig(),
                           variable_length=True)
    assert shipped.keys == ("input_ids", "attention_mask")
    assert "call it with (input_ids, attention_mask)" in shipped.describe()
    call = ship.Positional(ship.load(shipped.path, shipped.format), shipped.keys)
    other = {"input_ids": torch.randint(0, 50, (3, 12)), "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    with torch.no_grad():
        assert torch.allclose(call(**other), model(**other)["logits"], atol=1e-6)


def test_the_trial_inference_precision_is_inside_the_file(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    shipped = ship.package(_deployable(model), torch.randn(4, 8), tmp_path / "m.pt2",
                           autocast=PrecisionConfig("bf16"))
    with torch.no_grad():
        assert ship.load(shipped.path, shipped.format)(torch.randn(5, 8)).dtype == torch.bfloat16
    half = nn.Sequential(nn.Linear(8, 3)).to(torch.bfloat16)
    shipped = ship.package(_deployable(half, input_dtype=torch.bfloat16), torch.randn(4, 8),
                           tmp_path / "h.pt2", autocast=PrecisionConfig())
    assert shipped.weights_bytes == 2 * (8 * 3 + 3), "bf16 weights stay bf16"
    with torch.no_grad():  # fp32 inputs are cast to the weights' dtype inside the program
        assert ship.load(shipped.path, shipped.format)(torch.randn(2, 8)).dtype == torch.bfloat16


def test_an_unwritable_path_is_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    try:
        ship.package(_deployable(nn.Linear(2, 2)), torch.randn(2, 2), blocker / "m.pt2",
                     autocast=PrecisionConfig())
    except ship.AdvisorError as exc:
        assert str(exc).startswith(f"cannot write {blocker / 'm.pt2'}") and "choose another -o PATH" in str(exc)
    else:
        raise AssertionError("expected an AdvisorError")


def test_the_apply_report_says_when_the_shipped_file_is_not_what_the_run_measured():
    from types import SimpleNamespace

    from advisor.report import shipped_lines

    def pair(ratio):
        return {"ratio": ratio, "low": ratio * 0.95, "high": ratio * 1.05}

    here = {"paired": {"latency": pair(0.45), "latency_batch1": pair(0.8)}, "latency": {"median_ms": 1.0},
            "metrics": {"accuracy": 0.95}, "confirmation": {"accuracy": 0.94}}
    fresh = {"paired": {"latency": pair(0.46), "latency_batch1": pair(0.8)}, "latency": {"median_ms": 1.02},
             "accuracy": 0.95, "confirmation": 0.94}
    def applied(study: dict):
        config = SimpleNamespace(paired=study, provenance={"trial": 7})
        return SimpleNamespace(result=here, shipped_measured=fresh, config=config)

    text = "\n".join(shipped_lines(applied({})))  # a config exported before the paired ratios
    assert "0.45x [0.43-0.47]" in text and "0.46x [0.44-0.48]" in text and "note:" not in text
    fresh.update(paired={"latency": pair(0.7), "latency_batch1": pair(0.8)}, confirmation=0.90)
    notes = [line for line in shipped_lines(applied({})) if line.startswith("note:")]
    assert notes == ["note: the shipped file's latency ratio is outside this run's interval",
                     "note: the shipped file's accuracy (confirmation part) differs from this run's by "
                     "more than 0.2 points"]
    # With the study's trial's ratios, the file is held to those (the trial is what was chosen).
    lines = shipped_lines(applied({"latency": pair(0.72), "latency_batch1": pair(0.5)}))
    assert "study #7" in lines[1] and "0.72x [0.68-0.76]" in "\n".join(lines)
    assert next(line for line in lines if line.startswith("note:")) == \
        "note: the shipped file's batch-1 latency ratio is outside the study's interval"


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x) if x.sum() > 0 else -self.linear(x)  # torch.export cannot capture this


def test_a_model_export_refuses_is_saved_as_its_state_dict_with_the_knobs_and_why(tmp_path):
    model = DataDependent()
    shipped = ship.package(_deployable(model), torch.randn(3, 4), tmp_path / "m.pt2", autocast=PrecisionConfig(),
                           knobs={"quantization": "none"})
    assert shipped.format == "state_dict" and shipped.path == tmp_path / "m.pt"
    assert not (tmp_path / "m.pt2").exists()
    assert shipped.why_not.startswith("torch.export failed: ") and shipped.why_not in shipped.describe()
    saved = torch.load(shipped.path, weights_only=True)
    assert saved["knobs"] == {"quantization": "none"} and saved["why_not_exported"] == shipped.why_not
    assert torch.equal(saved["state_dict"]["linear.weight"], model.linear.weight)
