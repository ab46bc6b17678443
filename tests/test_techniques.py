"""Each knob changes what it should, and nothing else."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from advisor.knobs import Knobs
from advisor.techniques import accumulation, checkpointing, precision
from advisor.techniques import compile as compile_technique
from advisor.techniques.accumulation import AccumulationConfig
from advisor.techniques.checkpointing import CheckpointConfig
from advisor.techniques.compile import CompileConfig
from advisor.techniques.precision import PrecisionConfig
from advisor.trial import mapped
from advisor.trial.measure import MIB, MemoryMeter
from advisor.trial.train import Trainer, fine_tune, training_memory
from advisor.workload import default_loss

CPU = torch.device("cpu")


def split(tmp_path, n=64, features=8, classes=3):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g))
    mapped.materialize(ds, tmp_path / "train", "train")
    return mapped.MappedSplit(tmp_path / "train")


def trainer(model, train, *, precision_dtype="fp32", steps=1, batch_size=16, compiled=None, lr=1e-3,
            device=CPU):
    model.to(device)
    return Trainer(model, model if compiled is None else compiled, train, default_loss,
                   Knobs(precision=precision_dtype, accumulation=steps, lr=lr),
                   batch_size=batch_size, steps=10, device=device, seed=0)


class Recorder(nn.Module):
    """Records the dtype of its first layer's output and the micro-batch sizes it sees."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)
        self.dtypes, self.sizes = [], []

    def forward(self, x):
        h = self.fc1(x)
        self.dtypes.append(h.dtype)
        self.sizes.append(x.shape[0])
        return self.fc2(torch.relu(h))


@pytest.mark.parametrize("dtype, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_runs_the_forward_under_autocast(dtype, expected, tmp_path):
    model = Recorder()
    trainer(model, split(tmp_path), precision_dtype=dtype).step()
    assert model.dtypes == [expected]
    assert all(p.dtype == torch.float32 for p in model.parameters()), "weights stay fp32 (AMP)"


def test_fp16_uses_a_grad_scaler_and_still_learns(tmp_path):
    model = Recorder()
    t = trainer(model, split(tmp_path), precision_dtype="fp16", lr=1e-2)
    assert isinstance(t.scaler, torch.amp.GradScaler)
    before = copy.deepcopy(model.state_dict())
    for _ in range(3):
        t.step()
    assert model.dtypes[0] == torch.float16
    assert not torch.equal(before["fc1.weight"], model.fc1.weight), "fp16 steps updated weights"
    assert precision.grad_scaler(PrecisionConfig("bf16"), "cpu") is None


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_accumulation_keeps_the_effective_batch(steps, tmp_path):
    model = Recorder()
    t = trainer(model, split(tmp_path), steps=steps)
    calls = []
    t.optimizer.register_step_post_hook(lambda *a: calls.append(1))
    for _ in range(3):
        t.step()
    assert len(calls) == 3, "one optimizer step per effective batch"
    assert model.sizes == [16 // steps] * (3 * steps)


def test_accumulated_gradient_equals_the_full_batch_gradient(tmp_path):
    train = split(tmp_path)
    grads = []
    for steps in (1, 4):
        torch.manual_seed(0)
        model = nn.Linear(8, 3)
        t = trainer(model, train, steps=steps)
        t.optimizer.register_step_pre_hook(lambda *a, m=model: grads.append(m.weight.grad.clone()))
        t.step()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6,
                               msg="4 micro-batches of loss/4 must sum to the full-batch gradient")


def test_accumulation_options_divide_the_batch():
    offered, excluded = accumulation.options(24)
    assert offered == [1, 2, 4, 8]
    offered, excluded = accumulation.options(12)
    assert offered == [1, 2, 4] and [e.value for e in excluded] == [8]
    with pytest.raises(ValueError, match="does not divide the batch size 12"):
        AccumulationConfig(8).micro_batch(12)


class Deep(nn.Module):
    def __init__(self, width=256, depth=12):
        super().__init__()
        self.stem = nn.Linear(8, width)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
            for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def test_find_blocks_picks_the_largest_container():
    path, blocks = checkpointing.find_blocks(Deep(depth=5))
    assert path == "layers" and len(blocks) == 5
    path, blocks = checkpointing.find_blocks(nn.Linear(2, 2))
    assert blocks == []
    offered, excluded = checkpointing.options(nn.Linear(2, 2))
    assert offered == [0] and "no repeated blocks" in excluded[0].reason
    assert checkpointing.options(Deep(depth=5))[0] == [0, 1, 2, 4]


def test_checkpointing_wraps_every_kth_block_and_keeps_gradients_equal():
    torch.manual_seed(0)
    plain = Deep(width=32, depth=6)
    ckpt = copy.deepcopy(plain)
    assert checkpointing.apply(ckpt, CheckpointConfig(2)) == 3
    assert set(ckpt.state_dict()) == set(plain.state_dict()), "state_dict keys unchanged"
    x = torch.randn(4, 8)
    for m in (plain, ckpt):
        m(x).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=f"gradient of {name} changed")


def test_checkpointing_lowers_peak_training_memory(tmp_path):
    train = split(tmp_path, n=2048)
    peaks = {}
    for every in (0, 1):
        torch.manual_seed(0)
        model = Deep(width=256, depth=12)
        checkpointing.apply(model, CheckpointConfig(every))
        t = trainer(model, train, batch_size=2048)
        fine_tune(t, steps=3, warmup_steps=2, meter=MemoryMeter(CPU))
        peaks[every] = training_memory(t, MemoryMeter(CPU)).transient_mib
    # Without checkpointing each block keeps 4 activations of 2048x256 fp32 (2 MiB each).
    assert peaks[1] < 0.6 * peaks[0], f"transient peak MiB: none {peaks[0]:.0f}, all {peaks[1]:.0f}"


def test_compile_is_applied_and_trains(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    model = Recorder()
    compiled = compile_technique.apply(model, CompileConfig("default"))
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert compile_technique.apply(model, CompileConfig("none")) is model
    t = trainer(model, split(tmp_path), compiled=compiled)
    before = model.fc1.weight.detach().clone()
    t.step()
    assert not torch.equal(before, model.fc1.weight), "the compiled step updated the weights"
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames >= 1, "dynamo compiled at least one graph"


class Counting(nn.Module):
    """Calls ``inner``, counting the calls: stands for a compiled model."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_the_steps_before_the_first_rung_run_uncompiled_and_a_stop_there_never_calls_the_compiled_model(tmp_path):
    """``eager_steps``: the model itself trains up to the first rung, so a trial the study
    stops there never compiles its fine-tune; a trial that goes on calls the compiled model
    for every later step, and its warm-up and timed steps come after the eager ones."""
    train = split(tmp_path)

    class Stop(Exception):
        pass

    def stop_at(step):
        def on_step(i):
            if i + 1 == step:
                raise Stop
        return on_step

    model = Recorder()
    compiled = Counting(model)
    t = trainer(model, train, steps=2, compiled=compiled)
    with pytest.raises(Stop):
        fine_tune(t, steps=10, warmup_steps=2, meter=MemoryMeter(CPU), on_step=stop_at(4), eager_steps=4)
    assert compiled.calls == 0 and len(model.sizes) == 4 * 2, "stopped at the rung: the compiled model never ran"

    model = Recorder()
    compiled = Counting(model)
    t = trainer(model, train, steps=2, compiled=compiled)
    report = fine_tune(t, steps=10, warmup_steps=2, meter=MemoryMeter(CPU), eager_steps=4)
    assert compiled.calls == (10 - 4) * 2 and len(model.sizes) == 10 * 2
    assert report.eager_steps == 4 and report.samples == (10 - 4 - 2) * 16, "timed: the steps after the warm-up"
    # Nothing to compile: every step is the model's own, and none is called eager.
    t = trainer(Recorder(), train)
    assert fine_tune(t, steps=10, warmup_steps=2, meter=MemoryMeter(CPU), eager_steps=4).eager_steps == 0


@pytest.mark.parametrize("make, message", [
    (lambda: PrecisionConfig("fp8"), "precision must be one of 'fp32', 'bf16', 'fp16'; got 'fp8'"),
    (lambda: CompileConfig("fast"), "compile must be one of 'none', 'default'"),
    (lambda: AccumulationConfig(0), "accumulation must be a positive integer; got 0"),
    (lambda: CheckpointConfig(-1), "checkpoint_every must be 0 .off. or a positive integer"),
])
def test_unknown_values_list_the_known_ones(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_training_memory_counts_state_exactly(tmp_path):
    t = trainer(Recorder(), split(tmp_path))
    fine_tune(t, steps=3, warmup_steps=2, meter=MemoryMeter(CPU))
    report = training_memory(t, MemoryMeter(CPU))
    tensors = list(Recorder().parameters())
    params = sum(p.numel() * 4 for p in tensors)
    # Model (1x) + AdamW's two moments (2x) of fp32 parameters + its fp32 step counters.
    assert report.state_mib == pytest.approx((3 * params + 4 * len(tensors)) / MIB)
    assert report.memory_mib == report.state_mib + report.transient_mib
