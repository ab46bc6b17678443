"""Warm start: which earlier studies a new one reads, what it enqueues from them, and when it
does not (study/warm.py)."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

import advisor
from advisor import objectives
from advisor.dashboard import content
from advisor.knobs import Knobs
from advisor.study import load, storage, warm
from advisor.study.open import FORMAT
from conftest import FAST, PLAIN, cli

MLP = "workloads:tensor_mlp"
FASTER = {"sampler": "random", "seed": 0, "progress": False, **FAST}
PRUNED = {**PLAIN, "prune_kind": "structured", "prune_ratio": 0.5}
# Cheaper in training memory at about the same accuracy: often a front of several points.
ACCUMULATED = [{**PLAIN, "accumulation": 2}, {**PLAIN, "accumulation": 4}]


def test_pick_takes_the_point_adding_most_hypervolume_first_and_none_that_adds_nothing():
    # Cost ratios (accuracy, latency, memory, size), lower is better; the box ends at 1.25, 2, 2, 2.
    faster = [1.0, 0.5, 1.0, 1.0]  # alone: 0.25 * 1.5 * 1 * 1 = 0.375
    smaller = [1.0, 1.0, 1.0, 0.25]  # alone: 0.25 * 1 * 1 * 1.75 = 0.4375
    slower_twin = [1.0, 0.6, 1.0, 1.0]  # dominated by ``faster``
    inaccurate = [1.3, 0.1, 0.1, 0.1]  # below 0.8x the baseline's accuracy: outside the box
    costs = [faster, smaller, slower_twin, inaccurate, faster]
    keys = ["a", "b", "c", "d", "b"]  # the last is configuration b again, measured otherwise
    assert warm.pick(costs, keys) == [1, 0]
    assert warm.pick(costs, keys, limit=1) == [1]
    assert warm.pick([], []) == []


def _waiting(study_name: str, url: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=study_name, storage=url)
    return study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


def test_a_new_study_first_tries_the_front_of_an_earlier_one_of_its_workload(workdir):
    first = advisor.run(MLP, trials=3, study="before", enqueue=[PLAIN, *ACCUMULATED], max_accuracy_drop=50,
                        **FASTER)
    earlier = load("before", first.storage)
    # Its front points inside the box (warm.REFERENCE): a point past it adds nothing, is not tried.
    box = [warm.REFERENCE[name] for name in objectives.NAMES]
    front = {Knobs.from_dict(t.params).describe() for t in earlier.front().front
             if all(c < r for c, r in zip(objectives.costs(t, earlier.baseline_metrics), box, strict=True))}
    assert front, "the earlier study has a front to start from"

    n = min(len(front), warm.LIMIT)
    result = advisor.run(MLP, trials=n, study="after", max_accuracy_drop=50, **FASTER)
    record = load("after", result.storage)
    tried = record.trials[:n]
    assert all(t.warm_from for t in tried) and record.warm == list(tried)
    shown = [Knobs.from_dict(t.params).describe() for t in tried]
    assert len(set(shown)) == n and set(shown) <= set(front), "front configurations of the earlier one, each once"
    for t in tried:
        source = earlier.trial(int(t.warm_from.rpartition("#")[2]))
        assert t.warm_from.startswith("before#") and t.params == source.params
        assert t.result is not None and t.result is not source.result, "measured anew, not copied"
    study = optuna.load_study(study_name="after", storage=result.storage)
    assert study.user_attrs["warm_start"] == [t.warm_from for t in tried]
    shown = cli("show", "--study", "after")
    assert shown.code == 0 and "Warm start: #0 (before#" in shown.out
    rows = content.table(record, record.front())
    assert rows[0].reason == f"warm start: the knobs of {tried[0].warm_from}"

    # Resuming either study enqueues nothing more.
    advisor.run(MLP, trials=1, study="after", time_budget=1e-3, **FASTER)
    assert not _waiting("after", result.storage)


def test_no_warm_start_when_turned_off_or_when_knobs_are_given(workdir):
    advisor.run(MLP, trials=1, study="before", enqueue=[PLAIN], **FASTER)
    url = storage.DEFAULT_URL
    # A tiny time budget opens the study (and its warm start) and runs no trial.
    advisor.run(MLP, trials=3, study="warm", time_budget=1e-3, **FASTER)
    assert [t.user_attrs["warm_start"] for t in _waiting("warm", url)] == ["before#0"]
    advisor.run(MLP, trials=3, study="cold", time_budget=1e-3, warm_start=False, **FASTER)
    assert not _waiting("cold", url)
    advisor.run(MLP, trials=3, study="given", time_budget=1e-3, enqueue=[PRUNED], **FASTER)
    assert [t.user_attrs for t in _waiting("given", url)] == [{}], "only the knobs given, unmarked"
    ran = cli("run", "--model", MLP, "--study", "cli-cold", "--no-warm-start", "--time-budget", "0.001s",
              "--trial-steps", "4", "--baseline-steps", "10", "--latency-seconds", "0.05")
    assert ran.code == 0 and not _waiting("cli-cold", url)


def test_a_study_on_another_machine_or_space_or_format_or_without_baseline_is_no_source(workdir):
    advisor.run(MLP, trials=1, study="before", enqueue=[PLAIN], **FASTER)
    rdb = storage.open_storage(storage.DEFAULT_URL)
    study = optuna.load_study(study_name="before", storage=rdb)
    attrs = dict(study.user_attrs)
    info, machine, space = attrs["workload"], attrs["hardware"], attrs["space"]
    assert [s.name for s in warm.sources(rdb, "new", info, machine, space, FORMAT)] == ["before"]
    assert warm.sources(rdb, "before", info, machine, space, FORMAT) == [], "a study is not its own source"
    changes = {"hardware": {**machine, "threads": machine["threads"] + 1},
               "space": {**space, "precision": [*space["precision"], "fp8"]},
               "advisor": {**attrs["advisor"], "format": FORMAT - 1},
               "baseline": None,
               "workload": {**info, "name": "another"}}
    for key, value in changes.items():
        study.set_user_attr(key, value)
        assert warm.sources(rdb, "new", info, machine, space, FORMAT) == [], f"{key} differs: no source"
        study.set_user_attr(key, attrs[key])
    assert [s.name for s in warm.sources(rdb, "new", info, machine, space, FORMAT)] == ["before"]
