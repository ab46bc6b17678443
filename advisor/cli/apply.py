"""``advisor apply``: rebuild an exported recommendation on a workload and re-measure it."""

from __future__ import annotations

import argparse

from advisor import api
from advisor.files import CACHE_DIR
from advisor.report import render_applied


def register(sub) -> None:
    p = sub.add_parser("apply", help="rebuild a recommended configuration and save the model",
                       description="Rebuild the configuration in a file written by advisor "
                       "export on your workload (baseline, prune, fine-tune, quantize, compile), "
                       "save the deployable model, and re-measure it beside the study's figures.")
    p.add_argument("config", metavar="CONFIG", help="the file advisor export wrote")
    p.add_argument("--model", metavar="MODULE:FUNCTION",
                   help="the workload (default: the one the config was measured on)")
    p.add_argument("--data", metavar="MODULE:FUNCTION",
                   help="(train, val) for a --model that returns a bare Module")
    p.add_argument("--steps", type=int, metavar="N",
                   help="fine-tune steps (default: the study's --trial-steps)")
    p.add_argument("-o", "--output", default="optimized.pt2", metavar="PATH",
                   help="where to save the deployable model (default optimized.pt2)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads (default: all usable cores)")
    p.add_argument("--cache-dir", default=CACHE_DIR, metavar="DIR",
                   help=f"data maps and the compiler cache (default {CACHE_DIR})")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    applied = api.apply(api.load_config(args.config), args.model, data=args.data, steps=args.steps,
                        output=args.output, device=args.device, threads=args.threads,
                        cache_dir=args.cache_dir)
    print(render_applied(applied))
    return 0
