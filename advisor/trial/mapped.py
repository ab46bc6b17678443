"""Memory-mapped dataset cache: a workload's data materialized once, opened instantly.

The study process walks the user's map-style datasets once and writes every leaf tensor of
the ``(inputs, target)`` samples into ``numpy`` memory maps (``.npy`` files, one row per
sample) with a small JSON index. Trial processes open those maps instead of rebuilding the
data, and gather whole batches with one fancy index instead of per-sample ``__getitem__``
plus collation, so the fixed cost of a trial stays small.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advisor.errors import AdvisorError

INDEX = "index.json"
FORMAT_VERSION = 1

# torch dtypes that numpy has no twin for are stored as same-width integers and viewed back.
_STORED_AS = {torch.bfloat16: torch.int16}


@dataclass(frozen=True)
class Layout:
    """The form of a sample's inputs: a Tensor, a tuple of n Tensors, or a dict."""

    kind: str  # "tensor" | "tuple" | "dict"
    keys: tuple[str, ...] = ()
    n: int = 1

    def leaves(self) -> int:
        return {"tensor": 1, "tuple": self.n, "dict": len(self.keys)}[self.kind]

    def describe(self) -> str:
        if self.kind == "tensor":
            return "a Tensor"
        if self.kind == "tuple":
            return f"a tuple of {self.n}"
        return f"a dict with keys {list(self.keys)}"


def _as_tensor(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise AdvisorError(
            f"{where} must be a Tensor (or an array or number); got {type(value).__name__}"
        ) from None


def flatten(sample: Any, where: str) -> tuple[Layout, list[torch.Tensor]]:
    """Split an ``(inputs, target)`` sample into its layout and leaf tensors (target last)."""
    if not (isinstance(sample, Sequence) and not isinstance(sample, (str, torch.Tensor))
            and len(sample) == 2):
        kind = type(sample).__name__
        if isinstance(sample, torch.Tensor):
            kind = f"Tensor{list(sample.shape)}"
        raise AdvisorError(f"{where} must be an (inputs, target) pair; got {kind}")
    inputs, target = sample
    if isinstance(inputs, Mapping):
        keys = tuple(str(k) for k in inputs)
        layout = Layout("dict", keys=keys, n=len(keys))
        leaves = [_as_tensor(inputs[k], f"{where} inputs[{k!r}]") for k in inputs]
    elif isinstance(inputs, (tuple, list)):
        layout = Layout("tuple", n=len(inputs))
        leaves = [_as_tensor(x, f"{where} inputs[{i}]") for i, x in enumerate(inputs)]
    else:
        layout = Layout("tensor")
        leaves = [_as_tensor(inputs, f"{where} inputs")]
    leaves.append(_as_tensor(target, f"{where} target"))
    return layout, leaves


def _leaf_name(layout: Layout, i: int) -> str:
    if i == layout.leaves():
        return "target"
    if layout.kind == "dict":
        return f"inputs[{layout.keys[i]!r}]"
    if layout.kind == "tuple":
        return f"inputs[{i}]"
    return "inputs"


def materialize(dataset: Any, directory: Path, split: str) -> str:
    """Write ``dataset`` into memory maps under ``directory``; returns its fingerprint.

    The fingerprint is a SHA-256 of the layout and every byte, so a study can tell when a
    workload's data changed between runs.
    """
    directory = Path(directory)
    n = len(dataset)
    layout, first = flatten(dataset[0], f"Workload.{split}[0]")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        maps = []
        leaves_meta = []
        for i, t in enumerate(first):
            stored = _STORED_AS.get(t.dtype, t.dtype)
            np_dtype = torch.empty((), dtype=stored).numpy().dtype
            path = tmp / f"leaf{i}.npy"
            maps.append(np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype,
                                                  shape=(n, *t.shape)))
            leaves_meta.append({"file": path.name, "dtype": str(t.dtype).removeprefix("torch."),
                                "shape": list(t.shape)})
        for j in range(n):
            if j == 0:
                leaves = first
            else:
                lay, leaves = flatten(dataset[j], f"Workload.{split}[{j}]")
                if lay != layout:
                    raise AdvisorError(
                        f"Workload.{split}[{j}] inputs are {lay.describe()} but "
                        f"{split}[0] inputs are {layout.describe()}; every sample needs one form"
                    )
            for i, t in enumerate(leaves):
                if list(t.shape) != leaves_meta[i]["shape"]:
                    raise AdvisorError(
                        f"Workload.{split}[{j}] {_leaf_name(layout, i)} has shape "
                        f"{list(t.shape)} but {split}[0] has {leaves_meta[i]['shape']}; every "
                        f"sample needs the same shapes (pad variable-length inputs)"
                    )
                t = t.to(first[i].dtype)
                stored = _STORED_AS.get(t.dtype)
                maps[i][j] = (t.view(stored) if stored else t).numpy()
        digest = hashlib.sha256(json.dumps([layout.kind, layout.keys, leaves_meta]).encode())
        for m in maps:
            m.flush()
            digest.update(memoryview(np.ascontiguousarray(m)).cast("B"))
        fingerprint = digest.hexdigest()[:16]
        index = {"version": FORMAT_VERSION, "n": n, "split": split, "fingerprint": fingerprint,
                 "layout": {"kind": layout.kind, "keys": list(layout.keys), "n": layout.n},
                 "leaves": leaves_meta}
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
        del maps
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return fingerprint


class MappedSplit:
    """One split of the cache, opened read-only; ``batch(idx)`` gathers samples by index."""

    def __init__(self, directory: Path) -> None:
        directory = Path(directory)
        index = json.loads((directory / INDEX).read_text())
        if index.get("version") != FORMAT_VERSION:
            raise AdvisorError(f"data cache {directory} has an unknown format; delete it")
        lay = index["layout"]
        self.layout = Layout(lay["kind"], keys=tuple(lay["keys"]), n=lay["n"])
        self.fingerprint: str = index["fingerprint"]
        self.n: int = index["n"]
        self._dtypes = [getattr(torch, leaf["dtype"]) for leaf in index["leaves"]]
        self._arrays = [np.load(directory / leaf["file"], mmap_mode="r")
                        for leaf in index["leaves"]]

    def __len__(self) -> int:
        return self.n

    def input_leaf(self, key: str | int) -> np.ndarray:
        """One input of every sample, read-only: a dict key, or a tuple position."""
        lay = self.layout
        if lay.kind == "dict" and isinstance(key, str) and key in lay.keys:
            return self._arrays[lay.keys.index(key)]
        if lay.kind == "tuple" and isinstance(key, int) and not isinstance(key, bool) \
                and 0 <= key < lay.n:
            return self._arrays[key]
        raise AdvisorError(f"there is no input {key!r}: the inputs are {lay.describe()}")

    def batch(self, index: np.ndarray | slice) -> tuple[Any, torch.Tensor]:
        """``(inputs, target)`` for the samples at ``index``, in the workload's input form."""
        leaves = []
        for arr, dtype in zip(self._arrays, self._dtypes, strict=True):
            rows = arr[index]  # fancy indexing copies; a slice is a read-only view of the map
            if not rows.flags.writeable:
                rows = rows.copy()
            t = torch.from_numpy(rows)
            leaves.append(t.view(dtype) if t.dtype != dtype else t)
        target = leaves.pop()
        if self.layout.kind == "tensor":
            return leaves[0], target
        if self.layout.kind == "tuple":
            return tuple(leaves), target
        return dict(zip(self.layout.keys, leaves, strict=True)), target

