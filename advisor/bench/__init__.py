"""Benchmarks, each a table for people and a dict for JSON (``advisor bench``)."""

from advisor.bench.knobs import COMMON, one_at_a_time, render_knobs
from advisor.bench.overhead import overhead, render
from advisor.bench.workers import WORKER_CONFIGS, render_workers, workers

__all__ = ["COMMON", "WORKER_CONFIGS", "one_at_a_time", "overhead", "render", "render_knobs",
           "render_workers", "workers"]
