"""Every technique on every model of the zoo (``advisor/examples/zoo.py``): which options the
search space offers each architecture, which it leaves out and why, and what each offered
option did when run alone as a real trial, against that model's own baseline.

Each model gets one study (a trial process per option, as ``advisor run`` runs them); the
options are the space's own: every offered value of the categorical knobs, and one
representative value of each numeric one (accumulation 4, checkpointing every block, pruning
ratio 0.5, distillation alpha 0.7 at temperature 4, every offered token budget).
"""

from __future__ import annotations

from pathlib import Path

from advisor.bench.knobs import label, one_at_a_time
from advisor.bench.progress import Progress, silent
from advisor.space import Space
from advisor.texttable import table

REF = "advisor.examples.zoo:{}"
MODELS = ("bert", "gpt2", "vit", "t5", "llama", "resnet", "encoder")
TECHNIQUES = ("precision", "accumulation", "checkpoint_every", "compile", "prune_kind",
              "quantization", "distill_alpha", "max_tokens")


def options(search: Space, techniques: tuple[str, ...] = TECHNIQUES) -> list[dict]:
    """One partial configuration per option the space offers, the baseline's values aside."""
    configs: list[dict] = []
    for knob in techniques:
        values = search.values.get(knob, ())
        if knob == "accumulation":
            configs += [{knob: 4 if 4 in values else max(values)}] if len(values) > 1 else []
        elif knob == "checkpoint_every":
            configs += [{knob: min(v for v in values if v)}] if any(values) else []
        elif knob == "prune_kind":
            configs += [{knob: v, "prune_ratio": 0.5} if v in ("unstructured", "structured") else {knob: v}
                        for v in values if v != "none"]
        elif knob == "distill_alpha":
            configs.append({"distill_alpha": 0.7, "distill_temperature": 4.0})
        elif knob == "max_tokens":
            configs += [{knob: v} for v in values if v]
        else:
            configs += [{knob: v} for v in values if v not in ("fp32", "none")]
    return configs


def zoo(models: list[str], device: str = "auto", *, study_dir: str | None = None,
        techniques: tuple[str, ...] = TECHNIQUES, progress: Progress = silent, **settings) -> dict:
    """The zoo table's report: per model, its baseline, one row per option, its exclusions."""
    out = []
    for name in models:
        if study_dir:
            (Path(study_dir) / name).mkdir(parents=True, exist_ok=True)
        report = one_at_a_time(REF.format(name), device,
                               study_dir=str(Path(study_dir) / name) if study_dir else None,
                               progress=progress, configs=lambda s: options(s, techniques), **settings)
        excluded = [e for e in report["excluded"] if e["knob"] in techniques]
        out.append({"model": name, "rows": report["rows"], "excluded": excluded,
                    "hardware": report["hardware"], "settings": report["settings"]})
    return {"models": out, "techniques": list(techniques)}


def render_zoo(report: dict) -> str:
    cols = ["model", "option", "status", "accuracy (delta)", "latency ms", "size MiB", "parameters", "notes"]
    rows = []
    for m in report["models"]:
        for r in m["rows"]:
            if not r["ok"]:
                rows.append([m["model"], r["config"], "failed", "", "", "", "", r["reason"][:90]])
                continue
            base = r["config"].startswith("baseline")
            rows.append([m["model"], "baseline" if base else r["config"], "ran",
                         f"{r['accuracy']:.3f}" + ("" if base else f" ({100 * r['accuracy_delta']:+.1f})"),
                         _cell(r["latency_ms"], base), _cell(r["size_mib"], base),
                         _cell(r["parameters"], base, ".3g"), _notes(r.get("compression", {}))])
        for e in m["excluded"]:
            value = label({e["knob"]: e["value"]}) if e["value"] != "*" else e["knob"]
            rows.append([m["model"], value, "excluded", "", "", "", "", e["reason"][:90]])
    first = report["models"][0] if report["models"] else None
    head = "The zoo: each technique option alone, ratios to each model's baseline"
    if first:
        hw, s = first["hardware"], first["settings"]
        head += (f" ({hw['device']}: {hw['name']}, torch {hw['torch_version']}; {s['trial_steps']} "
                 f"fine-tune steps, latency at batch {s['latency_batch']}, its ratio paired: timed "
                 f"interleaved with the baseline's model in the trial's process)")
    return head + "\n" + table(cols, rows, right={3, 4, 5, 6})


def _cell(pair: dict, base: bool, fmt: str = ".3g") -> str:
    text = f"{pair['value']:{fmt}}"
    if base or pair["ratio"] is None:
        return text
    if "low" in pair:  # a paired ratio, with its interval
        return f"{text} ({pair['ratio']:.2f}x, {pair['low']:.2f}-{pair['high']:.2f})"
    return f"{text} ({pair['ratio']:.2f}x)"


def _notes(c: dict) -> str:
    notes = []
    if c.get("heads_before") is not None:
        notes.append(f"heads {c['heads_before']}->{c['heads_after']}")
    if c.get("heads_kept_whole"):
        notes.append("heads kept: " + "; ".join(c["heads_kept_whole"]))
    if c.get("quantized_layers"):
        before, after = c["quantized_bytes"]
        notes.append(f"{c['quantized_layers']} layers {before / max(after, 1):.1f}x smaller")
    if c.get("sparsity") is not None:
        notes.append(f"sparsity {c['sparsity']:.2f}")
    return ", ".join(notes)
