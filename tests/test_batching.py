"""Token-budget batching: the sampler, trimming, fairness, the knob in the space, a study."""

from __future__ import annotations

import json
import re

import numpy as np
import optuna
import pytest
import torch
import yaml
from test_export import ALL_KNOBS, exported

import advisor
from advisor import export, hardware, space
from advisor.errors import AdvisorError
from advisor.examples import digits, textcls
from advisor.knobs import Knobs
from advisor.techniques import batching
from advisor.techniques.batching import BatchingConfig, TokenBudgetSampler
from advisor.trial import mapped
from advisor.trial.cache import StudyCache
from advisor.trial.measure import MemoryMeter
from advisor.trial.train import Sampler, Trainer, training_memory
from advisor.workload import WorkloadRef, build, default_loss
from conftest import FAST, PLAIN, cli

TEXT = "advisor.examples.textcls:build"


def long_tailed(n: int = 203, seed: int = 0, longest: int = 128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(12 * np.exp(rng.standard_normal(n))), 1, longest).astype(np.int64)


# -- the sampler ------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_tokens", [128, 300, 2048])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_micro_batches_keep_the_budget_and_an_epoch_takes_every_sample_once(max_tokens, seed):
    tokens = long_tailed()  # 203 samples: the batch size 16 does not divide them
    sampler = TokenBudgetSampler(tokens, max_tokens, batch_size=16, seed=seed)
    orders = []
    for _ in range(3):
        steps = sampler.epoch()
        taken = np.concatenate([idx for step in steps for idx in step])
        assert sorted(taken.tolist()) == list(range(len(tokens))), "every sample exactly once"
        assert [sum(len(idx) for idx in step) for step in steps] == [16] * 12 + [11]
        for step in steps:
            for idx in step:
                # The padded size of a trimmed micro-batch: its longest sample times its count.
                assert len(idx) * tokens[idx].max() <= max_tokens
            longest = [int(tokens[idx].max()) for idx in step]
            assert longest == sorted(longest, reverse=True), "longest micro-batch first"
        orders.append(taken.tolist())
    assert orders[0] != orders[1] != orders[2], "each epoch is reshuffled"


def test_the_sampler_is_deterministic_per_seed():
    def steps(seed):
        sampler = TokenBudgetSampler(long_tailed(), 256, batch_size=16, seed=seed)
        return [[idx.tolist() for idx in sampler.next_step()] for _ in range(30)]

    assert steps(3) == steps(3)
    assert steps(3) != steps(4)


def test_steps_take_the_samples_fixed_batches_take():
    tokens = long_tailed(n=192)  # the batch size divides the data: the streams stay aligned
    budget, fixed = TokenBudgetSampler(tokens, 256, batch_size=16, seed=5), Sampler(192, seed=5)
    for _ in range(40):  # over three epochs
        assert sorted(np.concatenate(budget.next_step()).tolist()) == sorted(fixed.take(16).tolist())


def test_a_sample_longer_than_the_budget_is_refused():
    tokens = np.array([10, 20, 200, 30])
    with pytest.raises(ValueError, match="sample 2 has 200 tokens, more than max_tokens 128; "
                                         "raise max_tokens to at least 200"):
        TokenBudgetSampler(tokens, 128, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 0"):
        BatchingConfig(-1)


def test_lengths_come_from_a_right_padded_mask():
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    lengths = batching.lengths_from_mask(mask, chunk=3)
    assert lengths.tokens.tolist() == [3, 1, 1, 4] and lengths.width == 4, "no token counts as one"
    with pytest.raises(ValueError, match=r"padded on the right .* sample 1 has a token after padding"):
        batching.lengths_from_mask(np.array([[1, 1], [0, 1]]))
    with pytest.raises(ValueError, match=r"only 0 \(padding\) and 1 \(token\); got values \[0, 1, 2\]"):
        batching.lengths_from_mask(np.array([[1, 2, 0]]))
    with pytest.raises(ValueError, match=r"one row per sample \(\[width\] each\); got samples of shape \[2, 2\]"):
        batching.lengths_from_mask(np.ones((3, 2, 2)))


# -- trimming ---------------------------------------------------------------------------------------

def test_trim_cuts_the_padded_dimension_only():
    inputs = {"ids": torch.zeros(3, 8, dtype=torch.long), "embeds": torch.zeros(3, 8, 4),
              "extra": torch.zeros(3, 5), "scale": torch.zeros(3)}
    cut = batching.trim(inputs, 5, 8)
    assert {k: list(v.shape) for k, v in cut.items()} == {"ids": [3, 5], "embeds": [3, 5, 4],
                                                           "extra": [3, 5], "scale": [3]}
    assert [list(t.shape) for t in batching.trim((inputs["ids"], inputs["embeds"]), 2, 8)] == [[3, 2], [3, 2, 4]]
    whole = inputs["ids"]
    assert batching.trim(whole, 8, 8) is whole


def _padded_batch(n: int = 12, seed: int = 3):
    """``n`` sequences of the text workload shorter than half its width, padded to it."""
    ids, mask, _ = textcls.sequences(8 * n, seed)
    rows = torch.nonzero(mask.sum(1) < textcls.WIDTH // 2).flatten()[:n]
    return ids[rows], mask[rows], mask[rows].sum(1)


def test_trimming_changes_no_output_at_unpadded_positions():
    torch.manual_seed(0)
    model = textcls.TextClassifier().eval()
    ids, mask, lengths = _padded_batch()
    longest = int(lengths.max())
    assert longest < textcls.WIDTH // 2, "the batch has padding to trim"
    trimmed = batching.trim({"input_ids": ids, "attention_mask": mask}, longest, textcls.WIDTH)
    with torch.no_grad():
        full_tokens, cut_tokens = model.tokens(ids, mask), model.tokens(**trimmed)
        full_logits, cut_logits = model(ids, mask), model(**trimmed)
    # The tolerance allows float reassociation only (kernels that block a reduction
    # differently at another width: 5e-7 at most here); padding leaking into a token moves
    # it by ~0.6, as the unmasked control below shows.
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(cut_tokens[i, :n], full_tokens[i, :n], rtol=1e-5, atol=1e-5,
                                   msg=f"sample {i}: trimming changed a token's output")
    torch.testing.assert_close(cut_logits, full_logits, rtol=1e-5, atol=1e-5,
                               msg="trimming changed the logits")
    ones = torch.ones_like(mask)
    with torch.no_grad():
        leak = (model.tokens(ids, ones)[:, :longest] - model.tokens(ids[:, :longest], ones[:, :longest])).abs()
    assert leak.max() > 1e-2, "without the mask, padding does reach the outputs"


class ReadsPadding(textcls.TextClassifier):
    """Attends to and pools over every position, padding included."""

    def forward(self, input_ids, attention_mask):
        return super().forward(input_ids, torch.ones_like(attention_mask))


class FixedWidth(textcls.TextClassifier):
    """Flattens all 256 positions into its head: it cannot take a trimmed batch."""

    def __init__(self):
        super().__init__(width=8, depth=1)
        self.head = torch.nn.Linear(8 * textcls.WIDTH, textcls.GROUPS)

    def forward(self, input_ids, attention_mask):
        return self.head(self.tokens(input_ids, attention_mask).flatten(1))


@pytest.mark.parametrize("model, reason", [
    (ReadsPadding, r"trimming padding changes the model's outputs \(by up to .* on a probe batch\): it "
                   r"reads padded positions; mask them"),
    (FixedWidth, r"the model fails on inputs trimmed to their longest sample: RuntimeError: mat1 and mat2"),
])
def test_a_model_that_trimming_would_change_is_not_offered_budgets(model, reason, tmp_path):
    _, lengths = _text_split(tmp_path)
    ids, mask, _ = _padded_batch(n=4)
    example = {"input_ids": ids, "attention_mask": mask}
    torch.manual_seed(0)
    offered, excluded = batching.options(32, lengths, model(), example)
    assert offered == [0] and len(excluded) == 1
    assert re.match(reason, excluded[0].reason), excluded[0].reason
    torch.manual_seed(0)
    offered, excluded = batching.options(32, lengths, textcls.TextClassifier(), example)
    assert offered[0] == 0 and len(offered) > 1 and not excluded, "a masked model passes the probe"


def _text_split(tmp_path, n: int = 64):
    ds = textcls.Sequences(n, seed=0)
    mapped.materialize(ds, tmp_path / "train", "train")
    split = mapped.MappedSplit(tmp_path / "train")
    return split, batching.lengths_of(split, "attention_mask")


def _trainer(model, split, lengths, max_tokens, batch_size=16):
    return Trainer(model, model, split, default_loss, Knobs(lr=1e-3, max_tokens=max_tokens),
                   batch_size=batch_size, steps=10, device=torch.device("cpu"), seed=0, lengths=lengths)


def test_a_budget_step_has_the_fixed_steps_gradient_and_counts_its_samples(tmp_path):
    split, lengths = _text_split(tmp_path)
    grads, trainers = [], []
    for max_tokens in (0, 512):
        torch.manual_seed(0)
        model = textcls.TextClassifier(width=16, depth=1)
        t = _trainer(model, split, lengths, max_tokens)
        t.optimizer.register_step_pre_hook(
            lambda *a, m=model: grads.append([p.grad.clone() for p in m.parameters()]))
        for _ in range(3):
            t.step()
        trainers.append(t)
    fixed, budget = trainers
    assert budget.micro_batches > fixed.micro_batches == 3, "the budget split the steps"
    assert fixed.samples == budget.samples == 48 and fixed.tokens == budget.tokens
    assert budget.padded_tokens < fixed.padded_tokens == 48 * textcls.WIDTH
    for step in range(3):
        for g_fixed, g_budget in zip(grads[step], grads[3 + step], strict=True):
            torch.testing.assert_close(g_budget, g_fixed, rtol=1e-4, atol=1e-6,
                                       msg="a budget step must give the fixed batch's mean gradient")


def test_the_memory_window_of_a_budget_trial_holds_its_costliest_step(tmp_path):
    split, lengths = _text_split(tmp_path)
    t = _trainer(textcls.TextClassifier(width=16, depth=1), split, lengths, max_tokens=512)
    longest = int(lengths.tokens.max())
    (worst,) = t.budget.longest_step()
    assert len(worst) == min(16, 512 // longest)
    assert lengths.tokens[worst].min() >= np.sort(lengths.tokens)[-len(worst)], "the longest samples"
    shapes, batch = [], t.batch

    def recorded(idx):
        inputs, target = batch(idx)
        shapes.append(tuple(inputs["input_ids"].shape))
        return inputs, target

    t.batch = recorded
    training_memory(t, MemoryMeter(torch.device("cpu")))
    in_window = shapes[1:]  # the first step runs before the window opens
    assert (len(worst), longest) in in_window, (longest, in_window)


def test_a_budget_needs_lengths_and_no_accumulation(tmp_path):
    split, _ = _text_split(tmp_path)
    model = textcls.TextClassifier(width=16, depth=1)
    with pytest.raises(AdvisorError, match="max_tokens 512 needs per-sample lengths; name the attention-mask"):
        _trainer(model, split, None, 512)
    with pytest.raises(ValueError, match=r"max_tokens > 0 splits each step .* takes accumulation 1"):
        Knobs(max_tokens=512, accumulation=2)


# -- the knob in the search space -----------------------------------------------------------------

CPU = hardware.Hardware(device="cpu", name="test cpu", cores=2, bf16=False, fp16_fast=False,
                        compiler=True, compiler_note="", capability=None, torch_version="x")


@pytest.fixture(scope="module")
def text_space(tmp_path_factory):
    ref = WorkloadRef(model=TEXT, data=None, cwd=".")
    workload = build(ref)
    cache = tmp_path_factory.mktemp("text")
    cache = StudyCache(cache)
    info = cache.prepare(workload, ref)
    assert info["lengths"] == {"input": "attention_mask", "width": 256, "mean": pytest.approx(47.2, abs=0.1),
                               "max": 256}
    return space.build(CPU, workload.model, workload.batch_size, cache.probe_inputs(),
                       lengths=cache.lengths(workload.lengths))


def digits_space():
    train, _ = digits.datasets()
    return space.build(CPU, digits.DigitsCNN(), 64, train.tensors[0][:8])


def test_the_knob_is_offered_for_a_variable_length_workload_and_sampled_instead_of_accumulation(text_space):
    # Powers of two around 1/4 to 2x a step's real tokens (32 x 47 mean), at least the longest.
    assert text_space.max_tokens == (0, 512, 1024, 2048, 4096)
    assert text_space.to_dict()["max_tokens"] == [0, 512, 1024, 2048, 4096]
    assert not [e for e in text_space.excluded if e.knob == "max_tokens"]
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        knobs = text_space.suggest(trial)
        seen.add(knobs.max_tokens)
        assert ("accumulation" in trial.params) == (knobs.max_tokens == 0)
        assert knobs.accumulation == 1 or knobs.max_tokens == 0
        assert Knobs.from_dict(trial.params) == knobs, "params alone give the trial's knobs"
    assert seen == set(text_space.max_tokens)
    with pytest.raises(AdvisorError, match=r"max_tokens > 0 splits each step .* takes accumulation 1"):
        text_space.check_values({"max_tokens": 1024, "accumulation": 2})
    assert text_space.check_values({"max_tokens": 1024}) == {"max_tokens": 1024}


def test_a_fixed_length_workload_gets_the_exclusion_and_samples_as_before():
    s = digits_space()
    assert s.max_tokens == (0,) and "max_tokens" not in s.to_dict()
    reasons = {(e.knob, e.value): e.reason for e in s.excluded}
    assert reasons[("max_tokens", "any")].startswith("the workload declares no per-sample lengths")
    with pytest.raises(AdvisorError, match=r"max_tokens must be one of \[0\] here; got 1024 \(the workload "
                                           r"declares no per-sample lengths"):
        s.check_values({"max_tokens": 1024})
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        s.suggest(trial)
        assert "max_tokens" not in trial.params, "the sampler is never asked"
    # A study recorded before the knob existed (no max_tokens exclusion) resumes; another
    # space does not.
    now = s.to_dict()
    before = {**now, "excluded": [e for e in now["excluded"] if e["knob"] != "max_tokens"]}
    assert space.same_search(before, now)
    assert not space.same_search({**before, "compile": ["none"]}, now)


def test_a_bad_lengths_field_is_refused_before_any_trial(tmp_path):
    ref = WorkloadRef(model=TEXT, data=None, cwd=".")
    workload = build(ref)
    workload.lengths = "mask"
    with pytest.raises(AdvisorError, match=r"Workload.lengths: there is no input 'mask': the inputs are a "
                                           r"dict with keys \['input_ids', 'attention_mask'\]"):
        StudyCache(tmp_path).prepare(workload, ref)
    workload.lengths = 1.5
    with pytest.raises(AdvisorError, match=r"Workload\.lengths must name the attention-mask input"):
        advisor.workload.check_fields(workload)


# -- export, training_setup -----------------------------------------------------------------------

def test_the_file_round_trips_the_budget_and_older_files_mean_fixed_batches(tmp_path):
    knobs = {**ALL_KNOBS, "accumulation": 1, "max_tokens": 1024}
    path = export.write(exported(tmp_path, knobs), tmp_path / "r.yaml")
    config = export.load_config(path)
    assert config.knobs == Knobs(**knobs)
    content = yaml.safe_load(path.read_text())
    del content["knobs"]["max_tokens"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(content))
    assert export.load_config(tmp_path / "old.yaml").knobs.max_tokens == 0
    setup = advisor.training_setup(config, textcls.TextClassifier(width=16, depth=1))
    assert setup.max_tokens == 1024 and setup.accumulation_steps == 1
    step = setup.steps(long_tailed(), batch_size=16).next_step()
    assert sum(len(idx) for idx in step) == 16


# -- end to end -------------------------------------------------------------------------------------

def test_a_study_of_the_text_workload_runs_a_budget_trial(workdir):
    advisor.run(TEXT, trials=1, progress=False, sampler="random", seed=0,
                enqueue=[{**PLAIN, "max_tokens": 1024}], **FAST)
    study = optuna.load_study(study_name="textcls", storage="sqlite:///studies/advisor.db")
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("failure")
    assert trial.params["max_tokens"] == 1024 and "accumulation" not in trial.params
    train, base = trial.user_attrs["result"]["train"], study.user_attrs["baseline"]["train"]
    assert train["micro_batches"] > train["optimizer_steps"] == FAST["trial_steps"]
    assert train["padding_share"] < 0.6 < base["padding_share"], "fixed batches carry the padding"
    assert train["tokens_per_s"] > 0
    shown = advisor.show("textcls")
    assert "tokens" in shown.splitlines()[2] and "fixed" in shown, "the table shows the knob"


@pytest.mark.slow
def test_bench_varlen_compares_batchings_on_the_same_samples(workdir):
    result = cli("bench", "varlen", "--samples", "64", "--repeats", "1", "--budgets", "512,8192",
                 "--json", "varlen.json")
    assert result.code == 0, result.err
    assert "fixed (padded)" in result.out and "max_tokens=8192 (whole step)" in result.out
    report = json.loads((workdir / "varlen.json").read_text())
    rows = {r["max_tokens"]: r for r in report["rows"]}
    assert set(rows) == {0, 512, 8192}
    assert rows[512]["padding_share"] < rows[8192]["padding_share"] < rows[0]["padding_share"]
    losses = {round(r["final_loss"], 4) for r in rows.values()}
    assert len(losses) == 1, f"the same samples per step give the same training: {losses}"
