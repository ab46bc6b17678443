"""Whole-model against sensitivity-guided compression, one technique at a time.

For each pair in ``PAIRS`` the two configurations run as trials of one study per seed (the
study's measurement seed, ``Settings.seed``: data order and initialization of every trial): the whole-model version
(every layer int8, or the same structured ratio everywhere) and its per-layer version
(``quant_protect``: the most sensitive layers kept in fp32; ``prune_alloc`` sensitivity: the
same parameter reduction spread by sensitivity, ``techniques/layers.py``). Accuracy is on the
whole validation split (no choice is made here, so both of its parts are unbiased), as the
drop in points from the study's baseline; latency is the paired ratio; size the weights' bytes.

The goal (issue 17): where the whole-model version loses more than 1 point, the guided one at
equal size loses at most half as many. A structured pair is at equal size by construction (at
least the same parameters removed); a quantization pair is not (the kept layers stay fp32),
so its size ratio is shown beside it.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from advisor.bench.knobs import label
from advisor.bench.offered import split_offered, workload_space
from advisor.bench.progress import Progress, silent
from advisor.knobs import Knobs
from advisor.study import RunOptions, load, run, storage
from advisor.techniques.schedule import DEFAULT_LR
from advisor.texttable import table

PROTECT = 0.2
STRUCTURED = (0.5, 0.6, 0.7, 0.8)
# int4 and float8 weight-only have kernels on CUDA only: elsewhere the table lists them as not offered.
QUANTIZED = ("int8-static", "qat-int8", "int4-weight-only", "float8")
PAIRS = (
    *(({"quantization": mode}, {"quantization": mode, "quant_protect": PROTECT}) for mode in QUANTIZED),
    *(({"prune_kind": "structured", "prune_ratio": r},
       {"prune_kind": "structured", "prune_ratio": r, "prune_alloc": "sensitivity"}) for r in STRUCTURED),
)
LOSS_GOAL = 1.0  # points: where the whole-model version loses more, the guided one must halve it


def layers(model: str | None = None, device: str = "auto", *, seeds: int = 3, study_dir: str | None = None,
           progress: Progress = silent, **settings) -> dict:
    """Each offered pair of ``PAIRS`` as two trials, in one study per seed (a study already
    holding them in ``study_dir`` is read, not run again)."""
    lr = settings.get("lr") or DEFAULT_LR
    with tempfile.TemporaryDirectory(prefix="advisor-layers-") as tmp:
        root = Path(study_dir or tmp)
        hw, workload, search = workload_space(model, device, root / "cache" / "space", lr)
        configs = [c for pair in PAIRS for c in pair]
        runnable, left_out = split_offered(configs, search)
        pairs = [p for p in PAIRS if p[0] in runnable and p[1] in runnable]
        base = Knobs(lr=lr).to_dict()
        queued = [{**base, **c} for pair in pairs for c in pair]
        url = f"sqlite:///{root / 'layers.db'}"
        records = []
        for seed in range(seeds):
            name = f"layers-seed{seed}"
            if _finished(name, url) >= len(queued):  # kept in --dir by an earlier run: reported again
                records.append(load(name, url))
                continue
            run(RunOptions(model=model, device=device, trials=len(queued), enqueue=queued, storage=url,
                           cache_dir=str(root / "cache"), study=name, sampler="random", seed=seed,
                           trial_seed=seed, early_stop=False, **settings), progress(len(queued)))
            records.append(load(name, url))
    rows = [_row(pair, [_pair_trials(r, i) for r in records]) for i, pair in enumerate(pairs)]
    first = records[0]
    return {"hardware": hw.to_dict(), "workload": workload.name, "settings": first.settings, "seeds": seeds,
            "baseline": [_accuracy(r.baseline) for r in records],
            "sensitivity_s": [r.baseline["sensitivity"]["seconds"] for r in records],
            "rows": rows, "left_out": [{"config": label(c), "reason": why} for c, why in left_out],
            "goal": _goal(rows)}


def _finished(name: str, url: str) -> int:
    """Trials ``name`` holds that ended (0 when the storage has no such study)."""
    if name not in storage.study_names(storage.open_storage(url)):
        return 0
    return sum(1 for t in load(name, url).trials if t.state in ("complete", "fail"))


def _pair_trials(record, index: int) -> tuple:
    trials = record.trials
    return record.baseline, trials[2 * index], trials[2 * index + 1]


def _accuracy(result: dict) -> float:
    """The metric on the whole validation split: its two parts, weighted by their sizes."""
    confirmation = result["confirmation"]
    selection, held_out = confirmation["samples"]
    whole = result["metrics"]["accuracy"] * selection + (confirmation["accuracy"] or 0.0) * held_out
    return whole / (selection + held_out)


def _side(baseline: dict, trial) -> dict:
    if trial.result is None:
        return {"failed": trial.failure.get("reason", trial.state)}
    result = trial.result
    paired = (result.get("paired") or {}).get("latency") or {}
    return {"drop_points": 100 * (_accuracy(baseline) - _accuracy(result)),
            "latency_ratio": paired.get("ratio"),
            "size_ratio": result["size_bytes"] / baseline["size_bytes"],
            "parameters": result["compression"].get("parameters_after"),
            "layers": result.get("layers") or {}}


def _row(pair: tuple[dict, dict], seeds: list[tuple]) -> dict:
    row: dict = {"configs": {"whole": label(pair[0]), "guided": label(pair[1])}}
    for side, at in (("whole", 1), ("guided", 2)):
        runs = [_side(s[0], s[at]) for s in seeds]
        done = [r for r in runs if "failed" not in r]
        row[side] = {"runs": runs, **{key: statistics.median(r[key] for r in done) if done else None
                                      for key in ("drop_points", "latency_ratio", "size_ratio")}}
    whole, guided = row["whole"]["drop_points"], row["guided"]["drop_points"]
    row["applies"] = whole is not None and whole > LOSS_GOAL
    row["met"] = (guided <= whole / 2) if row["applies"] and guided is not None else None
    return row


def _goal(rows: list[dict]) -> dict:
    judged = [r for r in rows if r["applies"]]
    return {"rule": f"where the whole-model version loses more than {LOSS_GOAL:g} point (median over "
                    f"seeds), the guided one loses at most half as many",
            "judged": len(judged), "met": sum(1 for r in judged if r["met"]),
            "all_met": all(r["met"] for r in judged) if judged else None}


def _choice(side: dict) -> str:
    """What the guided trial changed, on the first seed that ran: the layers it kept out of
    quantization, or the range of its per-unit pruning ratios."""
    done = [r for r in side["runs"] if "failed" not in r]
    if not done:
        return "-"
    chosen = done[0]["layers"]
    if chosen.get("prune_ratios"):
        ratios = chosen["prune_ratios"].values()
        return f"{min(ratios):g}-{max(ratios):g} over {len(chosen['prune_ratios'])} units"
    return f"kept {len(chosen.get('protected', ()))} layers"


def render(report: dict) -> str:
    def cell(side: dict, key: str, fmt: str) -> str:
        value = side[key]
        return "-" if value is None else format(value, fmt)

    rows = []
    for r in report["rows"]:
        w, g = r["whole"], r["guided"]
        verdict = "-" if not r["applies"] else ("met" if r["met"] else "NOT met")
        rows.append([r["configs"]["guided"], cell(w, "drop_points", "+.2f"), cell(g, "drop_points", "+.2f"),
                     cell(w, "latency_ratio", ".2f"), cell(g, "latency_ratio", ".2f"),
                     cell(w, "size_ratio", ".3f"), cell(g, "size_ratio", ".3f"), _choice(g), verdict])
    hw, s = report["hardware"], report["settings"]
    base = statistics.median(report["baseline"])
    head = (f"Whole-model against per-layer (sensitivity-guided) compression: {report['workload']} on "
            f"{hw.get('device')} ({hw.get('name')}); {report['seeds']} seeds (one study each), medians; "
            f"{s['trial_steps']}-step fine-tunes; accuracy drop in points from the baseline "
            f"({base:.4f}) on the whole validation split; latency: paired ratio at batch "
            f"{s['latency_batch']}; size: the weights' bytes over the baseline's. Sensitivity measured "
            f"in {statistics.median(report['sensitivity_s']):.1f} s per study")
    cols = ["guided configuration", "drop whole", "drop guided", "lat whole", "lat guided",
            "size whole", "size guided", "guided chose (seed 0)", "goal"]
    lines = [head, table(cols, rows, right=set(range(1, 7)))]
    for item in report["left_out"]:
        lines.append(f"not offered here: {item['config']}: {item['reason']}")
    g = report["goal"]
    state = "no pair loses that much" if g["all_met"] is None else ("MET" if g["all_met"] else "NOT met")
    lines.append(f"goal: {g['rule']}: {state} ({g['met']} of {g['judged']} pairs)")
    return "\n".join(lines)
