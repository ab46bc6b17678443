"""``advisor export``: write a study's recommendation as a versioned YAML file."""

from __future__ import annotations

import argparse

from advisor import api
from advisor.cli import common


def register(sub) -> None:
    p = sub.add_parser("export", help="write the recommended configuration to a file",
                       description="Write a study's recommendation (the knobs, the measured "
                       "objectives with the baseline's, the constraints, provenance) to a "
                       "versioned YAML file for advisor apply. Constraint flags replace the "
                       "study's own; with no trial meeting them, the nearest is written.")
    common.add_study(p)
    common.add_goal(p)
    common.add_constraints(p)
    p.add_argument("-o", "--output", default="recommended.yaml", metavar="PATH",
                   help="where to write (default recommended.yaml)")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    text, path = api.export(args.study, args.storage, output=args.output, goal=args.goal,
                            **common.given_constraints(args))
    print(text)
    print(f"wrote {path}")
    return 0
