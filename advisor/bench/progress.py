"""How a benchmark reports the studies it runs: a factory of a run's events, given the
run's trial count (the CLI passes the terminal's ``report.Progress``; the default is silent)."""

from __future__ import annotations

from collections.abc import Callable

from advisor.study import Events

Progress = Callable[[int], Events]


def silent(trials: int) -> Events:
    return Events()
