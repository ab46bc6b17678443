"""What the terminal shows: tables, the progress display, the overhead benchmark's table."""

from __future__ import annotations

import io
import warnings

import optuna
from optuna.distributions import FloatDistribution

from advisor import bench, report
from test_recommend import FRONT, fixture_study


def test_table_aligns_columns():
    text = report.table(["name", "ms"], [["a", "1.5"], ["long name", "12.25"]], right={1})
    lines = text.splitlines()
    assert lines[0] == "name          ms"
    assert lines[2] == "a            1.5"
    assert lines[3] == "long name  12.25"


def test_objective_cells_show_ratio_and_spread():
    assert report.objective_cell("latency_ms", 2.0, 4.0, spread=0.1) == "2 ±5% (0.50x)"
    assert report.objective_cell("accuracy", 0.97, None) == "0.97"
    assert report.knob_cell("checkpoint_every", 0) == "off"
    assert report.knob_cell("checkpoint_every", 2) == "1/2"


def test_progress_without_a_terminal_prints_one_line_per_trial():
    stream = io.StringIO()
    progress = report.Progress(total=3, stream=stream)
    progress.start(1, "#0 fp32")
    progress.tick("train", 1.0)
    progress.finish("acc 0.9", front=1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("[1/3] #0 fp32 | 00:00 | front 1 | acc 0.9")


def test_overhead_table_renders_the_split():
    rows = [{"trial": 0, "compile": "none", "ok": True, "wall_s": 2.0, "measured_s": 1.9,
             "fixed_s": 0.1, "fixed_pct": 5.0, "ask_s": 0.01, "start_s": 0.01, "load_s": 0.02,
             "collect_s": 0.03, "store_s": 0.03}]
    data = {"trials": rows,
            "once_per_study": {"workload_and_data_s": 0.5, "trial_server_start_s": 3.0,
                               "baseline_s": 5.0},
            "summary": {"median_fixed_pct": 5.0, "max_fixed_pct": 5.0, "median_wall_s": 2.0,
                        "median_fixed_s": 0.1, "goal_pct": 15.0, "goal_met": True}}
    text = bench.render(data)
    assert "#0" in text and "5.0" in text and "goal < 15%: met" in text


def test_a_failed_trial_with_foreign_params_is_listed_not_fatal():
    # A trial another tool (or a newer advisor) added to the study has params this advisor
    # does not know: `advisor show` lists them as they are instead of stopping.
    study = fixture_study(FRONT)
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL, params={"pruning": 0.5},
        distributions={"pruning": FloatDistribution(0.0, 1.0)},
        user_attrs={"failure": {"reason": "boom", "phase": "train"}}))
    text = report.study_report(study)
    assert "#4 pruning=0.5 -> boom" in text


def test_reading_a_study_shows_no_library_warning():
    # The terminal is the user's: an Optuna experimental-API note printed under every
    # report was found in a real run (the record reads heartbeat retries through one).
    study = fixture_study(FRONT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report.study_report(study)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
