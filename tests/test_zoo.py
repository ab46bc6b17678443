"""Real architectures (``advisor/examples/zoo.py``): attention-aware pruning, Conv1D and tied
weights, export-friendly capture, Hugging Face batch conventions, a quiet terminal, and every
offered option of every technique run as a real trial (``slow``)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils.data import default_collate

pytest.importorskip("transformers")

from advisor import adapt, hardware
from advisor.bench import zoo as zoo_bench
from advisor.errors import AdvisorError
from advisor.examples import zoo
from advisor.techniques import capture, heads, pruning, quantization
from advisor.techniques.pruning import PruningConfig
from advisor.techniques.quantization import QuantizationConfig
from advisor.trial.cache import StudyCache
from advisor.workload import (
    IGNORE,
    Accuracy,
    TokenLoss,
    Workload,
    WorkloadRef,
    build,
    call_model,
    logits_of,
)


def built(name: str) -> Workload:
    workload = build(WorkloadRef(model=f"advisor.examples.zoo:{name}", data=None, cwd="."))
    workload.model.eval()
    return workload


def batch(workload: Workload, n: int = 8):
    return default_collate([workload.train[i] for i in range(n)])


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return logits_of(call_model(model, inputs))


# -- attention-aware structured pruning ------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "llama"])
def test_structured_pruning_removes_whole_heads_and_keeps_the_output(name):
    w = built(name)
    inputs, _ = batch(w)
    expected = logits(w.model, inputs).shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = pruning.apply(w.model, PruningConfig("structured", 0.5), inputs)
    assert info["heads_after"] == info["heads_before"] // 2, info
    assert info["parameters_after"] <= 0.6 * info["parameters_before"], info
    assert logits(w.model, inputs).shape == expected
    for att in heads.find(w.model):
        assert not att.skipped
        if att.q is not None:  # grouped-query attention stays consistent: every query head has its group
            assert att.q.out_features == att.heads * att.head_dim
            assert att.k.out_features == att.kv_heads * att.head_dim
            groups = getattr(att.module, "num_key_value_groups", None)
            assert groups is None or groups * att.kv_heads == att.heads
    exported = torch.export.export(w.model, (), dict(inputs)).module()
    assert torch.allclose(logits(exported, inputs), logits(w.model, inputs), atol=1e-5)


def test_llama_keeps_key_value_groups_whole():
    w = built("llama")
    first = heads.find(w.model)[0]
    assert (first.heads, first.kv_heads) == (4, 2)
    inputs, _ = batch(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruning.apply(w.model, PruningConfig("structured", 0.5), inputs)
    after = heads.find(w.model)[0]
    assert (after.heads, after.kv_heads) == (2, 1)
    assert after.module.num_key_value_groups == 2


def test_t5_heads_tied_across_layers_are_kept_whole_with_the_reason():
    w = built("t5")
    inputs, _ = batch(w)
    expected = logits(w.model, inputs).shape
    info = pruning.apply(w.model, PruningConfig("structured", 0.5), inputs)
    assert info["heads_before"] == 0
    assert info["heads_kept_whole"] == ["its heads share a relative position bias across layers"]
    assert info["parameters_after"] < info["parameters_before"]  # the feed-forward channels went
    assert logits(w.model, inputs).shape == expected


# -- Conv1D and tied weights -------------------------------------------------------------------

def test_conv1d_becomes_an_equal_linear():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 64, (2, 16))
    before = model(input_ids=ids).logits
    assert adapt.linearize(model) == 4
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-6)
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-weight-only"])
def test_a_tied_head_is_not_quantized_apart_and_gpt2_shrinks(mode, tmp_path):
    w = built("gpt2")
    model = w.model
    before = _saved(model, tmp_path / "before.pt")
    quantized = quantization.quantize(model, QuantizationConfig(mode), batch(w)[0])
    assert quantized.lm_head.weight is quantized.transformer.wte.weight
    layers = quantization.linear_bytes(quantized)
    assert layers["transformer.h.0.mlp.c_fc"] > 0
    assert _saved(quantized, tmp_path / "after.pt") < before


def _saved(model, path) -> int:
    torch.save(model.state_dict(), path)
    return path.stat().st_size


def test_multihead_attention_keeps_its_output_projection_under_torchao():
    w = built("encoder")
    inputs, _ = batch(w)
    quantized = quantization.quantize(w.model, QuantizationConfig("int8-dynamic"), inputs)
    assert logits(quantized, inputs).shape == (8, 4)
    assert type(quantized.encoder.layers[0].linear1.weight) is not torch.nn.Parameter  # quantized
    assert type(quantized.encoder.layers[0].self_attn.out_proj.weight) is torch.nn.Parameter  # left whole


class ReadsItsWeight(torch.nn.Module):
    """Uses a Linear's weight outside the Linear's forward: torchao's tensors do not support it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(8, 8)

    def forward(self, x):
        return x @ self.inner.weight.t()


def test_a_torchao_mode_that_fails_on_the_model_is_left_out_with_the_reason():
    offered, excluded = quantization.options(hardware.detect("cpu"), ReadsItsWeight(), torch.randn(4, 8))
    assert "int8-dynamic" not in offered
    reason = next(e.reason for e in excluded if e.value == "int8-dynamic")
    assert reason.startswith("torchao's int8-dynamic fails on the model: NotImplementedError")


# -- export-friendly capture -------------------------------------------------------------------

def test_a_model_returning_a_cache_is_captured_through_its_logits():
    w = built("gpt2")
    w.model.config.use_cache = True  # the model now returns a DynamicCache beside its logits
    inputs, _ = batch(w)
    offered, excluded = quantization.options(hardware.detect("cpu"), w.model, inputs)
    assert "int8-static" in offered and "qat-int8" in offered, excluded
    graph = capture.export(w.model.eval(), inputs)
    assert torch.allclose(logits(graph, inputs), logits(w.model, inputs), atol=1e-5)


def test_qat_graph_takes_batches_trimmed_to_other_lengths():
    w = built("bert")
    inputs, _ = batch(w)
    prepared = quantization.prepare_qat(w.model, inputs, lengths=True)
    for width in (9, 23, 64):
        trimmed = {k: v[:, :width] for k, v in inputs.items()}
        assert logits(prepared, trimmed).shape == (8, 4)


class FixedLength(torch.nn.Module):
    """Reads exactly 16 positions: capturable at that length only."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(16 * 4, 2)

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids).reshape(input_ids.shape[0], 16 * 4))


def test_qat_is_left_out_of_a_variable_length_space_when_the_length_is_fixed_in_the_model():
    x = {"input_ids": torch.randint(0, 10, (4, 16)), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
    cpu = hardware.detect("cpu")
    offered, _ = quantization.options(cpu, FixedLength(), x)
    assert "qat-int8" in offered
    offered, excluded = quantization.options(cpu, FixedLength(), x, lengths=True)
    assert "qat-int8" not in offered and "int8-static" in offered
    reason = next(e.reason for e in excluded if e.value == "qat-int8")
    assert "dynamic sequence length" in reason


# -- Hugging Face batch conventions ------------------------------------------------------------

def test_one_dict_samples_are_split_on_labels_found_unnamed():
    w = built("bert")
    assert w.target == "labels"
    inputs, target = w.train[0]
    assert set(inputs) == {"input_ids", "attention_mask"} and target.dim() == 0


def test_a_target_key_that_is_not_there_is_one_clear_line():
    w = zoo.bert()
    w.target = "label"
    with pytest.raises(AdvisorError, match=r"Workload\.target is .label., but a sample"):
        adapt.workload(w)
    w = zoo.resnet()
    w.target = "labels"
    with pytest.raises(AdvisorError, match=r"drop Workload\.target"):
        adapt.workload(w)


def test_minus_100_carries_no_loss_and_no_accuracy():
    logits_ = torch.tensor([[[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]]])
    target = torch.tensor([[0, IGNORE, 1]])
    expected = torch.nn.functional.cross_entropy(logits_[0, [0, 2]], torch.tensor([0, 1]))
    assert TokenLoss()(logits_, target).item() == pytest.approx(expected.item())
    assert Accuracy()(logits_, target) == 0.5  # one right, one wrong, the -100 not counted
    assert Accuracy()(Accuracy.reduce(logits_), target) == 0.5


def test_next_token_scores_position_t_against_t_plus_1():
    tokens = torch.tensor([[1, 2, 3, IGNORE]])
    predicting_next = torch.nn.functional.one_hot(torch.tensor([[2, 3, 0, 0]]), 4).float() * 9
    assert Accuracy(shift=True)(predicting_next, tokens) == 1.0
    assert Accuracy(shift=False)(predicting_next, tokens) == 0.0
    assert TokenLoss(shift=True)(predicting_next, tokens).item() < 1e-3


def test_causal_language_models_are_detected():
    assert built("gpt2").next_token and built("llama").next_token
    assert not built("bert").next_token and not built("t5").next_token


def test_an_attention_mask_makes_dict_inputs_variable_length(tmp_path):
    w = built("encoder")
    assert w.lengths is None
    StudyCache(tmp_path).prepare(w, WorkloadRef("advisor.examples.zoo:encoder", None, "."))
    assert w.lengths == "attention_mask"


def test_a_left_padded_mask_leaves_the_workload_fixed_size(tmp_path):
    w = built("encoder")
    for split in (w.train, w.val):
        split.columns["attention_mask"] = split.columns["attention_mask"].flip(1)
    StudyCache(tmp_path).prepare(w, WorkloadRef("advisor.examples.zoo:encoder", None, "."))
    assert w.lengths is None


# -- a quiet terminal --------------------------------------------------------------------------

def test_library_load_messages_go_to_a_log_not_the_terminal(tmp_path):
    code = "import torchao.quantization"
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    if "Failed to load" not in loud.stderr and "_pytree" not in loud.stderr:
        pytest.skip("torchao logs nothing at import on this machine")
    log = tmp_path / "libraries.log"
    quiet = subprocess.run(
        [sys.executable, "-c", f"from advisor.logs import quiet_libraries; quiet_libraries({str(log)!r}); {code}"],
        capture_output=True, text=True, check=True)
    assert quiet.stderr == ""
    assert "torchao" in log.read_text() or "_pytree" in log.read_text()


# -- every offered option, as a real trial -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)  # T5: four torchao/PT2E trials of about 2 minutes each, mostly inductor
@pytest.mark.parametrize("name", zoo_bench.MODELS)
def test_every_offered_compression_option_runs_as_a_trial(name, tmp_path):
    report = zoo_bench.zoo([name], "cpu", study_dir=str(tmp_path), techniques=("prune_kind", "quantization"),
                           trial_steps=4, baseline_steps=20, latency_seconds=0.05)
    rows = report["models"][0]["rows"]
    failed = [(r["config"], r["reason"]) for r in rows if not r["ok"]]
    assert not failed, failed
    assert len(rows) > 5


class Attention(torch.nn.Module):
    """Attention with dropout passed as Hugging Face passes it: only when training."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(16, 48), torch.nn.Linear(16, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.5 if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2)).mean(1)


def test_a_qat_graph_in_eval_has_no_attention_dropout_and_its_int8_model_is_deterministic():
    x = torch.randn(4, 6, 16)
    prepared = quantization.prepare_qat(Attention(), x)

    def attention_dropout():
        return [n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0)
                for n in capture.graph_of(prepared).graph.nodes
                if n.target == torch.ops.aten.scaled_dot_product_attention.default]

    prepared.eval()
    assert attention_dropout() == [0.0]
    prepared.train()
    assert attention_dropout() == [0.5], "the fine-tune still trains with it"
    deployed = quantization.quantize(prepared, QuantizationConfig("qat-int8"), x)
    with torch.no_grad():
        assert torch.equal(deployed(x), deployed(x))


def test_a_qat_graph_switched_to_train_keeps_its_dropout_probability():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 3))
    prepared = quantization.prepare_qat(model, torch.randn(4, 8))
    for switch in (prepared.eval, prepared.train, prepared.eval):
        switch()
        dropouts = [n.args[1] for n in prepared.graph.nodes if n.target == torch.ops.aten.dropout.default]
        assert dropouts == [0.1]


def test_bert_ships_as_a_program_at_any_length_or_at_the_one_its_int8_graph_was_captured_at(tmp_path):
    from advisor import ship
    from advisor.knobs import Knobs
    from advisor.techniques.precision import PrecisionConfig
    from advisor.trial import compress
    from advisor.trial.compress import Deployable

    w = built("bert")
    inputs = batch(w)[0]
    shorter = {k: v[:3, :9] for k, v in inputs.items()}
    eager = Deployable(module=w.model, run=w.model, autocast=True, info={"compile": "none"})
    shipped = ship.package(eager, inputs, tmp_path / "bert.pt2", autocast=PrecisionConfig(), variable_length=True)
    assert shipped.format == "export" and shipped.length is None
    call = ship.Positional(ship.load(shipped.path, shipped.format), shipped.keys)
    assert torch.allclose(logits(call, shorter), logits(w.model, shorter), atol=1e-5)
    # The int8 model a token-budget trial deploys was captured at the data's padded length: it
    # ships at that length (and says so), not as a state dict.
    int8 = compress.deployable(w.model, Knobs(quantization="int8-static", max_tokens=256), inputs, [inputs])
    deploy = Deployable(module=int8.module, run=int8.module, autocast=False, info={"compile": "none"})
    shipped = ship.package(deploy, inputs, tmp_path / "int8.pt2", autocast=PrecisionConfig(), variable_length=True)
    length = inputs["input_ids"].shape[1]
    assert shipped.format == "export" and shipped.length == length, shipped.why_not
    assert f"padded to length {length}" in shipped.describe()
    call = ship.Positional(ship.load(shipped.path, shipped.format), shipped.keys)
    three = {k: v[:3] for k, v in inputs.items()}
    assert torch.allclose(logits(call, three), logits(int8.module, three), atol=1e-5)
