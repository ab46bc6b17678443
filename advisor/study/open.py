"""Opening a study: create it with everything it records, or resume it after checking it is
the same experiment (workload, device, space, settings, constraints), and load one to read.

A refused run leaves nothing behind: every check passes before the study is created. A new
study's first trials are the knobs the run gives (``--try``) or, without them, what the warm
start picks from earlier studies (``warm.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import optuna

from advisor import hardware, objectives, space
from advisor.constraints import Constraints
from advisor.errors import AdvisorError
from advisor.study import record, storage, warm
from advisor.study.options import RunOptions, make_sampler, resolve_constraints, resolve_settings
from advisor.trial.spec import Settings
from advisor.version import __version__

FORMAT = 3  # 2: compression knobs in the space; 3: size is the weights' bytes, not torch.save's


class Opened(NamedTuple):
    study: optuna.Study
    settings: Settings
    constraints: Constraints
    search: space.Space
    warm: list[warm.Candidate]  # what a new study enqueued from earlier ones (study/warm.py)


def open_study(rdb: optuna.storages.RDBStorage, study_name: str, options: RunOptions,
               hw: hardware.Hardware, info: dict, batch_size: int,
               build_space: Callable[[Settings], space.Space]) -> Opened:
    """Resume the study after checking it is the same experiment, or create it; only once
    every check passed, so a refused run leaves no empty study behind.

    ``build_space(settings)`` builds the search space once the study's settings are known.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = objectives.DIRECTIONS
    sampler = make_sampler(options.sampler, options.seed)
    study = None
    if study_name in storage.study_names(rdb):
        study = optuna.load_study(study_name=study_name, storage=rdb, sampler=sampler)
        if [d.name.lower() for d in study.directions] != directions:
            raise AdvisorError(f"study {study_name!r} has other objectives than advisor's; "
                               f"choose another name with --study NAME")
    stored = record.setup_of(study) if study else None
    if stored and (stored.made_by or {}).get("format") is None:
        raise AdvisorError(
            f"study {study_name!r} exists in this storage but was not made by advisor; "
            f"choose another name with --study NAME")
    if stored and stored.made_by["format"] != FORMAT:
        raise AdvisorError(
            f"study {study_name!r} was measured by an earlier advisor (study format "
            f"{stored.made_by['format']}, this one writes {FORMAT}: the size objective is now the bytes "
            f"the weights take, not a torch.save file's), so its trials and new ones would not compare; "
            f"start a new study with --study NAME (show and export still read it)")
    settings = resolve_settings(options, stored and stored.settings, batch_size, study_name)
    constraints = resolve_constraints(options, stored and stored.constraints, study_name)
    search = build_space(settings)
    if stored:
        search = search.as_stored(stored.space)
    queued = [search.check_values(values) for values in options.enqueue]
    machine = hardware.fingerprint(hw, options.threads)
    if stored:
        check_resume(study_name, stored, info, machine, search.to_dict())
    else:
        study = optuna.create_study(storage=rdb, study_name=study_name, directions=directions,
                                    sampler=sampler, load_if_exists=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(objectives.NAMES))
        record.write_setup(study, info=info, settings=settings.to_dict(), constraints=constraints,
                           hardware=machine, space=search.to_dict(),
                           version={"version": __version__, "format": FORMAT})
    for values in queued:
        study.enqueue_trial(values)
    picked = []
    if not stored and options.warm_start and not queued:
        picked = warm_start(study, rdb, info, machine, search, constraints, min(warm.LIMIT, options.trials))
    return Opened(study, settings, constraints, search, picked)


def warm_start(study: optuna.Study, rdb: optuna.storages.RDBStorage, info: dict, machine: dict,
               search: space.Space, constraints: Constraints, limit: int) -> list[warm.Candidate]:
    """Enqueue what ``warm.configs`` picks from earlier studies as the new study's first
    trials, each marked with where it came from; recorded with the study."""
    picked = []
    for c in warm.configs(rdb, study.study_name, info, machine, search.to_dict(), FORMAT, constraints, limit):
        try:
            values = search.check_values(c.params)
        except AdvisorError:  # a knob value this space no longer takes: not tried
            continue
        study.enqueue_trial(values, user_attrs={"warm_start": c.origin})
        picked.append(c)
    if picked:
        record.write_warm_start(study, [c.origin for c in picked])
    return picked


def check_resume(study_name: str, stored: record.Setup, info: dict, machine: dict,
                 space_dict: dict) -> None:
    """Refuse to go on with a study whose workload, machine or space differ from this run's.

    A study is measured on one kind of machine (``hardware.fingerprint``): its absolute
    times, its constraints in milliseconds and the sampler's view of the latency objective
    are only comparable there. Several machines share a study when they are of one kind."""
    old = stored.workload
    # (a study stored before the weights were recorded is compared on the rest)
    same_data = old.get("fingerprints") == info["fingerprints"]
    if "weights" in old and old["weights"] != info.get("weights") and same_data:
        raise AdvisorError(
            f"the trained model of study {study_name!r} has other weights than when it began (another "
            f"checkpoint); its baseline is that model as it was: start a new study with --study NAME")
    if old.get("fingerprints") != info["fingerprints"] or old.get("parameters") != info["parameters"]:
        raise AdvisorError(
            f"the workload of study {study_name!r} changed since it began (its data or model "
            f"differ from the stored ones); start a new study with --study NAME")
    old_device = stored.hardware.get("device")
    if old_device != machine["device"]:
        raise AdvisorError(
            f"study {study_name!r} was measured on {old_device} ({stored.hardware.get('name')}) "
            f"and this run would use {machine['device']}; use --device {old_device} or a new --study NAME")
    differ = hardware.differences(stored.hardware, machine)
    if differ:
        raise AdvisorError(
            f"study {study_name!r} was measured on {hardware.describe(stored.hardware)} and this "
            f"machine differs ({'; '.join(differ)}): its times would not be comparable. Run it on "
            f"a machine of the same kind (with the same --threads), or give this machine its own "
            f"study with --study {study_name}-NAME")
    if not space.same_search(stored.space, space_dict):
        raise AdvisorError(
            f"study {study_name!r} was searched over another space (other hardware or model); "
            f"start a new study with --study NAME")


def load_study(study_name: str | None, storage_url: str) -> optuna.Study:
    """An existing advisor study, or one line naming the ones the storage holds."""
    rdb = storage.open_storage(storage_url)
    names = storage.study_names(rdb)
    if study_name is None:
        if len(names) == 1:
            study_name = names[0]
        else:
            raise AdvisorError(
                f"--study is needed: the storage {storage.display(storage_url)} holds "
                f"{len(names)} studies ({', '.join(names) or 'none'})")
    if study_name not in names:
        raise AdvisorError(
            f"no study {study_name!r} in {storage.display(storage_url)}; it holds "
            f"{', '.join(names) or 'no studies'}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study_name, storage=rdb)
