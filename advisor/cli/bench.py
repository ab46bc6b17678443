"""``advisor bench``: benchmarks, each printed as a table and written as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from advisor import bench
from advisor.bench import layers as layers_bench
from advisor.bench import live, search, stopping, stopping_live
from advisor.bench import noise as noise_bench
from advisor.bench import varlen as varlen_bench
from advisor.bench import zoo as zoo_bench
from advisor.dashboard import render
from advisor.errors import AdvisorError
from advisor.report import Progress


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: overhead, techniques alone, workers, search efficiency, "
                       "early stopping, token-budget batching, the zoo, latency under noise, "
                       "per-layer compression",
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
    s = which.add_parser(
        "search", help="samplers against random search and one-at-a-time, over a measured grid",
        description="Measure every configuration of a reduced grid once (resumable), then replay "
                    "each sampler over that table for several seeds and report the hypervolume "
                    "of its front after N trials.")
    s.add_argument("--model", metavar="MODULE:FUNCTION", help="workload (default: the embedded one)")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda")
    s.add_argument("--table-dir", default="studies/search-table", metavar="DIR",
                   help="where the grid's trials are kept; a rerun measures only what is missing "
                        "(default studies/search-table)")
    s.add_argument("--samplers", default=",".join(search.SAMPLERS), metavar="LIST",
                   help=f"comma-separated, from {', '.join(search.SAMPLERS)} (default all)")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="measure the table's trials N at a time, each on its share of the cores (default 1)")
    s.add_argument("--live", action="store_true",
                   help="instead of the table, run real studies of the full space: --seeds studies "
                        "of --live-trials trials per sampler, and one-at-a-time as a study (slow)")
    s.add_argument("--live-trials", type=int, default=30, metavar="N",
                   help="trials per live study (default 30)")
    s.add_argument("--seeds", type=int, metavar="N",
                   help="seeds per sampler (default 10 over the table, 2 live)")
    s.add_argument("--gp-seeds", type=int, default=3, metavar="N",
                   help="seeds for gp, whose replay takes minutes per seed (default 3)")
    s.add_argument("--budgets", metavar="LIST",
                   help="trial budgets to report (default 10,20,30,50,100; live: 10,20,30)")
    s.add_argument("--trial-steps", type=int, metavar="N", help="fine-tune steps per trial")
    s.add_argument("--latency-seconds", type=float, metavar="S", help="timing budget per latency")
    s.add_argument("--trial-timeout", type=float, default=600.0, metavar="SECONDS")
    s.add_argument("--json", metavar="PATH", help="where to write the JSON (default "
                   "studies/bench-search.json; live: studies/bench-search-live.json)")
    s.add_argument("--chart", default="dashboards/search-efficiency.html", metavar="PATH",
                   help="where to write the plotly chart (default dashboards/search-efficiency.html)")
    s.set_defaults(handler=search_bench)
    e = which.add_parser("stopping", help="default studies with and without early stopping, side by side",
                         description="Run --seeds default studies of --trials trials with early stopping and "
                                     "as many without (resumable), then report each one's wall time, "
                                     "trial-seconds and hypervolume, and hypervolume at equal compute. To "
                                     "measure them side by side, run each --arm in its own process pinned to "
                                     "its own cores (taskset), then once more without --arm to report.")
    e.add_argument("--model", metavar="MODULE:FUNCTION", help="workload (default: the embedded one)")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument("--seeds", type=int, default=3, metavar="N", help="studies per arm (default 3)")
    e.add_argument("--trials", type=int, default=20, metavar="N", help="trials per study (default 20)")
    e.add_argument("--arm", choices=("on", "off", "warm"), help="run only the studies with (on) or without "
                   "(off) early stopping; warm: after the on arm, each seed's study warm-started from the next "
                   "seed's on study, against its own on study (JSON to studies/bench-stopping-warm.json)")
    e.add_argument("--dir", default="studies/stopping-live", metavar="DIR",
                   help="where the studies are kept (default studies/stopping-live)")
    e.add_argument("--trial-timeout", type=float, default=600.0, metavar="SECONDS")
    e.add_argument("--json", default="studies/bench-stopping.json", metavar="PATH",
                   help="where to write the JSON (default studies/bench-stopping.json)")
    e.set_defaults(handler=stopping_bench)
    v = which.add_parser("varlen", help="fixed-size batches against token budgets on a variable-length "
                         "workload, the same samples each")
    v.add_argument("--model", default=varlen_bench.TEXT, metavar="MODULE:FUNCTION",
                   help=f"a variable-length workload (default {varlen_bench.TEXT})")
    v.add_argument("--samples", type=int, default=3200, help="training samples per run (default 3200)")
    v.add_argument("--repeats", type=int, default=3, help="runs of each batching (default 3)")
    v.add_argument("--budgets", metavar="N,N,...",
                   help="max_tokens values to compare (default: the space's, and the whole step)")
    v.add_argument("--device", default="auto", help="auto, cpu or cuda")
    v.add_argument("--json", default="studies/bench-varlen.json", metavar="PATH",
                   help="where to write the JSON (default studies/bench-varlen.json)")
    v.set_defaults(handler=varlen)
    z = which.add_parser("zoo", help="every technique option on every zoo model (Hugging Face BERT, GPT-2, "
                         "ViT, T5, Llama-style; a ResNet-style CNN; nn.TransformerEncoder)",
                         description="For each zoo model: the options its search space offers and leaves "
                                     "out (with why), and each offered option run alone as a trial "
                                     "against the model's baseline. Needs transformers.")
    z.add_argument("--models", default=",".join(zoo_bench.MODELS), metavar="LIST",
                   help=f"comma-separated, from {', '.join(zoo_bench.MODELS)} (default all)")
    z.add_argument("--techniques", default=",".join(zoo_bench.TECHNIQUES), metavar="LIST",
                   help=f"comma-separated knobs, from {', '.join(zoo_bench.TECHNIQUES)} (default all)")
    z.add_argument("--device", default="auto", help="auto, cpu or cuda")
    z.add_argument("--trial-steps", type=int, metavar="N", help="fine-tune steps per trial")
    z.add_argument("--latency-seconds", type=float, metavar="S", help="timing budget per latency")
    z.add_argument("--trial-timeout", type=float, default=900.0, metavar="SECONDS")
    z.add_argument("--json", default="studies/bench-zoo.json", metavar="PATH",
                   help="where to write the JSON (default studies/bench-zoo.json)")
    z.set_defaults(handler=zoo)
    y = which.add_parser("layers", help="whole-model against per-layer (sensitivity-guided) quantization "
                         "and structured pruning",
                         description="Each pair (int8-static, qat-int8, and on CUDA int4-weight-only and "
                                     "float8, whole against quant_protect "
                                     f"{layers_bench.PROTECT:g}; structured pruning uniform against "
                                     "prune_alloc sensitivity at ratios "
                                     f"{', '.join(f'{r:g}' for r in layers_bench.STRUCTURED)}) as two trials, "
                                     "in one study per seed; pairs this machine does not offer are listed "
                                     "with the reason.")
    y.add_argument("--model", metavar="MODULE:FUNCTION", help="workload (default: the embedded one)")
    y.add_argument("--device", default="auto", help="auto, cpu or cuda")
    y.add_argument("--seeds", type=int, default=3, help="studies, one per --seed (default 3)")
    y.add_argument("--trial-steps", type=int, metavar="N", help="fine-tune steps per trial")
    y.add_argument("--dir", metavar="PATH", help="keep the studies here (default: a temporary directory)")
    y.add_argument("--trial-timeout", type=float, default=900.0, metavar="SECONDS")
    y.add_argument("--json", default="studies/bench-layers.json", metavar="PATH",
                   help="where to write the JSON (default studies/bench-layers.json)")
    y.set_defaults(handler=layers)
    n = which.add_parser("noise", help="latency ratios of the same configurations on a quiet machine and "
                         "beside busy processes, paired and unpaired",
                         description="Three configurations (the baseline's knobs, int8-static, structured "
                                     "0.5 + int8-static; on CUDA int8-dynamic in place of int8-static) as "
                                     "--repeats trials each on the machine as it is (run it on a quiet "
                                     "one), then as many again while busy processes run on the same cores.")
    n.add_argument("--model", metavar="MODULE:FUNCTION", help="workload (default: the embedded one)")
    n.add_argument("--device", default="auto", help="auto, cpu or cuda")
    n.add_argument("--repeats", type=int, default=5, help="trials per configuration and condition (default 5)")
    n.add_argument("--load", type=int, metavar="N", help="busy processes under load (default: one per core)")
    n.add_argument("--trial-steps", type=int, default=20, metavar="N",
                   help="fine-tune steps per trial (default 20: latency does not depend on them)")
    n.add_argument("--latency-seconds", type=float, metavar="S", help="timing budget per latency")
    n.add_argument("--threads", type=int, metavar="N", help="CPU threads per trial (default: all usable cores)")
    n.add_argument("--trial-timeout", type=float, default=600.0, metavar="SECONDS")
    n.add_argument("--json", default="studies/bench-noise.json", metavar="PATH",
                   help="where to write the JSON (default studies/bench-noise.json)")
    n.set_defaults(handler=noise)


def _names(flag: str, text: str, known) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise AdvisorError(f"{flag} takes comma-separated names from {', '.join(known)}; "
                           f"got {', '.join(unknown) or repr(text)}")
    return names


def zoo(args: argparse.Namespace) -> int:
    models = _names("--models", args.models, zoo_bench.MODELS)
    techniques = tuple(_names("--techniques", args.techniques, zoo_bench.TECHNIQUES))
    settings = {k: v for k, v in (("trial_steps", args.trial_steps),
                                  ("latency_seconds", args.latency_seconds)) if v is not None}
    report = zoo_bench.zoo(models, args.device, techniques=techniques, trial_timeout=args.trial_timeout,
                           progress=Progress, **settings)
    print(zoo_bench.render_zoo(report))
    _write(args.json, report)
    return 0


def noise(args: argparse.Namespace) -> int:
    for flag, value in (("--repeats", args.repeats), ("--load", args.load), ("--trial-steps", args.trial_steps),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            raise AdvisorError(f"{flag} must be a positive integer; got {value}")
    settings = {k: v for k, v in (("trial_steps", args.trial_steps), ("latency_seconds", args.latency_seconds),
                                  ("threads", args.threads)) if v is not None}
    report = noise_bench.noise(args.model, args.device, repeats=args.repeats, load_processes=args.load,
                               trial_timeout=args.trial_timeout, progress=Progress, **settings)
    print(noise_bench.render(report))
    _write(args.json, report)
    return 0


def layers(args: argparse.Namespace) -> int:
    for flag, value in (("--seeds", args.seeds), ("--trial-steps", args.trial_steps)):
        if value is not None and value < 1:
            raise AdvisorError(f"{flag} must be a positive integer; got {value}")
    settings = {"trial_steps": args.trial_steps} if args.trial_steps is not None else {}
    report = layers_bench.layers(args.model, args.device, seeds=args.seeds, study_dir=args.dir,
                                 trial_timeout=args.trial_timeout, progress=Progress, **settings)
    print(layers_bench.render(report))
    _write(args.json, report)
    return 0


def _write(path: str, report: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"JSON: {out}")


def overhead(args: argparse.Namespace) -> int:
    if args.trials < 1:
        raise AdvisorError(f"--trials must be a positive integer; got {args.trials}")
    report = bench.overhead(trials=args.trials, seed=args.seed, progress=Progress)
    print(bench.render(report))
    _write(args.json, report)
    return 0


def knobs(args: argparse.Namespace) -> int:
    settings = {k: v for k, v in (("trial_steps", args.trial_steps),
                                  ("latency_seconds", args.latency_seconds)) if v is not None}
    report = bench.one_at_a_time(args.model, args.device, trial_timeout=args.trial_timeout,
                                 progress=Progress, **settings)
    print(bench.render_knobs(report))
    _write(args.json, report)
    return 0


def workers(args: argparse.Namespace) -> int:
    if args.trials < 1:
        raise AdvisorError(f"--trials must be a positive integer; got {args.trials}")
    report = bench.workers(trials=args.trials, progress=Progress)
    print(bench.render_workers(report))
    _write(args.json, report)
    return 0


def _positive_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise AdvisorError(f"{flag} must be comma-separated positive integers (like 10,30,100); "
                           f"got {text!r}")
    return values


def stopping_bench(args: argparse.Namespace) -> int:
    for flag, value in (("--seeds", args.seeds), ("--trials", args.trials)):
        if value < 1:
            raise AdvisorError(f"{flag} must be a positive integer; got {value}")
    if args.arm == "warm":
        warm = stopping_live.live_warm(args.model, args.device, study_dir=args.dir, seeds=args.seeds,
                                  trials=args.trials, trial_timeout=args.trial_timeout, progress=Progress)
        if warm is None:
            print(f"the on arm's studies are not all in {args.dir} yet: run --arm on first")
            return 0
        print(stopping_live.render_live_warm(warm))
        _write(args.json.replace("bench-stopping.json", "bench-stopping-warm.json"), warm)
        return 0
    arms = (args.arm,) if args.arm else ("on", "off")
    report = stopping_live.live(args.model, args.device, study_dir=args.dir, seeds=args.seeds, trials=args.trials,
                                arms=arms, trial_timeout=args.trial_timeout, progress=Progress)
    if report is None:
        print(f"the other arm's studies are not all in {args.dir} yet: run it (--arm), then this command "
              "without --arm to report")
        return 0
    print(stopping_live.render_live(report))
    _write(args.json, report)
    return 0


def search_bench(args: argparse.Namespace) -> int:
    samplers = tuple(s.strip() for s in args.samplers.split(","))
    unknown = [s for s in samplers if s not in search.SAMPLERS]
    if unknown or not samplers:
        raise AdvisorError(f"--samplers takes a comma-separated list from "
                           f"{', '.join(search.SAMPLERS)}; got {args.samplers!r}")
    default_budgets = "10,20,30" if args.live else ",".join(map(str, search.BUDGETS))
    budgets = _positive_list("--budgets", args.budgets or default_budgets)
    seeds = args.seeds if args.seeds is not None else (2 if args.live else 10)
    for flag, value in (("--seeds", seeds), ("--gp-seeds", args.gp_seeds), ("--live-trials", args.live_trials),
                        ("--workers", args.workers)):
        if value < 1:
            raise AdvisorError(f"{flag} must be a positive integer; got {value}")
    settings = {k: v for k, v in (("trial_steps", args.trial_steps),
                                  ("latency_seconds", args.latency_seconds)) if v is not None}
    if args.live:
        if max(budgets) > args.live_trials:
            raise AdvisorError(f"--budgets must not exceed --live-trials {args.live_trials}; got {args.budgets}")
        report = live.live(args.model, args.device, study_dir="studies/search-live",
                             samplers=samplers, seeds=seeds, trials=args.live_trials, budgets=budgets,
                             trial_timeout=args.trial_timeout, progress=Progress, **settings)
        print(live.render(report))
        _write(args.json or "studies/bench-search-live.json", report)
        return 0
    table = search.measure_table(args.model, args.device, study_dir=args.table_dir, workers=args.workers,
                                 trial_timeout=args.trial_timeout, progress=Progress, **settings)
    _write(str(Path(args.table_dir) / "table.json"), table)
    report = search.compare(table, samplers, seeds=seeds, gp_seeds=args.gp_seeds,
                            budgets=budgets, progress=print)
    report["early_stopping"] = stopping.compare(table, seeds=seeds, progress=print)
    print(search.render(report))
    print()
    print(stopping.render(report["early_stopping"]))
    _write(args.json or "studies/bench-search.json", report)
    chart = Path(args.chart)
    chart.parent.mkdir(parents=True, exist_ok=True)
    chart.write_text(render.search_efficiency(report))
    print(f"chart: {chart}")
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
    report = varlen_bench.varlen(args.model, samples=args.samples, repeats=args.repeats, budgets=budgets,
                                 device=args.device, on_run=lambda line: print(line, flush=True))
    print(varlen_bench.render(report))
    _write(args.json, report)
    return 0
