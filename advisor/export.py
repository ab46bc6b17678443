"""The exported recommendation: a versioned YAML file a person can read and diff.

``write`` turns a :class:`~advisor.recommend.Recommendation` into the file; ``load_config``
reads one back and validates every field (an unknown key, a wrong type, a knob value no
technique knows, or a schema newer than this advisor reads each get one line naming the
field), so ``advisor apply`` never acts on a half-understood file.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import math
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import yaml

from advisor import knobs as table
from advisor.constraints import LIMITS, Constraints
from advisor.errors import AdvisorError
from advisor.knobs import Knobs
from advisor.objectives import NAMES
from advisor.recommend import GOALS, Recommendation
from advisor.study import storage
from advisor.study.record import StudyRecord
from advisor.techniques.layers import NO_PLAN, LayerPlan
from advisor.version import __version__

SCHEMA = 3  # 2: the trial's paired latency ratios ("paired"); 3: its per-layer choice ("layers")
KEYS = ("advisor_config", "goal", "feasible", "knobs", "measured", "baseline", "constraints",
        "provenance", "serving", "paired", "layers")
REQUIRED = KEYS[:-3]  # "serving" only in configs of serving studies, "paired" from schema 2, "layers" 3
PAIRED = ("latency", "latency_batch1", "serving_p99")  # each: ratio, low, high (its interval), rounds
SERVING = ("rate", "requests", "counted", "deadline_ms", "max_batch", "max_wait_ms", "p50_ms", "p99_ms",
           "throughput_rps", "overload_share", "saturated")
_MEASURED_SERVING = SERVING[3:]  # copied from the trial's result; "requests" is the study's setting
PROVENANCE = ("study", "trial", "storage", "completed", "workload", "device", "device_name",
              "torch", "torchao", "advisor", "settings", "measured_at", "exported_at")


@dataclass(frozen=True)
class Config:
    """A loaded, validated recommendation file."""

    knobs: Knobs
    measured: dict
    baseline: dict
    constraints: Constraints
    goal: str
    feasible: bool
    provenance: dict
    # the trial's latency ratios to the baseline, timed interleaved with it (empty before schema 2)
    paired: dict = field(default_factory=dict)
    layers: LayerPlan = NO_PLAN  # the layers kept out of quantization (none before schema 3)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def to_dict(rec: Recommendation, study: optuna.Study | StudyRecord, storage_url: str) -> dict:
    """The file's content for ``rec``, a recommendation from ``study``."""
    record = StudyRecord.of(study)
    hw = record.hardware
    trial = record.trial(rec.number)
    workload = record.workload
    served = (trial.result or {}).get("serving")
    serving = {} if not served else {"serving": {
        "rate": served.get("rate"),
        "requests": record.settings.get("serving_requests"),  # simulated
        "counted": served.get("requests"),  # after the warm-up: what p50, p99 and the overload share are over
        **{k: served[k] for k in _MEASURED_SERVING if k in served}}}
    return {
        "advisor_config": SCHEMA,
        "goal": rec.goal,
        "feasible": rec.feasible,
        "knobs": Knobs.from_dict(rec.params).to_dict(),
        "measured": {k: float(rec.metrics[k]) for k in NAMES},
        "baseline": {k: float(rec.baseline[k]) for k in NAMES},
        "constraints": rec.constraints.to_dict(),
        "provenance": {
            "study": rec.study,
            "trial": rec.number,
            "storage": storage.display(storage_url),
            "completed": rec.completed,
            "workload": {k: workload.get(k) for k in ("name", "model", "data")},
            "device": hw.get("device"),
            "device_name": hw.get("name"),
            "torch": hw.get("torch_version"),
            "torchao": _version("torchao"),
            "advisor": __version__,
            "settings": record.settings,
            "measured_at": trial.completed_at.isoformat(timespec="seconds")
            if trial.completed_at else None,
            "exported_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        },
        **serving,
        "paired": {k: {f: v[f] for f in ("ratio", "low", "high", "rounds")}
                   for k, v in ((trial.result or {}).get("paired") or {}).items() if k in PAIRED},
        "layers": LayerPlan.from_dict((trial.result or {}).get("layers")).to_dict(),
    }


def write(content: dict, path: str | Path) -> Path:
    path = Path(path)
    header = (f"# advisor recommendation (schema {SCHEMA}): trial #{content['provenance']['trial']} of "
              f"study {content['provenance']['study']!r}.\n"
              f"# Rebuild it on your workload: advisor apply {path.name} --model MODULE:FUNCTION\n")
    body = yaml.safe_dump(content, sort_keys=False, default_flow_style=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + body)
    except OSError as exc:
        raise AdvisorError(f"cannot write {path}: {exc.strerror or exc}; choose another -o PATH") from None
    return path


def load_config(path: str | Path) -> Config:
    """Read and validate a recommendation file written by :func:`write`."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise AdvisorError(f"cannot read {where}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise AdvisorError(f"{where} is not a text file; pass the YAML file advisor export wrote") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise AdvisorError(f"{where} is not valid YAML{line}; export it again with advisor export") from None
    return from_dict(data, where)


def from_dict(data: object, where: str = "config") -> Config:
    if not isinstance(data, dict) or "advisor_config" not in data:
        raise AdvisorError(f"{where} is not an advisor config (no advisor_config field); "
                           f"write one with advisor export")
    version = data["advisor_config"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise AdvisorError(f"{where}: advisor_config must be an integer schema version; got {version!r}")
    if version > SCHEMA:
        raise AdvisorError(f"{where} has schema {version}, newer than this advisor {__version__} reads "
                           f"({SCHEMA}); upgrade advisor")
    _keys(data, KEYS, where, required=REQUIRED)
    goal = data["goal"]
    if goal not in GOALS:
        raise AdvisorError(f"{where}: goal must be one of {', '.join(GOALS)}; got {goal!r}")
    if not isinstance(data["feasible"], bool):
        raise AdvisorError(f"{where}: feasible must be true or false; got {data['feasible']!r}")
    knobs = _knobs(data["knobs"], where)
    measured = _objectives(data["measured"], f"{where}: measured")
    baseline = _objectives(data["baseline"], f"{where}: baseline")
    constraints = _constraints(data["constraints"], where)
    provenance = data["provenance"]
    _keys(provenance, PROVENANCE, f"{where}: provenance")
    if "serving" in data:
        _keys(data["serving"], SERVING, f"{where}: serving")
    paired = data.get("paired") or {}
    _keys(paired, PAIRED, f"{where}: paired")
    for key, pair in paired.items():
        _keys(pair, ("ratio", "low", "high", "rounds"), f"{where}: paired.{key}",
              required=("ratio", "low", "high"))
        for field_name in ("ratio", "low", "high"):
            value = pair[field_name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise AdvisorError(f"{where}: paired.{key}.{field_name} must be a positive number; got {value!r}")
    layers = _layers(data.get("layers"), knobs, where)
    return Config(knobs=knobs, measured=measured, baseline=baseline, constraints=constraints,
                  goal=goal, feasible=data["feasible"], provenance=dict(provenance), paired=dict(paired),
                  layers=layers)


def _layers(section: object, knobs: Knobs, where: str) -> LayerPlan:
    """The per-layer choice; a file whose knobs make one must hold it."""
    per_layer = [f"{name} is {value}" for name, value, default in (
        ("knobs.quant_protect", f"{knobs.quant_protect:g}", "0"),
        ("knobs.prune_alloc", knobs.prune_alloc, "uniform")) if value != default]
    if section is None:
        if per_layer:
            raise AdvisorError(f"{where}: {per_layer[0]} but the file has no layers section with the "
                               f"per-layer choice; export it again with advisor export")
        return NO_PLAN
    _keys(section, ("protected", "prune_ratios"), f"{where}: layers", required=("protected", "prune_ratios"))
    try:
        plan = LayerPlan.from_dict(section)
    except AdvisorError as exc:
        raise AdvisorError(f"{where}: {exc}") from None
    if knobs.prune_alloc == "sensitivity" and not plan.prune_ratios:
        raise AdvisorError(f"{where}: knobs.prune_alloc is sensitivity but layers.prune_ratios is empty; "
                           f"export it again with advisor export")
    return plan


def _keys(section: object, known: tuple[str, ...], where: str, required: tuple[str, ...] = ()) -> None:
    if not isinstance(section, dict):
        raise AdvisorError(f"{where} must be a mapping; got {type(section).__name__}")
    for key in section:
        if key not in known:
            raise AdvisorError(f"{where}: unknown key {key!r}; the keys are {', '.join(known)}")
    for key in required:
        if key not in section:
            raise AdvisorError(f"{where}: missing key {key!r}")


def _knobs(section: object, where: str) -> Knobs:
    """Every knob of the table: its type, and present unless added after the first schema
    (``Knob.original``), when a missing one means its default."""
    types = {k.name: k.type for k in table.table()}
    _keys(section, tuple(types), f"{where}: knobs",
          required=tuple(k.name for k in table.table() if k.original))
    values = {}
    for name, kind in types.items():
        if name not in section:
            continue
        value = section[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise AdvisorError(f"{where}: knobs.{name} must be a {kind.__name__}; got {value!r}")
        values[name] = value
    try:
        return Knobs(**values)
    except (ValueError, TypeError) as exc:
        raise AdvisorError(f"{where}: knobs: {exc}") from None


def _objectives(section: object, where: str) -> dict:
    _keys(section, NAMES, where, required=NAMES)
    for name, value in section.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AdvisorError(f"{where}.{name} must be a number; got {value!r}")
    return {k: float(v) for k, v in section.items()}


def _constraints(section: object, where: str) -> Constraints:
    keys = tuple(limit.key for limit in LIMITS)
    _keys(section, keys, f"{where}: constraints", required=keys)
    try:
        return Constraints(**section)
    except AdvisorError as exc:
        raise AdvisorError(f"{where}: constraints: {exc}") from None
