"""``advisor dashboard``: write a study's dashboard, one self-contained HTML file."""

from __future__ import annotations

import argparse

from advisor import api
from advisor.cli import common


def register(sub) -> None:
    p = sub.add_parser("dashboard", help="write a study's dashboard (HTML)",
                       description="Write a study's dashboard (Pareto scatter matrix, parallel "
                       "coordinates, hypervolume, knob importance, all trials, the recommended "
                       "trial's profile) to one HTML file that opens offline.")
    common.add_study(p)
    common.add_goal(p)
    p.add_argument("-o", "--output", metavar="PATH", help="default dashboards/<study>.html")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    print(api.dashboard(args.study, args.storage, output=args.output, goal=args.goal))
    return 0
