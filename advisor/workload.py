"""The workload contract: what a user's ``module:function`` returns, and how it is loaded.

``build()`` returns an :class:`Workload` or a bare ``torch.nn.Module`` (then ``--data``
names a function returning ``(train, val)``). Everything the rest of the pipeline needs to
call the user's model (input forms, ``.logits`` outputs, loss and metric) lives here, so the
trainer and the measurements never special-case a workload.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from advisor import adapt
from advisor.errors import AdvisorError, first_line
from advisor.files import safe_name

DEFAULT_MODEL = "advisor.examples.digits:build"

Inputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass
class Workload:
    """A model with its data, as the advisor measures it.

    ``train`` and ``val`` are map-style datasets of ``(inputs, target)`` pairs, where
    ``inputs`` is a Tensor (``model(x)``), a tuple of Tensors (``model(*x)``) or a dict of
    Tensors (``model(**x)``). ``batch_size`` is the effective training batch, kept fixed
    across accumulation choices. With ``trained=False`` the advisor first trains a baseline.
    ``keep`` names layers (as in ``model.named_modules()``) that pruning must leave whole;
    the layer producing the output is always kept.

    ``lengths`` makes the workload variable-length: it names the input that holds the
    attention mask (a key of dict inputs, or a position of tuple inputs), ``[width]`` per
    sample, 1 for a token and 0 for padding, padded on the right. Each sample's length is
    its mask's sum, and the search space then offers token-budget batching (``max_tokens``,
    see ``advisor.techniques.batching``): trimmed micro-batches cut dim 1 of every input
    (and target) whose dim 1 is the padded width, so sequences must be batch-first.
    """

    model: nn.Module
    train: Any
    val: Any
    loss: LossFn | None = None
    metric: str | MetricFn = "accuracy"
    batch_size: int = 64
    trained: bool = False
    name: str | None = None
    keep: tuple[str, ...] = ()
    lengths: str | int | None = None
    target: str | None = None
    next_token: bool | None = None


@dataclass(frozen=True)
class WorkloadRef:
    """Where a workload comes from, so a trial process can build it again if it must."""

    model: str
    data: str | None
    cwd: str


def resolve(ref: str, option: str = "--model") -> Callable[..., Any]:
    """Import ``module:function`` with a message that says which part is wrong."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise AdvisorError(
            f"{option} must be MODULE:FUNCTION (for example mymodel:build); got {ref!r}"
        )
    if "/" in module_name or module_name.endswith(".py"):
        name = os.path.splitext(os.path.basename(module_name))[0]
        raise AdvisorError(
            f"{option} takes a module name, not a file path: use {name}:{attr} and run advisor "
            f"from the file's directory (or add it to PYTHONPATH); got {ref!r}"
        )
    if os.getcwd() not in sys.path:
        # Like `python -m`, a user's module in the working directory is importable.
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AdvisorError(
                f"{option}: could not import module {module_name!r} ({exc}); run advisor from "
                f"the directory that holds it or add that directory to PYTHONPATH"
            ) from None
        raise AdvisorError(
            f"{option}: importing module {module_name!r} failed: {describe_exception(exc)}"
        ) from None
    except Exception as exc:
        raise AdvisorError(
            f"{option}: importing module {module_name!r} failed: {describe_exception(exc)}"
        ) from None
    try:
        fn = getattr(module, attr)
    except AttributeError:
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n]))
        hint = f"; it defines {', '.join(public[:8])}" if public else ""
        raise AdvisorError(
            f"{option}: module {module_name!r} has no attribute {attr!r}{hint}"
        ) from None
    if not callable(fn):
        raise AdvisorError(f"{option}: {ref} is a {type(fn).__name__}, not a function")
    return fn


def describe_exception(exc: BaseException) -> str:
    """``Type: message (file:line)`` of the innermost frame outside the advisor."""
    message = first_line(exc)
    where = ""
    frames = traceback.extract_tb(exc.__traceback__)
    own = os.path.dirname(os.path.abspath(__file__))
    for frame in reversed(frames):
        if not os.path.abspath(frame.filename).startswith(own):
            where = f" ({os.path.basename(frame.filename)}:{frame.lineno})"
            break
    return f"{type(exc).__name__}: {message}{where}" if message else f"{type(exc).__name__}{where}"


def build(ref: WorkloadRef) -> Workload:
    """Call the user's build function and return a checked :class:`Workload`."""
    fn = resolve(ref.model, "--model")
    try:
        built = fn()
    except AdvisorError:
        raise
    except Exception as exc:
        raise AdvisorError(f"--model: {ref.model} raised {describe_exception(exc)}") from None
    if isinstance(built, Workload):
        if ref.data is not None:
            raise AdvisorError(
                f"--data: {ref.model} returns a Workload that carries its own data; "
                f"drop --data {ref.data}"
            )
        workload = built
    elif isinstance(built, nn.Module):
        if ref.data is None:
            raise AdvisorError(
                f"--model: {ref.model} returns a bare torch.nn.Module; name its data with "
                f"--data MODULE:FUNCTION (a function returning (train, val) datasets) or "
                f"return an advisor.Workload"
            )
        data_fn = resolve(ref.data, "--data")
        try:
            data = data_fn()
        except Exception as exc:
            raise AdvisorError(f"--data: {ref.data} raised {describe_exception(exc)}") from None
        if not (isinstance(data, Sequence) and len(data) == 2):
            raise AdvisorError(
                f"--data: {ref.data} must return a (train, val) pair of datasets; "
                f"got {_describe(data)}"
            )
        workload = Workload(model=built, train=data[0], val=data[1])
    else:
        raise AdvisorError(
            f"--model: {ref.model} must return an advisor.Workload or a torch.nn.Module; "
            f"got {_describe(built)}"
        )
    check_fields(workload)
    adapt.workload(workload)
    if workload.name is None:
        workload.name = default_name(ref.model)
    return workload


def check_fields(workload: Workload) -> None:
    """Type checks of the contract's fields, each with what was expected and what came."""
    if not isinstance(workload.model, nn.Module):
        raise AdvisorError(
            f"Workload.model must be a torch.nn.Module; got {_describe(workload.model)}"
        )
    for split in ("train", "val"):
        ds = getattr(workload, split)
        if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
            raise AdvisorError(
                f"Workload.{split} must be a map-style dataset (with __len__ and __getitem__) "
                f"of (inputs, target) pairs; got {_describe(ds)}"
            )
        if len(ds) == 0:
            raise AdvisorError(f"Workload.{split} is empty; it needs at least one sample")
    bs = workload.batch_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise AdvisorError(f"Workload.batch_size must be a positive integer; got {bs!r}")
    if workload.loss is not None and not callable(workload.loss):
        raise AdvisorError(
            f"Workload.loss must be callable(output, target) -> scalar or None; "
            f"got {_describe(workload.loss)}"
        )
    if not (workload.metric == "accuracy" or callable(workload.metric)):
        raise AdvisorError(
            f"Workload.metric must be 'accuracy' or callable(outputs, targets) -> float; "
            f"got {workload.metric!r}"
        )
    if workload.name is not None and not (isinstance(workload.name, str) and workload.name):
        raise AdvisorError(f"Workload.name must be a non-empty string; got {workload.name!r}")
    keep = workload.keep
    if isinstance(keep, str) or not isinstance(keep, (tuple, list)) \
            or not all(isinstance(k, str) for k in keep):
        raise AdvisorError(f"Workload.keep must be a tuple of layer names (strings); got {keep!r}")
    workload.keep = tuple(keep)
    lengths = workload.lengths
    if lengths is not None and (isinstance(lengths, bool) or not isinstance(lengths, (str, int))):
        raise AdvisorError(
            f"Workload.lengths must name the attention-mask input (a dict key, or a tuple "
            f"position) or be None; got {lengths!r}")
    if workload.target is not None and not (isinstance(workload.target, str) and workload.target):
        raise AdvisorError(f"Workload.target must name the dict key holding the target (such as "
                           f"'labels') or be None; got {workload.target!r}")
    if workload.next_token is not None and not isinstance(workload.next_token, bool):
        raise AdvisorError(f"Workload.next_token must be True, False or None (detect); "
                           f"got {workload.next_token!r}")


def default_name(model_ref: str) -> str:
    """A study-friendly name from ``module:function`` (``pkg.mymodel:build`` -> ``mymodel``)."""
    module, _, fn = model_ref.partition(":")
    base = module.rsplit(".", 1)[-1]
    name = base if fn == "build" else f"{base}-{fn}"
    return safe_name(name)


def _describe(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor{list(obj.shape)}"
    if isinstance(obj, (list, tuple)):
        return f"{type(obj).__name__} of {len(obj)}"
    return type(obj).__name__


# -- calling the model -------------------------------------------------------------------
def to_device(inputs: Inputs, device: torch.device) -> Inputs:
    """Move a batch's inputs (Tensor, tuple or dict) to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, Mapping):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return tuple(v.to(device, non_blocking=True) for v in inputs)


def shapes_of(inputs: Any) -> str:
    """``Tensor[2, 1, 8, 8]`` / ``(Tensor[..], ..)`` / ``{'ids': Tensor[..]}`` for messages."""
    if isinstance(inputs, torch.Tensor):
        return f"Tensor{list(inputs.shape)}"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k!r}: {shapes_of(v)}" for k, v in inputs.items()) + "}"
    return "(" + ", ".join(shapes_of(v) for v in inputs) + ")"


def call_args(inputs: Inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` the model takes the inputs as: ``(x,)``, ``x`` or ``**x``."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return tuple(inputs), {}


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)`` by the form of the inputs."""
    args, kwargs = call_args(inputs)
    return model(*args, **kwargs)


def logits_of(output: Any) -> torch.Tensor:
    """The tensor a loss and metric read: the output itself or its ``logits``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise AdvisorError(
        f"the model's output must be a Tensor or have a 'logits' field or key; "
        f"got {_describe(output)}"
    )


IGNORE = -100  # a target position without loss (PyTorch's and Hugging Face's convention)


class TokenLoss:
    """Cross entropy over the logits' last dimension, per position, ``-100`` ignored; with
    ``shift`` the logits at position t are scored against the target at t + 1."""

    def __init__(self, shift: bool = False) -> None:
        self.shift = shift

    def __call__(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        logits = logits_of(output)
        if self.shift:
            logits, target = logits[:, :-1], target[:, 1:]
        return nn.functional.cross_entropy(logits.float().flatten(0, -2), target.flatten(),
                                           ignore_index=IGNORE)


class Accuracy:
    """Share of the target positions (``-100`` ignored) where the argmax is right; with
    ``shift``, position t predicts t + 1. Takes logits, or the argmax ``reduce`` made of them."""

    def __init__(self, shift: bool = False) -> None:
        self.shift = shift

    @staticmethod
    def reduce(outputs: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(-1)

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        predicted = outputs if not outputs.is_floating_point() else outputs.argmax(-1)
        if self.shift:
            predicted, targets = predicted[:, :-1], targets[:, 1:]
        scored = targets != IGNORE
        total = int(scored.sum())
        return (predicted.eq(targets) & scored).sum().item() / total if total else 0.0


def default_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    return TokenLoss()(output, target)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return Accuracy()(outputs, targets)


def loss_fn(workload: Workload) -> LossFn:
    return workload.loss if workload.loss is not None else TokenLoss(bool(workload.next_token))


def metric_fn(workload: Workload) -> MetricFn:
    return Accuracy(bool(workload.next_token)) if workload.metric == "accuracy" else workload.metric  # type: ignore[return-value]


def metric_value(metric: MetricFn, outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Call the metric and insist on a number, saying what came instead."""
    value = metric(outputs, targets)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        import numpy as np

        if isinstance(value, np.generic):
            value = value.item()
    except ImportError:  # pragma: no cover - numpy ships with torch's CPU wheels
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdvisorError(
            f"Workload.metric must return a number (higher is better); got {_describe(value)}"
            f"{f' {value!r}' if isinstance(value, str) else ''}"
        )
    return float(value)
