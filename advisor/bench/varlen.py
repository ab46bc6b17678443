"""``advisor bench varlen``: fixed-size batches against token budgets on a variable-length
workload, trained for the same samples with the trial's own trainer.

Each batching trains a fresh copy of the workload's model (same initial weights, same seed,
so the same samples in every step) for ``samples`` samples after two warm-up steps; the
batchings take turns within each repeat, so drift on a shared machine hits them alike.
Peak training memory is measured last, once per batching, because measuring it on CPU
slows the process's later allocations (``trial.measure.peak_in_fresh_arena``).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from advisor import hardware
from advisor.errors import AdvisorError
from advisor.knobs import Knobs
from advisor.techniques import batching
from advisor.texttable import table
from advisor.trial import measure
from advisor.trial.cache import StudyCache
from advisor.trial.measure import MemoryMeter
from advisor.trial.train import Trainer, fine_tune, training_memory
from advisor.workload import WorkloadRef, build, loss_fn, metric_fn

TEXT = "advisor.examples.textcls:build"
WARMUP = 2


def varlen(model: str = TEXT, *, samples: int = 3200, repeats: int = 3, budgets: list[int] | None = None,
           device: str = "auto", seed: int = 0, lr: float = 1e-3,
           on_run: Callable[[str], None] | None = None) -> dict:
    """Samples/s, tokens/s, padding, memory, loss and accuracy per batching, as a dict.

    ``budgets`` default to the ones the search space offers, plus the whole step in one
    trimmed micro-batch (``batch_size x width``), which tells trimming from bucketing.
    """
    if samples < 1 or repeats < 1:
        raise AdvisorError(f"--samples and --repeats must be positive; got {samples} and {repeats}")
    hw = hardware.detect(device)
    torch.set_num_threads(hw.cores)
    dev = torch.device("cuda", 0) if hw.device == "cuda" else torch.device("cpu")
    ref = WorkloadRef(model=model, data=None, cwd=str(Path.cwd()))
    workload = build(ref)
    if workload.lengths is None:
        raise AdvisorError(f"{model} is not variable-length (its Workload.lengths is None); "
                           f"this benchmark needs one, such as {TEXT}")
    bs = workload.batch_size
    with tempfile.TemporaryDirectory(prefix="advisor-varlen-") as tmp:
        cache = StudyCache(Path(tmp))
        cache.prepare(workload, ref)
        train, val = cache.split("train"), cache.split("val")
        lengths = cache.lengths(workload.lengths)
        if budgets is None:
            budgets = [*batching.options(bs, lengths)[0][1:], bs * lengths.width]
        configs = [0, *sorted(set(budgets))]
        steps = WARMUP + -(-samples // bs)
        loss, metric = loss_fn(workload), metric_fn(workload)
        meter = MemoryMeter(dev)
        runs: dict[int, list[dict]] = {c: [] for c in configs}
        trainers: dict[int, Trainer] = {}

        def trainer_for(max_tokens: int) -> Trainer:
            net = copy.deepcopy(workload.model).to(dev)
            return Trainer(net, net, train, loss, Knobs(lr=float(lr), max_tokens=max_tokens), batch_size=bs,
                           steps=steps, device=dev, seed=seed, lengths=lengths)

        for r in range(repeats):
            for max_tokens in configs:
                trainer = trainer_for(max_tokens)
                report = fine_tune(trainer, steps, WARMUP, meter)
                trainer.model.eval()
                accuracy = measure.evaluate(trainer.model, val, metric, batch=bs, device=dev,
                                            autocast=contextlib.nullcontext())
                runs[max_tokens].append({
                    "samples_per_s": report.throughput, "tokens_per_s": report.tokens_per_s,
                    "padded_tokens_per_s": report.padded_tokens * report.throughput / report.samples,
                    "padding_share": report.padding_share, "samples": report.samples,
                    "micro_batches": trainer.micro_batches, "final_loss": report.final_loss,
                    "accuracy": accuracy, "measured_s": report.measured_s})
                trainers[max_tokens] = trainer
                if on_run:
                    on_run(f"repeat {r + 1}/{repeats} {_label(max_tokens)}: "
                           f"{report.throughput:.0f} samples/s")
        memory = {}
        for max_tokens, trainer in trainers.items():
            memory[max_tokens] = training_memory(trainer, meter)
    rows = []
    for max_tokens in configs:
        rs = runs[max_tokens]
        speeds = [x["samples_per_s"] for x in rs]
        median = statistics.median(speeds)
        mem = memory[max_tokens]
        rows.append({
            "max_tokens": max_tokens, "batching": _label(max_tokens, bs * lengths.width),
            "samples_per_s": median, "spread": (max(speeds) - min(speeds)) / median,
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
            "padded_tokens_per_s": statistics.median(x["padded_tokens_per_s"] for x in rs),
            "padding_share": rs[0]["padding_share"], "steps": steps - WARMUP,
            "micro_batches_per_step": rs[0]["micro_batches"] / steps,
            "memory_mib": mem.memory_mib, "transient_mib": mem.transient_mib,
            "final_loss": statistics.median(x["final_loss"] for x in rs),
            "accuracy": statistics.median(x["accuracy"] for x in rs), "runs": rs,
        })
    for row in rows:
        row["speedup"] = row["samples_per_s"] / rows[0]["samples_per_s"]
    return {"hardware": hw.to_dict(), "workload": workload.name, "model": model,
            "batch_size": bs, "width": lengths.width, "train_samples": len(train),
            "mean_length": float(lengths.tokens.mean()), "max_length": int(lengths.tokens.max()),
            "samples": samples, "repeats": repeats, "seed": seed, "lr": lr, "rows": rows}


def _label(max_tokens: int, whole: int = 0) -> str:
    if max_tokens == 0:
        return "fixed (padded)"
    return f"max_tokens={max_tokens}" + (" (whole step)" if max_tokens >= whole > 0 else "")


def render(report: dict) -> str:
    cols = ["batching", "micro/step", "samples/s", "speedup", "tokens/s", "padded tokens/s",
            "padding", "memory MiB", "steps", "final loss", "accuracy"]
    rows = [[r["batching"], f"{r['micro_batches_per_step']:.1f}",
             f"{r['samples_per_s']:.0f} ±{r['spread'] * 50:.0f}%", f"{r['speedup']:.2f}x",
             f"{r['tokens_per_s']:.0f}", f"{r['padded_tokens_per_s']:.0f}",
             f"{100 * r['padding_share']:.0f}%", f"{r['memory_mib']:.3g}", str(r["steps"]),
             f"{r['final_loss']:.4f}", f"{r['accuracy']:.4f}"] for r in report["rows"]]
    hw = report["hardware"]
    head = (f"Token-budget batching: {report['workload']} on {hw['device']} ({hw['name']}, {hw['cores']} "
            f"cores), torch {hw['torch_version']}; batch {report['batch_size']} of {report['train_samples']} "
            f"sequences padded to {report['width']} (mean length {report['mean_length']:.1f}, "
            f"max {report['max_length']}); {report['samples']} samples per run, median of "
            f"{report['repeats']} (± half the range); tokens/s counts real tokens, padding is the "
            f"share of computed positions that are padding")
    return head + "\n" + table(cols, rows, right=set(range(1, 11)))
