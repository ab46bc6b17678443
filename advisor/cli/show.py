"""``advisor show``: a stored study's baseline, Pareto front, recommendation and failures."""

from __future__ import annotations

import argparse

from advisor import api
from advisor.cli import common


def register(sub) -> None:
    p = sub.add_parser("show", help="print a stored study's front and recommendation",
                       description="Print a stored study's baseline, Pareto front, recommendation "
                       "and failed trials. Constraint flags replace the study's own for this report.")
    common.add_study(p)
    common.add_goal(p)
    common.add_constraints(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    print(api.show(args.study, args.storage, goal=args.goal, **common.given_constraints(args)))
    return 0
