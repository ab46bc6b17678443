"""Warm start: a new study first tries the fronts of earlier studies of its workload on its
kind of machine.

A new study (never a resumed one) looks in its storage for *sources*: studies this advisor
made (the same study format) of a workload of the same name (the same model function; its
weights, data or measurement settings may differ: a new checkpoint, more data, a longer
fine-tune), over the same search space, on a machine of the same kind
(``hardware.differences``: device, CPU or GPU model, cores, threads, torch and library
versions), with a measured baseline. Their trials that meet the new study's constraints
are pooled, compared in cost ratios to each one's own baseline (so two studies of similar
workloads compare), and ``pick`` chooses up to ``LIMIT`` of them greedily by the hypervolume each adds; each is
enqueued, with the knobs it sampled, as one of the new study's first trials. Nothing is
copied: each is measured anew, against the new study's baseline, and the sampler goes on
from those measurements.

``advisor bench search`` replays the same ``pick`` over its table (``bench/stopping.py``)
to show what it is worth; ``--no-warm-start`` (``RunOptions.warm_start=False``) turns it off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import optuna

from advisor import hardware, objectives, space
from advisor.constraints import Constraints
from advisor.knobs import Knobs
from advisor.study import record

LIMIT = 3  # configurations a warm start enqueues at most: over the search table, as good as 5, 8 or 20
# The box the hypervolume is taken in, in cost ratios (lower is better): the search
# benchmark's, 0.8x the baseline's accuracy (a cost of 1.25), twice its latency, memory and
# size; a point outside adds nothing.
REFERENCE = objectives.cost_box()


def pick(candidates: Sequence[Sequence[float]], keys: Sequence[str], limit: int = LIMIT) -> list[int]:
    """The indices of up to ``limit`` of ``candidates`` (cost ratios in the objectives'
    order), chosen greedily: each time the one adding most hypervolume to those already
    chosen. A configuration (``keys``: ``Knobs.describe``) met twice counts once, at its first
    costs; one adding nothing (dominated by those chosen, or outside the box) is not chosen."""
    ref = [REFERENCE[name] for name in objectives.NAMES]
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    left = sorted(first.values())
    chosen: list[int] = []
    volume = 0.0
    while left and len(chosen) < limit:
        picked = [np.asarray(candidates[i], dtype=float) for i in chosen]
        gains = [objectives.hypervolume([*picked, np.asarray(candidates[i], dtype=float)], ref) for i in left]
        best = int(np.argmax(gains))
        if gains[best] <= volume:
            break
        volume = gains[best]
        chosen.append(left.pop(best))
    return chosen


def sources(rdb: optuna.storages.BaseStorage, study_name: str, info: dict, machine: dict,
            space_dict: dict, study_format: int) -> list[record.StudyRecord]:
    """The earlier studies in ``rdb`` a new study ``study_name`` may warm-start from (see the
    module docstring), most recently begun first."""
    out = []
    for summary in sorted(rdb.get_all_studies(), key=lambda s: s._study_id, reverse=True):
        attrs = summary.user_attrs
        if (summary.study_name == study_name
                or (attrs.get("advisor") or {}).get("format") != study_format
                or (attrs.get("workload") or {}).get("name") != info.get("name")
                or not attrs.get("baseline")
                or (attrs.get("hardware") or {}).get("device") != machine.get("device")
                or hardware.differences(attrs.get("hardware") or {}, machine)
                or not space.same_search(attrs.get("space"), space_dict)):
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=rdb)
        out.append(record.StudyRecord.of(study))
    return out


class Candidate(NamedTuple):
    """A source's trial a warm start may enqueue."""

    params: dict  # the knobs it sampled
    costs: list[float]  # its cost ratios to its own study's baseline (``objectives.costs``)
    origin: str  # "study#number"


def candidates(studies: Sequence[record.StudyRecord], constraints: Constraints) -> list[Candidate]:
    """Each source's trials that meet the new study's ``constraints`` (against the source's
    own baseline)."""
    out = []
    for study in studies:
        base = study.baseline_metrics
        for t in study.front(constraints).feasible:
            out.append(Candidate(dict(t.params), list(objectives.costs(t, base)), f"{study.name}#{t.number}"))
    return out


def configs(rdb: optuna.storages.BaseStorage, study_name: str, info: dict, machine: dict,
            space_dict: dict, study_format: int, constraints: Constraints, limit: int = LIMIT) -> list[Candidate]:
    """What a new study ``study_name`` enqueues first: ``pick`` over its sources' trials
    that meet its ``constraints``."""
    pool = candidates(sources(rdb, study_name, info, machine, space_dict, study_format), constraints)
    keys = [Knobs.from_dict(c.params).describe() for c in pool]
    return [pool[i] for i in pick([c.costs for c in pool], keys, limit)]


def describe(origins: Sequence[str]) -> str:
    """What a warm start enqueued ("study#number" each), in one line for the terminal."""
    studies = sorted({o.rpartition("#")[0] for o in origins})
    return (f"Warm start: the first {len(origins)} trials try the front of earlier "
            f"{'study' if len(studies) == 1 else 'studies'} {', '.join(studies)} (the same workload and "
            f"kind of machine; {', '.join(origins)}), measured anew here; --no-warm-start turns it off")
