"""Early stopping at the rungs of a trial's fine-tune: the rung rule on hand-made points, and
stopped trials in a real study (stored as pruned, never on the front, shown, resumable)."""

from __future__ import annotations

import optuna
import pytest

import advisor
from advisor import recommend
from advisor.constraints import Constraints
from advisor.dashboard import content
from advisor.knobs import Knobs
from advisor.study import load, rungs
from advisor.study.rungs import Point, decide
from conftest import FAST, PLAIN, cli, plain, plain_args

BASE = {"accuracy": 0.95, "latency_ms": 2.0, "memory_mib": 6.0, "size_mib": 0.25}
HEAVY = rungs.lightness(Knobs())  # fp32, no accumulation, no checkpointing
NONE = Constraints(max_accuracy_drop=None)


def point(number, accuracy, latency=1.0, size=1.0, step=15, light=HEAVY):
    return Point(number, step, accuracy, {"latency_ms": latency, "size_mib": size}, light)


def peers(n, accuracy=0.95, latency=0.5, size=0.5, light=HEAVY):
    return [point(100 + i, accuracy, latency, size, light=light) for i in range(n)]


def test_rungs_fall_past_the_warm_up_and_before_the_end():
    assert rungs.rung_steps(60, 2) == (15, 30)
    assert rungs.rung_steps(12, 2) == (3, 6)
    assert rungs.rung_steps(4, 2) == ()  # the test suite's fast trials have none


def test_a_trial_stops_when_enough_trials_beat_it_by_the_margins():
    slow = point(1, 0.95, latency=1.0, size=1.0)
    # Four peers as accurate and 2x cheaper: two of them suffice.
    decision = decide(slow, peers(4), baseline=BASE, constraints=NONE)
    assert decision.stop and len(decision.by) == 4 and "#100" in decision.reason
    # One dominating peer among four is not enough (Rule.dominators = 2).
    mixed = peers(1) + peers(3, latency=2.0)
    assert not decide(slow, mixed, baseline=BASE, constraints=NONE).stop
    # Fewer than Rule.min_peers at the rung: nothing stops yet.
    assert not decide(slow, peers(3), baseline=BASE, constraints=NONE).stop
    # Points at another rung are not peers.
    assert not decide(slow, [point(100 + i, 0.95, 0.5, 0.5, step=30) for i in range(4)],
                      baseline=BASE, constraints=NONE).stop


def test_margins_keep_a_trial_that_is_only_just_beaten():
    slow = point(1, 0.95, latency=1.0, size=1.0)
    # 3% cheaper, as accurate: inside the 5% cost margin.
    assert not decide(slow, peers(4, latency=0.97, size=1.0), baseline=BASE, constraints=NONE).stop
    # Much cheaper but less accurate: it may end on the front by accuracy.
    assert not decide(slow, peers(4, accuracy=0.94), baseline=BASE, constraints=NONE).stop
    # A full accuracy margin more accurate (1 point) and no costlier: it stops.
    assert decide(slow, peers(4, accuracy=0.961, latency=1.0, size=1.0), baseline=BASE, constraints=NONE).stop
    # More accurate by a point but costlier in size: not dominated.
    assert not decide(slow, peers(4, accuracy=0.97, latency=0.5, size=1.2), baseline=BASE, constraints=NONE).stop


def test_what_a_trial_has_measured_and_a_peer_has_not_counts_as_unbeatable():
    slow = point(1, 0.95, latency=1.0, size=1.0)
    unmeasured = [Point(100 + i, 15, 0.99, {"size_mib": 0.5}, HEAVY) for i in range(4)]
    assert not decide(slow, unmeasured, baseline=BASE, constraints=NONE).stop
    # A trial that has measured no cost (its deployable model is compiled, so it is timed at
    # the end) is never dominated, however much more accurate the others are at the rung.
    compiled = Point(1, 15, 0.90, {}, HEAVY)
    assert not decide(compiled, peers(4, accuracy=0.99), baseline=BASE, constraints=NONE).stop


def test_a_trial_whose_knobs_save_training_memory_is_only_stopped_by_trials_saving_as_much():
    light = rungs.lightness(Knobs(accumulation=4, checkpoint_every=1))
    saver = point(1, 0.95, latency=1.0, size=1.0, light=light)
    # Cheaper, as accurate, but without accumulation or checkpointing: its memory may be
    # worse, and memory is measured only at the end, so it does not stop the saver.
    assert not decide(saver, peers(4), baseline=BASE, constraints=NONE).stop
    assert decide(saver, peers(4, light=light), baseline=BASE, constraints=NONE).stop
    assert rungs.lightness(Knobs(precision="bf16")) > HEAVY


def test_a_trial_far_outside_the_accuracy_constraint_stops():
    limits = Constraints(max_accuracy_drop=1.0)
    # Before 3 completed trials say how much accuracy rises after the rung, 10 points of slack.
    assert not decide(point(1, 0.95 - 0.105), [], baseline=BASE, constraints=limits).stop
    collapsed = decide(point(1, 0.95 - 0.12), [], baseline=BASE, constraints=limits)
    assert collapsed.stop and "--max-accuracy-drop 1" in collapsed.reason
    # Then the most that completed trials as far behind at this rung gained by their end:
    # three of them were at 0.88-0.90 and gained at most 3 points.
    gains = [(0.90, 0.01), (0.89, 0.03), (0.88, -0.02)]
    assert decide(point(1, 0.95 - 0.05), [], baseline=BASE, constraints=limits, gains=gains).stop
    assert not decide(point(1, 0.95 - 0.035), [], baseline=BASE, constraints=limits, gains=gains).stop
    # Trials near the baseline at the rung say nothing of how much one far behind may recover.
    near = [(0.95, 0.0), (0.95, 0.001), (0.94, 0.002)]
    assert not decide(point(1, 0.95 - 0.05), [], baseline=BASE, constraints=limits, gains=near).stop
    # No accuracy limit, no such stop.
    assert not decide(point(1, 0.10), [], baseline=BASE, constraints=NONE).stop


def test_a_cheap_objective_already_past_a_hard_limit_stops():
    size = Constraints(max_accuracy_drop=None, max_size_mb=0.2)
    assert decide(point(1, 0.95), [], baseline=BASE, constraints=size, measured={"size_mib": 0.25}).stop
    assert not decide(point(1, 0.95), [], baseline=BASE, constraints=size, measured={"size_mib": 0.2}).stop
    latency = Constraints(max_accuracy_drop=None, max_latency_ms=2.0)
    # The trial's own latency, with the 5% margin for timing noise.
    assert not decide(point(1, 0.95), [], baseline=BASE, constraints=latency, measured={"latency_ms": 2.08}).stop
    stop = decide(point(1, 0.95), [], baseline=BASE, constraints=latency, measured={"latency_ms": 2.2})
    assert stop.stop and "--max-latency-ms 2" in stop.reason


def test_peers_come_from_every_trial_in_the_storage_whatever_its_state():
    """Several workers share rungs: a running trial's stored point is a peer of the others'."""
    study = optuna.create_study(directions=["maximize"])
    state = optuna.trial.TrialState
    states = [state.COMPLETE, state.PRUNED, state.RUNNING]
    for number, now in enumerate(states):
        trial = study.ask()
        trial.set_user_attr("rungs", [point(number, 0.9, step=15).to_dict(),
                                      point(number, 0.93, step=30).to_dict()])
        if now == state.COMPLETE:
            trial.set_user_attr("result", {"metrics": {"accuracy": 0.95}})
            study.tell(trial, [0.95])
        elif now == state.PRUNED:
            study.tell(trial, state=now)
    found, gains = rungs.peers(study.get_trials(deepcopy=False), 15, BASE)
    assert sorted(p.number for p in found) == [0, 1, 2]
    assert gains == [(0.9, pytest.approx(0.05))]  # only a completed trial has an end to gain to
    assert rungs.peers(study.get_trials(deepcopy=False), 30, BASE)[1] == [(0.93, pytest.approx(0.02))]


RUNG_STEPS = {**FAST, "trial_steps": 12}  # rungs at steps 3 and 6


def test_a_stopped_trial_is_stored_as_pruned_with_what_it_measured_and_never_recommended(workdir):
    # --max-size-mb below the model's size: the plain trial's size, measured before its
    # fine-tune, already misses it, so it stops at the first rung; the pruned one goes on.
    pruned = {**PLAIN, "prune_kind": "structured", "prune_ratio": 0.5}
    result = advisor.run(trials=2, max_size_mb=0.1, max_accuracy_drop=100, progress=False, **RUNG_STEPS,
                         **{**plain(1), "enqueue": [PLAIN, pruned]})
    assert (result.completed, result.stopped, result.failed) == (1, 1, 0)
    record = load(result.study_name, result.storage)
    stopped, done = record.trial(0), record.trial(1)
    assert stopped.state == "pruned" and stopped.result is None
    assert stopped.stopped["step"] == 3 and "--max-size-mb 0.1" in stopped.stopped["reason"]
    assert [p["step"] for p in stopped.rungs] == [3]
    # What it measured before it stopped: its latency (paired) and its weights' bytes.
    assert stopped.partial["size_bytes"] == record.baseline["size_bytes"]
    assert stopped.partial["paired"]["latency"]["rounds"] >= 20
    assert stopped.partial["phases"]["train"] > 0
    # The completed trial reached both rungs, and its size before the fine-tune is its size after.
    assert [p["step"] for p in done.rungs] == [3, 6] and done.result["rungs"] == [
        {k: p[k] for k in ("step", "accuracy", "seconds")} for p in done.rungs]
    assert 0 < done.rungs[0]["seconds"] < done.rungs[1]["seconds"] < done.seconds
    assert done.result["size_bytes"] * 1.0 == pytest.approx(done.rungs[0]["costs"]["size_mib"]
                                                            * record.baseline["size_bytes"], rel=1e-9)
    judged = record.front()
    assert stopped not in judged.front and judged.status(stopped) == "stopped"
    rec = recommend.recommend_if_any(record)
    assert rec is None or rec.number != 0
    # Shown: the report's list and the dashboard's table and note.
    shown = cli("show")
    assert "1 stopped early" in shown.out and "#0" in shown.out.split("Stopped early")[1]
    rows = content.table(record, judged)
    assert rows[0].state == "stopped at step 3" and "--max-size-mb" in rows[0].reason
    assert content.trials(record, judged, rec).stopped[0]["step"] == 3


def test_no_early_stop_runs_every_trial_to_its_end_without_rungs(workdir):
    out = cli("run", "--trials", "1", "--no-early-stop", "--max-size-mb", "0.1", "--trial-steps", "12",
              "--baseline-steps", "10", "--latency-seconds", "0.05", *plain_args(1))
    assert out.code == 0 and "stopped" not in out.err
    record = load("digits-cnn", "sqlite:///studies/advisor.db")
    assert record.trial(0).state == "complete" and record.trial(0).rungs == ()
    assert "rungs" not in record.trial(0).result


def test_observing_the_rungs_stores_every_point_and_stops_nothing(workdir):
    """What the search benchmark's table is measured with: the rule is not asked."""
    result = advisor.run(trials=1, max_size_mb=0.1, early_stop="observe", progress=False, **RUNG_STEPS,
                         **plain(1))
    assert result.stopped == 0 and result.completed == 1
    trial = load(result.study_name, result.storage).trial(0)
    assert trial.state == "complete" and not trial.stopped
    assert [p["step"] for p in trial.rungs] == list(rungs.rung_steps(RUNG_STEPS["trial_steps"]))
    assert all(p["seconds"] > 0 and p["costs"] for p in trial.rungs)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_early_stop_takes_only_on_off_or_observe(workdir, value):
    with pytest.raises(advisor.AdvisorError, match="early_stop must be True, False or 'observe'"):
        advisor.run(trials=1, early_stop=value, progress=False)


def test_a_study_holding_stopped_trials_resumes(workdir):
    first = advisor.run(trials=1, max_size_mb=0.1, progress=False, **RUNG_STEPS, **plain(1))
    assert first.stopped == 1
    again = advisor.run(trials=1, progress=False, **plain(1))
    assert again.stopped == 1 and again.completed == 0
    record = load(again.study_name, again.storage)
    assert [t.state for t in record.trials] == ["pruned", "pruned"]
    assert "2 stopped early" in cli("show").out
    listed = cli("studies").out.splitlines()
    assert "stopped early" in listed[0]
    row = next(line.split() for line in listed if line.startswith(again.study_name))
    assert row[3:7] == ["0", "2", "0", "0"]  # completed, stopped early, failed, running


def test_a_time_budget_stops_starting_trials_and_says_so(workdir):
    # The budget counts from the start of the run: building the workload (and here training
    # the baseline) spends a millisecond before the first trial could start.
    result = advisor.run(trials=5, time_budget=1e-3, progress=False, **FAST, **plain(5))
    assert result.out_of_time and result.completed == 0
    assert load(result.study_name, result.storage).baseline is not None  # what was measured is stored
    out = cli("run", "--trials", "3", "--time-budget", "0.001s", "--trial-steps", "4",
              "--latency-seconds", "0.05")
    assert out.code == 0 and "--time-budget reached after 0 trials" in out.err
    bad = cli("run", "--time-budget", "soon")
    assert bad.code == 2 and "expected a positive duration such as 90s, 20m or 1.5h; got 'soon'" in bad.err


def test_two_workers_store_their_points_where_each_others_rule_reads_them(workdir):
    result = advisor.run(trials=2, workers=2, max_size_mb=0.1, progress=False, **RUNG_STEPS, **plain(2))
    assert result.stopped == 2
    record = load(result.study_name, result.storage)
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    found, _ = rungs.peers(study.get_trials(deepcopy=False), 3, BASE)
    assert sorted(p.number for p in found) == [0, 1]
    assert {t.stopped["step"] for t in record.trials} == {3}


@pytest.mark.parametrize("changes, compiled", [
    ({}, False), ({"prune_kind": "structured", "prune_ratio": 0.5}, False), ({"compile": "default"}, True),
    ({"quantization": "int8-dynamic"}, True), ({"quantization": "int8-static"}, True),
])
def test_only_an_eager_deployable_is_built_before_the_fine_tune(changes, compiled):
    """Cheap objectives first only where building the deployable model twice costs no
    compilation: ``compress.compiled`` says which, as ``compress.deployable`` builds it."""
    import torch

    from advisor.trial import compress
    from workloads import FEATURES, MLP

    knobs = Knobs(**changes)
    model, example = MLP(), torch.randn(8, FEATURES)
    student, _ = compress.student(model, knobs, example)
    deploy = compress.deployable(student, knobs, example, [example])
    assert compress.compiled(knobs) == compiled == (deploy.info["compile"] != "none")


INT8 = Knobs(quantization="int8-static")


def test_the_structure_a_trial_deploys_leaves_out_what_does_not_reach_the_deployed_model():
    """Knobs that change only the fine-tune share a structure, and so do values of deployed
    knobs that do not reach the program deployed (a quantized model's training precision, a
    compile mode it is deployed in anyway, unstructured zeros in dense tensors); any that
    does makes another. Every knob of the table is one or the other kind."""
    from advisor import knobs as table
    from advisor.trial import compress

    assert set(table.DEPLOYED) | set(table.TRAINING_ONLY) == set(table.names())
    assert not set(table.DEPLOYED) & set(table.TRAINING_ONLY)

    def key(device="cpu", **changes):
        return compress.structure(Knobs(**changes), device)

    int8 = key(quantization="int8-static")
    for same in (dict(lr=3e-3, accumulation=4, distill_alpha=0.5), dict(compile="default"),
                 dict(compile="max-autotune-no-cudagraphs"), dict(prune_kind="unstructured", prune_ratio=0.5)):
        assert key(quantization="int8-static", **same) == int8, same
    assert key(quantization="int8-static", precision="bf16") == int8
    # On CUDA inductor's int8 lowerings autotune: the mode named is the mode deployed.
    assert key("cuda", quantization="int8-dynamic", compile="max-autotune-no-cudagraphs") != \
        key("cuda", quantization="int8-dynamic")
    for other in (dict(quantization="int8-dynamic"), dict(quantization="qat-int8"),
                  dict(quantization="int8-static", prune_kind="structured", prune_ratio=0.5),
                  dict(quantization="int8-static", quant_protect=0.2)):
        assert key(**other) != int8, other
    # Eager fp32: the training precision autocasts inference, and a compile mode compiles it.
    assert key(precision="bf16") != key() != key(compile="default")
    assert key(prune_kind="unstructured", prune_ratio=0.3) == key()
    assert key(prune_kind="structured", prune_ratio=0.3) != key(prune_kind="structured", prune_ratio=0.5)
    assert key(prune_kind="structured", prune_ratio=0.3) != key(prune_kind="structured", prune_ratio=0.3,
                                                                prune_alloc="sensitivity")


def test_a_per_layer_plan_stands_for_the_shares_that_chose_it():
    """With the trial's per-layer plan known, two protect shares that keep the same layers
    share a structure (one that keeps none is whole-model int8), and so do two guided ratios
    allocated alike; without it, each share stands for itself. A completed trial's plan is
    read from its result."""
    from advisor.techniques.layers import LayerPlan
    from advisor.trial import compress

    head = LayerPlan(protected=("head",))

    def key(plan, **changes):
        return compress.structure(Knobs(quantization="int8-static", **changes), "cpu", plan)

    assert key(head, quant_protect=0.2) == key(head, quant_protect=0.5) != key(LayerPlan(), quant_protect=0.2)
    assert key(LayerPlan(), quant_protect=0.2) == key(LayerPlan()) == key(None)
    assert key(None, quant_protect=0.2) != key(None, quant_protect=0.5)
    units = LayerPlan(prune_ratios=(("a", 0.3), ("b", 0.7)))
    guided = dict(prune_kind="structured", prune_alloc="sensitivity")
    assert key(units, prune_ratio=0.4, **guided) == key(units, prune_ratio=0.5, **guided)
    assert key(units, prune_ratio=0.4, **guided) != key(LayerPlan(prune_ratios=(("a", 0.4), ("b", 0.4))),
                                                        prune_ratio=0.4, **guided)

    study = optuna.create_study(directions=["maximize"])
    dist = {"quantization": DISTRIBUTIONS["quantization"],
            "quant_protect": optuna.distributions.FloatDistribution(0.0, 0.5, step=0.1)}
    for share, plan in [(0.2, head), (0.5, LayerPlan())]:
        result = {"metrics": {"latency_ms": 1.0, "size_mib": 0.1}, **({"layers": plan.to_dict()} if plan else {})}
        study.add_trial(optuna.trial.create_trial(
            params={"quantization": "int8-static", "quant_protect": share}, distributions=dist,
            values=[0.9], user_attrs={"result": result}))
    trials = study.get_trials(deepcopy=False)
    shares_head = Knobs(quantization="int8-static", quant_protect=0.3)
    assert rungs.same_structure(trials, shares_head, "cpu", head)[0] == 0
    assert rungs.same_structure(trials, Knobs(quantization="int8-static"), "cpu", LayerPlan())[0] == 1
    assert rungs.same_structure(trials, shares_head, "cpu", None) is None, "no plan known: the share must match"


def test_knobs_of_one_structure_deploy_the_same_program():
    """What ``structure`` leaves out does not change what ``deployable`` builds: the same
    mode deployed, no autocast, the same weights' bytes, as the plain knobs of that key."""
    import torch

    from advisor.trial import compress, measure
    from workloads import FEATURES, MLP

    example = torch.randn(8, FEATURES)
    changes = dict(quantization="int8-dynamic", compile="max-autotune-no-cudagraphs", precision="bf16",
                   prune_kind="unstructured", prune_ratio=0.5, lr=3e-3)
    plain = dict(quantization="int8-dynamic")
    built = []
    for values in (changes, plain):
        knobs = Knobs(**values)
        torch.manual_seed(0)
        student, _ = compress.student(MLP(), knobs, example)
        built.append(compress.deployable(student, knobs, example, [example]))
    assert compress.structure(Knobs(**changes), "cpu") == compress.structure(Knobs(**plain), "cpu")
    (a, b) = built
    assert a.info["compile"] == b.info["compile"] and a.autocast == b.autocast is False
    assert measure.weight_bytes(a.module) == measure.weight_bytes(b.module)


DISTRIBUTIONS = {"quantization": optuna.distributions.CategoricalDistribution(
    ["int8-static", "int8-dynamic", "qat-int8"]), "lr": optuna.distributions.FloatDistribution(1e-5, 1.0)}


def _completed(study, knobs, accuracy, latency_ratio, size_mib, rung_points=()):
    """A completed trial of ``knobs``, stored as a study stores one."""
    params = {name: value for name, value in knobs.to_dict().items() if name in DISTRIBUTIONS}
    result = {"metrics": {"accuracy": accuracy, "latency_ms": latency_ratio * BASE["latency_ms"],
                          "memory_mib": 6.0, "size_mib": size_mib},
              "paired": {"latency": {"ratio": latency_ratio}}}
    study.add_trial(optuna.trial.create_trial(
        params=params, distributions={name: DISTRIBUTIONS[name] for name in params}, values=[accuracy],
        user_attrs={"rungs": [p.to_dict() for p in rung_points], "result": result}))
    return len(study.trials) - 1


def test_a_completed_trial_brings_the_costs_its_end_measured_to_its_rung_points():
    """A compiled deployable is timed at the end: its points at the rungs had no costs, and
    its own end's measurements fill them (over any it took from another trial)."""
    study = optuna.create_study(directions=["maximize"])
    bare = Point(0, 15, 0.94)
    _completed(study, INT8, 0.95, 0.5, 0.0625, [bare])
    borrowed = Point(1, 15, 0.94, {"latency_ms": 0.9, "size_mib": 0.9}, costs_from=0)
    _completed(study, INT8, 0.95, 0.45, 0.0625, [borrowed])
    running = study.ask()
    running.set_user_attr("rungs", [Point(2, 15, 0.9).to_dict()])
    found = {p.number: p for p in rungs.peers(study.get_trials(deepcopy=False), 15, BASE)[0]}
    assert found[0].costs == {"latency_ms": 0.5, "size_mib": pytest.approx(0.25)}
    assert found[1].costs == {"latency_ms": 0.45, "size_mib": pytest.approx(0.25)} and found[1].costs_from is None
    assert found[2].costs == {}  # running: nothing measured yet


def test_a_trial_without_costs_at_a_rung_is_judged_with_its_structures_and_told_whose(monkeypatch):
    """The trial loop's answer at a rung (``loop._at_rung``) for a compiled trial: the latest
    completed trial deploying the same structure lends its costs; four such trials two points
    more accurate stop it, and the stored point and the reason name the lender."""
    import threading
    from types import SimpleNamespace

    from advisor.study import loop as trial_loop
    from advisor.study.options import RunOptions

    study = optuna.create_study(directions=["maximize"])
    lenders = [_completed(study, Knobs(quantization="int8-static", lr=1e-3 * (i + 1)), 0.95, 0.5, 0.0625,
                          [Point(0, 15, 0.95)]) for i in range(4)]
    _completed(study, Knobs(quantization="int8-dynamic", lr=1e-3), 0.99, 0.1, 0.01, [Point(0, 15, 0.99)])
    state = SimpleNamespace(result=SimpleNamespace(baseline={"metrics": BASE}), lock=threading.Lock(),
                            options=RunOptions(), study=study, constraints=NONE, rule=rungs.Rule(), stops={},
                            spec=SimpleNamespace(device="cpu"))
    trial = study.ask()
    # Deployed in default mode like its lenders: the compile knob changes only its fine-tune.
    knobs = Knobs(quantization="int8-static", distill_alpha=0.5, compile="default")
    go_on = trial_loop._at_rung(state, trial, knobs, {"step": 15, "accuracy": 0.93}, {})
    assert not go_on
    stored = study.trials[trial.number].user_attrs
    assert stored["rungs"][0]["costs_from"] == lenders[-1]
    assert stored["rungs"][0]["costs"] == {"latency_ms": 0.5, "size_mib": pytest.approx(0.25)}
    assert f"as #{lenders[-1]}, of the same deployed structure" in stored["stopped"]["reason"]
    # Another structure (no completed trial deploys it) has nothing to be judged with: it goes on.
    other = study.ask()
    assert trial_loop._at_rung(state, other, Knobs(quantization="qat-int8"), {"step": 15, "accuracy": 0.93}, {})
    assert "costs_from" not in study.trials[other.number].user_attrs["rungs"][0]
