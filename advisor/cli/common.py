"""Flags that several subcommands share: the storage and study, the constraints, the goal."""

from __future__ import annotations

import argparse

from advisor.constraints import LIMITS
from advisor.recommend import GOALS
from advisor.study import storage

_HELP = {
    "max_accuracy_drop": "points of the metric (hundredths: percentage points of accuracy) a "
                         "trial may lose against the baseline (default 1.0)",
    "max_latency_ms": "latency limit in ms at the serving batch size",
    "max_memory_mb": "training memory limit in MiB",
    "max_size_mb": "deployable model size limit in MiB",
}


def add_study(p: argparse.ArgumentParser,
              help: str = "study name (needed when the storage holds several)") -> None:
    p.add_argument("--study", help=help)
    add_storage(p)


def add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default=storage.DEFAULT_URL, metavar="URL",
                   help=f"SQLAlchemy URL of the study storage (default {storage.DEFAULT_URL})")


def add_constraints(p: argparse.ArgumentParser) -> None:
    for limit in LIMITS:
        p.add_argument(limit.flag, dest=limit.key, type=float, metavar=limit.unit.upper(),
                       help=_HELP[limit.key])


def add_goal(p: argparse.ArgumentParser) -> None:
    p.add_argument("--goal", default="balanced", choices=GOALS,
                   help="what the recommendation optimizes among the trials that meet the "
                        "constraints: balanced (default: the knee of the front), or one objective")


def given_constraints(args: argparse.Namespace) -> dict:
    """The constraint flags given on the command line (they replace the study's own)."""
    return {limit.key: getattr(args, limit.key) for limit in LIMITS
            if getattr(args, limit.key) is not None}
