"""``advisor bench``: benchmarks, each printed as a table and written as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from advisor import bench, bench_varlen
from advisor.errors import AdvisorError
from advisor.report import Progress


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: overhead, each technique alone, local workers, "
                       "token-budget batching",
                       description="Benchmarks, each printed as a table and written as JSON.")
    which = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    o = which.add_parser("overhead", help="split each trial's wall time into measured work and "
                         "fixed cost (default workload, scratch study)")
    o.add_argument("--trials", type=int, default=6, help="trials to time (default 6)")
    o.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    o.add_argument("--json", default="studies/bench-overhead.json", metavar="PATH",
                   help="where to write the JSON (default studies/bench-overhead.json)")
    o.set_defaults(handler=overhead)
    k = which.add_parser("knobs", help="the baseline, then each knob value changed alone")
    k.add_argument("--model", metavar="MODULE:FUNCTION", help="workload (default: the embedded one)")
    k.add_argument("--device", default="auto", help="auto, cpu or cuda")
    k.add_argument("--trial-steps", type=int, metavar="N", help="fine-tune steps per trial")
    k.add_argument("--latency-seconds", type=float, metavar="S", help="timing budget per latency")
    k.add_argument("--trial-timeout", type=float, default=600.0, metavar="SECONDS")
    k.add_argument("--json", default="studies/bench-knobs.json", metavar="PATH",
                   help="where to write the JSON (default studies/bench-knobs.json)")
    k.set_defaults(handler=knobs)
    w = which.add_parser("workers", help="trials per hour with 1 and 2 local workers")
    w.add_argument("--trials", type=int, default=8, help="trials per run (default 8)")
    w.add_argument("--json", default="studies/bench-workers.json", metavar="PATH",
                   help="where to write the JSON (default studies/bench-workers.json)")
    w.set_defaults(handler=workers)
    v = which.add_parser("varlen", help="fixed-size batches against token budgets on a variable-length "
                         "workload, the same samples each")
    v.add_argument("--model", default=bench_varlen.TEXT, metavar="MODULE:FUNCTION",
                   help=f"a variable-length workload (default {bench_varlen.TEXT})")
    v.add_argument("--samples", type=int, default=3200, help="training samples per run (default 3200)")
    v.add_argument("--repeats", type=int, default=3, help="runs of each batching (default 3)")
    v.add_argument("--budgets", metavar="N,N,...",
                   help="max_tokens values to compare (default: the space's, and the whole step)")
    v.add_argument("--device", default="auto", help="auto, cpu or cuda")
    v.add_argument("--json", default="studies/bench-varlen.json", metavar="PATH",
                   help="where to write the JSON (default studies/bench-varlen.json)")
    v.set_defaults(handler=varlen)


def _write(path: str, report: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"JSON: {out}")


def overhead(args: argparse.Namespace) -> int:
    if args.trials < 1:
        raise AdvisorError(f"--trials must be a positive integer; got {args.trials}")
    report = bench.overhead(trials=args.trials, seed=args.seed, progress=Progress(args.trials))
    print(bench.render(report))
    _write(args.json, report)
    return 0


def knobs(args: argparse.Namespace) -> int:
    settings = {k: v for k, v in (("trial_steps", args.trial_steps),
                                  ("latency_seconds", args.latency_seconds)) if v is not None}
    report = bench.one_at_a_time(args.model, args.device, trial_timeout=args.trial_timeout,
                                 **settings)
    print(bench.render_knobs(report))
    _write(args.json, report)
    return 0


def workers(args: argparse.Namespace) -> int:
    if args.trials < 1:
        raise AdvisorError(f"--trials must be a positive integer; got {args.trials}")
    report = bench.workers(trials=args.trials)
    print(bench.render_workers(report))
    _write(args.json, report)
    return 0


def varlen(args: argparse.Namespace) -> int:
    budgets = None
    if args.budgets:
        try:
            budgets = [int(b) for b in args.budgets.split(",")]
        except ValueError:
            raise AdvisorError(f"--budgets must be integers separated by commas; got {args.budgets!r}") from None
        if any(b < 1 for b in budgets):
            raise AdvisorError(f"--budgets must be positive token counts; got {args.budgets!r}")
    report = bench_varlen.varlen(args.model, samples=args.samples, repeats=args.repeats, budgets=budgets,
                                 device=args.device, on_run=lambda line: print(line, flush=True))
    print(bench_varlen.render(report))
    _write(args.json, report)
    return 0
