"""``advisor show``: print a stored study's baseline, Pareto front and failures."""

from __future__ import annotations

import argparse

from advisor import api, storage


def register(sub) -> None:
    p = sub.add_parser("show", help="print a stored study's Pareto front",
                       description="Print a stored study's baseline, Pareto front and failed trials.")
    p.add_argument("--study", help="study name (needed when the storage holds several)")
    p.add_argument("--storage", default=storage.DEFAULT_URL, metavar="URL",
                   help=f"SQLAlchemy URL of the study storage (default {storage.DEFAULT_URL})")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    print(api.show(args.study, args.storage))
    return 0
