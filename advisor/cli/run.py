"""``advisor run``: search the techniques for a workload and print the Pareto front."""

from __future__ import annotations

import argparse
import shlex
import sys

from advisor import dashboard, recommend, report
from advisor.cli import common
from advisor.files import CACHE_DIR
from advisor.study import RunOptions, load, run, storage
from advisor.workload import DEFAULT_MODEL


def register(sub) -> None:
    p = sub.add_parser("run", help="run or resume a study",
                       description="Run (or resume) a study: each trial fine-tunes your model "
                       "under a set of techniques in its own process and measures accuracy, "
                       "latency, memory and size.")
    p.add_argument("--model", metavar="MODULE:FUNCTION",
                   help=f"function returning an advisor.Workload or a torch.nn.Module "
                        f"(default: the embedded {DEFAULT_MODEL})")
    p.add_argument("--data", metavar="MODULE:FUNCTION",
                   help="function returning (train, val) datasets, when --model returns a bare Module")
    p.add_argument("--trials", type=int, default=20, help="trials to add in this run (default 20)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="trials to run at once on this machine, each on its own CPU cores (or GPU); "
                        "this run's --trials are shared among them (default 1)")
    p.add_argument("--study-trials", type=int, metavar="N",
                   help="also stop when the study holds N trials, counting every worker's on every "
                        "machine: the budget of a study shared by several advisor run processes")
    common.add_study(p, help="study name (default: the workload's name)")
    p.add_argument("--time-budget", type=duration, metavar="DURATION",
                   help="stop starting trials this long after the run started, the baseline "
                        "included (90s, 20m, 1.5h; the running ones finish), next to --trials: "
                        "whichever comes first")
    p.add_argument("--no-early-stop", dest="early_stop", action="store_false",
                   help="run every trial to the end: no stopping at the rungs of its fine-tune "
                        "(default: a trial dominated at a rung, or far outside a constraint, stops)")
    p.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                   help="a new study starts cold (default: it first tries, measured anew, the fronts "
                        "of earlier studies of the same workload on this kind of machine in the storage; "
                        "never when --try gives knobs to try first)")
    p.add_argument("--sampler", default="tpe", help="tpe (multivariate, default), nsga2, gp or random")
    p.add_argument("--seed", type=int, help="seed of the sampler, for reproducible knobs")
    p.add_argument("--try", dest="enqueue", action="append", type=knob_values, default=[],
                   metavar="KNOB=VALUE,...",
                   help="knobs to try first, e.g. quantization=int8-static,prune_kind=structured,"
                        "prune_ratio=0.5 (repeatable: one trial each; the sampler fills the rest)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA when present), cpu or cuda")
    p.add_argument("--trial-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a trial running longer is stopped and recorded as failed (default 600)")
    p.add_argument("--heartbeat", type=int, default=10, metavar="SECONDS",
                   help="a running trial records a heartbeat this often; one silent for twice "
                        "as long (its worker was killed) is failed and retried once (default 10)")
    p.add_argument("--trial-memory-mb", type=float, metavar="MIB",
                   help="memory a trial may allocate beyond what its process starts with (CPU: "
                        "an address-space limit; CUDA: a share of the device); past it the trial "
                        "fails as out of memory and the study goes on (default: no limit)")
    p.add_argument("--trial-steps", type=int, metavar="N",
                   help="optimizer steps of each trial's fine-tune (default 60)")
    p.add_argument("--baseline-steps", type=int, metavar="N",
                   help="optimizer steps to train the baseline when trained=False (default 300)")
    p.add_argument("--lr", type=float, help="AdamW peak learning rate of the baseline; trials "
                   "search 0.1x to 3x of it (default 1e-3)")
    p.add_argument("--latency-batch", type=int, metavar="N",
                   help="serving batch size of the latency objective (default: the workload's batch_size)")
    p.add_argument("--latency-seconds", type=float, metavar="S",
                   help="timing budget of each latency measurement (default 0.5)")
    p.add_argument("--serving-rate", type=float, metavar="REQUESTS_PER_S",
                   help="measure latency as a server sees it: requests arrive as a Poisson process "
                        "at this rate, a dynamic batcher groups them (its max batch and max wait "
                        "join the search), and the latency objective becomes p99 request latency "
                        "(default: off)")
    p.add_argument("--serving-requests", type=int, metavar="N",
                   help="requests simulated per trial under --serving-rate (default 2000)")
    p.add_argument("--serving-deadline-ms", type=float, metavar="MS",
                   help="a served request slower than this counts as late, in the overload share "
                        "(default 100)")
    p.add_argument("--threads", type=int, help="CPU threads per trial (default: all usable cores)")
    p.add_argument("--cache-dir", default=CACHE_DIR, metavar="DIR",
                   help=f"data maps, baseline weights, logs and the compiler cache (default {CACHE_DIR})")
    common.add_constraints(p)
    p.set_defaults(handler=main)


def knob_values(text: str) -> dict:
    """``quantization=int8-static,prune_ratio=0.5`` -> ``{"quantization": "int8-static", ...}``;
    the values are checked against the search space when the study opens."""
    values: dict = {}
    for pair in text.split(","):
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise argparse.ArgumentTypeError(
                f"expected KNOB=VALUE pairs separated by commas (for example "
                f"quantization=int8-static,prune_ratio=0.5); got {text!r}")
        values[name.strip()] = _number(value.strip())
    return values


UNITS = {"s": 1, "m": 60, "h": 3600}


def duration(text: str) -> float:
    """``90s``, ``20m``, ``1.5h`` or plain seconds -> seconds."""
    value, unit = (text[:-1], text[-1]) if text[-1:].lower() in UNITS else (text, "s")
    try:
        seconds = float(value) * UNITS[unit.lower()]
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive duration such as 90s, 20m or 1.5h; got {text!r}")
    return seconds


def _number(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def options_from(args: argparse.Namespace) -> RunOptions:
    fields = RunOptions.__dataclass_fields__
    return RunOptions(**{k: v for k, v in vars(args).items() if k in fields})


def next_commands(study_name: str, url: str) -> str:
    where = "" if url == storage.DEFAULT_URL else f" --storage {shlex.quote(storage.display(url))}"
    name = shlex.quote(study_name)
    return "\n".join([
        "Next:",
        f"  advisor run --study {name}{where} --trials 12   # add trials to this study",
        f"  advisor show --study {name}{where}              # this report again",
        f"  advisor export --study {name}{where} -o recommended.yaml   # the recommendation, as a file",
        f"  advisor dashboard --study {name}{where}         # the dashboard again",
        f"  optuna best-trials --study-name {name} --storage {shlex.quote(storage.display(url))}",
    ])


def main(args: argparse.Namespace) -> int:
    options = options_from(args)
    progress = report.Progress(options.trials)
    result = run(options, progress)
    loaded = load(result.study_name, options.storage)
    rec = recommend.recommend_if_any(loaded)  # once: its knob importance takes seconds
    print(report.study_report(loaded, rec=rec))
    print()
    print(f"Dashboard: {dashboard.write(loaded, rec=rec)}")
    print(next_commands(result.study_name, options.storage))
    if result.out_of_time:
        ran = result.completed + result.failed + result.stopped
        print(f"advisor: --time-budget reached after {ran} trial{'' if ran == 1 else 's'}; run again "
              f"to add more", file=sys.stderr)
    if result.interrupted:
        print("advisor: interrupted; the trials above are stored, run again to resume",
              file=sys.stderr)
        return 130
    return 0
