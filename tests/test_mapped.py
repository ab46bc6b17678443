"""The memory-mapped dataset cache: exact round trips, clear errors, fingerprints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from advisor.errors import AdvisorError
from advisor.trial import mapped


class Listed:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize("sample", [
    lambda i: (torch.full((2, 3), float(i)), i),
    lambda i: ((torch.arange(4) + i, np.ones(2, dtype=np.float32) * i), torch.tensor(i % 2)),
    lambda i: ({"ids": torch.arange(5) * i, "mask": torch.ones(5, dtype=torch.bool)}, float(i)),
    lambda i: (torch.full((3,), i, dtype=torch.bfloat16), i),
])
def test_batches_equal_the_original_samples(sample, tmp_path):
    items = [sample(i) for i in range(7)]
    mapped.materialize(Listed(items), tmp_path / "split", "train")
    split = mapped.MappedSplit(tmp_path / "split")
    assert len(split) == 7
    idx = np.array([5, 0, 3])
    inputs, target = split.batch(idx)
    for row, i in enumerate(idx):
        _, expected = mapped.flatten(items[i], "x")
        _, got = mapped.flatten((_row(inputs, row), target[row]), "x")
        for e, g in zip(expected, got, strict=True):
            assert g.dtype == e.dtype and torch.equal(g, e), f"sample {i} differs"


def _row(inputs, row):
    if isinstance(inputs, torch.Tensor):
        return inputs[row]
    if isinstance(inputs, dict):
        return {k: v[row] for k, v in inputs.items()}
    return tuple(v[row] for v in inputs)


def test_slices_give_writable_tensors(tmp_path):
    mapped.materialize(TensorDataset(torch.randn(4, 2), torch.arange(4)), tmp_path / "s", "val")
    inputs, _ = mapped.MappedSplit(tmp_path / "s").batch(slice(0, 2))
    inputs += 1  # would warn (an error in tests) on a read-only memory map


def test_fingerprint_follows_the_content(tmp_path):
    x = torch.randn(6, 3)
    a = mapped.materialize(TensorDataset(x, torch.arange(6)), tmp_path / "a", "train")
    b = mapped.materialize(TensorDataset(x.clone(), torch.arange(6)), tmp_path / "b", "train")
    x[2, 1] += 1
    c = mapped.materialize(TensorDataset(x, torch.arange(6)), tmp_path / "c", "train")
    assert a == b != c


@pytest.mark.parametrize("items, message", [
    ([torch.ones(3)], r"Workload.train\[0\] must be an \(inputs, target\) pair; got Tensor\[3\]"),
    ([(torch.ones(3), 0), (torch.ones(4), 1)],
     r"train\[1\] inputs has shape \[4\] but train\[0\] has \[3\]"),
    ([((torch.ones(1), torch.ones(1)), 0), ({"a": torch.ones(1)}, 0)],
     r"train\[1\] inputs are a dict with keys \['a'\] but train\[0\] inputs are a tuple of 2"),
    ([("text", 0)], r"inputs must be a Tensor"),
])
def test_malformed_samples_get_one_clear_error(items, message, tmp_path):
    with pytest.raises(AdvisorError, match=message):
        mapped.materialize(Listed(items), tmp_path / "split", "train")
    assert not (tmp_path / "split").exists()
