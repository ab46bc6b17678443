"""The study's baseline: the reference every trial is a ratio to, measured once per study.

When the workload is untrained (``trained=False``) the baseline run trains it first; its
weights go into the study's storage (``storage.put_blob``), so a resumed run or another
worker reuses them instead of training again. Trial processes read them from the cache.
"""

from __future__ import annotations

import optuna

from advisor.errors import AdvisorError
from advisor.knobs import baseline as baseline_knobs
from advisor.study import record, storage
from advisor.study.loop import Events, Slot
from advisor.trial.runner import TrialRunner
from advisor.trial.spec import TrialSpec
from advisor.workload import Workload

BLOB = "baseline.pt"  # the key of the trained baseline's weights in the storage


def ensure_baseline(study: optuna.Study, rdb: optuna.storages.RDBStorage, workload: Workload,
                    spec: TrialSpec, runner: TrialRunner, timeout: float, events: Events,
                    slot: Slot) -> dict:
    """The study's baseline measurements, measuring them if the study has none yet, on a
    ``slot`` of the shape the trials get (a worker's cores and threads, or its GPU); the
    baseline's weights are in the cache when this returns."""
    cache = spec.cache
    need_training = False
    if workload.trained:
        cache.save_baseline(workload.model.state_dict())
    else:
        blob = storage.get_blob(rdb, study.study_name, BLOB)
        if blob is not None:
            cache.baseline_file.write_bytes(blob)
        else:
            cache.baseline_file.unlink(missing_ok=True)
            need_training = True
    baseline = record.baseline_of(study)
    if baseline is not None and not need_training:
        return baseline
    events.baseline_started(need_training)
    settings = spec.settings
    knobs = baseline_knobs(settings.lr, settings.serving_rate > 0)
    outcome = runner.run(spec.baseline(knobs, need_training, slot.cpus, slot.env), timeout,
                         on_tick=events.tick)
    if not outcome.ok:
        raise AdvisorError(f"the baseline run failed, so no trial can be compared: {outcome.reason}"
                           f" (log: {cache.log(-1)})")
    if need_training:
        storage.put_blob(rdb, study.study_name, BLOB, cache.baseline_file.read_bytes())
    baseline = {**outcome.result, "knobs": knobs.to_dict(), "worker": slot.to_dict()}
    record.write_baseline(study, baseline)
    events.baseline_finished(outcome.result)
    return baseline
