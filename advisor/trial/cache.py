"""A study's directory on this machine: what trial processes read instead of the storage.

``StudyCache`` owns its layout: the workload's data as memory maps (``data/train``,
``data/val``, see ``mapped.py``), the pickled workload, the baseline's weights, each trial's
log, scratch room for artifacts, and the compiler cache shared by every study beside it.
The study process ``prepare``s it once; trial processes only read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advisor import adapt
from advisor.errors import AdvisorError
from advisor.files import flock, safe_name, unique_name
from advisor.techniques import batching
from advisor.trial import mapped
from advisor.workload import (
    Inputs,
    Workload,
    WorkloadRef,
    build,
    call_model,
    describe_exception,
    logits_of,
    loss_fn,
    metric_fn,
    metric_value,
    shapes_of,
)

SPLITS = ("train", "val")
PROBE_BATCH = 8  # inputs the space tries pruning and PT2E capture with


@dataclass(frozen=True)
class StudyCache:
    root: Path

    @classmethod
    def of_study(cls, cache_dir: str | os.PathLike, study_name: str) -> StudyCache:
        return cls(Path(cache_dir).resolve() / unique_name(study_name))

    @classmethod
    def of_apply(cls, cache_dir: str | os.PathLike, workload_name: str | None) -> StudyCache:
        return cls(Path(cache_dir).resolve() / ("apply-" + safe_name(workload_name or "model")))

    @property
    def workload_file(self) -> Path:
        return self.root / "workload.pt"

    @property
    def baseline_file(self) -> Path:
        return self.root / "baseline.pt"

    @property
    def compiler_dir(self) -> Path:
        """Inductor's cache, shared by the studies of one cache directory."""
        return self.root.parent / "inductor"

    def log(self, number: int) -> Path:
        return self.root / "logs" / ("baseline.log" if number < 0 else f"trial-{number}.log")

    def split(self, name: str) -> mapped.MappedSplit:
        return mapped.MappedSplit(self.root / "data" / name)

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Processes of this machine that share the cache (workers) take turns writing it."""
        return flock(self.root / ".lock")

    # -- written by the study process --------------------------------------------------

    def prepare(self, workload: Workload, ref: WorkloadRef) -> dict:
        """Materialize the data, check a batch end to end, pickle the workload for trials;
        returns what the study records about the workload."""
        fingerprints = {s: mapped.materialize(getattr(workload, s), self.root / "data" / s, s) for s in SPLITS}
        splits = {s: self.split(s) for s in SPLITS}
        check_consumable(workload, splits)
        _detect_lengths(workload, splits["train"])
        lengths = self.lengths(workload.lengths)  # a bad mask is refused here, before any trial
        self.save_workload(workload)
        return {
            "name": workload.name, "model": ref.model, "data": ref.data,
            "batch_size": workload.batch_size, "trained": workload.trained,
            "metric": workload.metric if isinstance(workload.metric, str) else "custom",
            "parameters": sum(p.numel() for p in workload.model.parameters()),
            "train_samples": len(splits["train"]), "fingerprints": fingerprints,
            # A trained model is the user's checkpoint: a changed one is another experiment.
            **({"weights": weights_digest(workload.model)} if workload.trained else {}),
            **({"target": workload.target} if workload.target else {}),
            **({"next_token": True} if workload.next_token else {}),
            **({"lengths": {"input": workload.lengths, "width": lengths.width,
                            "mean": float(lengths.tokens.mean()), "max": int(lengths.tokens.max())}}
               if lengths is not None else {}),
        }

    def save_workload(self, workload: Workload) -> bool:
        """Pickle model, loss and metric for trial processes; False when they cannot be
        pickled (a lambda loss, say): trial processes then call the build function again."""
        buffer = io.BytesIO()
        try:
            torch.save({"model": workload.model, "loss": loss_fn(workload),
                        "metric": metric_fn(workload)}, buffer)
        except Exception:
            self.workload_file.unlink(missing_ok=True)
            return False
        _write_atomic(self.workload_file, buffer.getvalue())
        return True

    def save_baseline(self, state_dict: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        _write_atomic(self.baseline_file, buffer.getvalue())

    # -- read by trial processes (and by the study to build its space) -----------------

    def load_workload(self, ref: WorkloadRef) -> tuple[torch.nn.Module, Any, Any]:
        """The workload's model, loss and metric: unpickled, or rebuilt when they could not be."""
        if self.workload_file.exists():
            saved = torch.load(self.workload_file, weights_only=False)
            return saved["model"], saved["loss"], saved["metric"]
        workload = build(ref)
        return workload.model, loss_fn(workload), metric_fn(workload)

    def lengths(self, key: str | int | None) -> batching.Lengths | None:
        """A variable-length workload's training-sample lengths (None for the others)."""
        return None if key is None else batching.lengths_of(self.split("train"), key)

    def probe_inputs(self) -> Inputs:
        """A few validation inputs, to try pruning and PT2E capture on copies of the model."""
        val = self.split("val")
        return val.batch(np.arange(min(len(val), PROBE_BATCH)))[0]


def _detect_lengths(workload: Workload, train: mapped.MappedSplit) -> None:
    """Dict inputs with a right-padded 0/1 ``attention_mask`` make a workload that names no
    lengths variable-length; a mask of another form leaves it fixed-size."""
    if workload.lengths is not None or adapt.MASK_KEY not in train.layout.keys:
        return
    try:
        batching.lengths_from_mask(train.input_leaf(adapt.MASK_KEY))
    except (ValueError, AdvisorError):
        return
    workload.lengths = adapt.MASK_KEY


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_consumable(workload: Workload, splits: dict[str, mapped.MappedSplit]) -> None:
    """Run a batch of each split through the model, loss and metric, naming what breaks."""
    model = workload.model
    was_training = model.training
    model.eval()
    loss, metric = loss_fn(workload), metric_fn(workload)
    try:
        for name, split in splits.items():
            inputs, target = split.batch(np.arange(min(2, len(split))))
            with torch.no_grad():
                try:
                    output = call_model(model, inputs)
                except Exception as exc:
                    raise AdvisorError(
                        f"the model cannot consume a batch of Workload.{name}: inputs "
                        f"{shapes_of(inputs)} -> {describe_exception(exc)}") from None
                logits = logits_of(output)
                shapes = f"(outputs {shapes_of(logits)}, target {shapes_of(target)})"
                try:
                    value = loss(output, target)
                except Exception as exc:
                    raise AdvisorError(f"the loss fails on a batch of Workload.{name} {shapes}: "
                                       f"{describe_exception(exc)}") from None
                if not (isinstance(value, torch.Tensor) and value.numel() == 1):
                    raise AdvisorError(
                        f"Workload.loss must return a scalar Tensor; got "
                        f"{shapes_of(value) if isinstance(value, torch.Tensor) else type(value).__name__}")
                try:
                    metric_value(metric, logits.float(), target)
                except AdvisorError:
                    raise
                except Exception as exc:
                    raise AdvisorError(f"Workload.metric fails on a batch of Workload.{name} {shapes}: "
                                       f"{describe_exception(exc)}") from None
    finally:
        model.train(was_training)


def weights_digest(model: torch.nn.Module) -> str:
    """A SHA-256 of the model's state: every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]
