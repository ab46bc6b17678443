"""``advisor studies``: the studies a storage holds, with their trial counts."""

from __future__ import annotations

import argparse

from advisor import api
from advisor.cli import common


def register(sub) -> None:
    p = sub.add_parser("studies", help="list the studies in a storage",
                       description="List the studies in a storage with their trial counts.")
    common.add_storage(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    print(api.studies(args.storage))
    return 0
