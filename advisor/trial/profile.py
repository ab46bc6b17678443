"""Where a trial's time goes: its top operators by self time under ``torch.profiler``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from advisor.trial.measure import synchronize


def top_operators(fn: Callable[[], object], repeats: int, device: torch.device,
                  top: int = 10) -> list[dict]:
    """Run ``fn`` ``repeats`` times under the profiler; the ``top`` operators by self time.

    On CUDA the ranking is by self device time (what the GPU spent), else by self CPU time.
    """
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        synchronize(device)
    on_device = device.type == "cuda"
    rows = []
    for event in prof.key_averages():
        self_us = (getattr(event, "self_device_time_total", 0.0) if on_device
                   else event.self_cpu_time_total)
        rows.append({
            "name": event.key,
            "calls": int(event.count),
            "self_ms": self_us / 1e3 / max(1, repeats),
            "total_ms": (getattr(event, "device_time_total", 0.0) if on_device
                         else event.cpu_time_total) / 1e3 / max(1, repeats),
        })
    total = sum(r["self_ms"] for r in rows) or 1.0
    rows.sort(key=lambda r: r["self_ms"], reverse=True)
    for r in rows:
        r["self_pct"] = 100.0 * r["self_ms"] / total
    return [r for r in rows[:top] if r["self_ms"] > 0]
