"""The dashboard: its panel data on fixture studies, and the page in a real browser."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

import advisor
from advisor import api, dashboard, objectives
from advisor.constraints import Constraints
from advisor.dashboard import content as panel_data
from advisor.dashboard import render
from advisor.study import StudyRecord
from conftest import FAST, PLAIN, require
from test_recommend import FRONT, fixture_study

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
INJECTED = "<script>window.__pwned=1</script><img src=x onerror=window.__pwned=2>"


def hypervolume(study: optuna.Study, constraints: Constraints) -> panel_data.Hypervolume:
    record = StudyRecord.of(study)
    return panel_data.hypervolume(record, record.front(constraints))


def with_failure(study: optuna.Study) -> optuna.Study:
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL, params={"quantization": "none"},
        distributions={"quantization": CategoricalDistribution(["none"])},
        user_attrs={"failure": {"reason": "RuntimeError: <b>boom</b>", "phase": "train"}}))
    return study


def test_trial_statuses_tell_front_dominated_infeasible_and_failed_apart():
    study = with_failure(fixture_study(FRONT))
    panels, rec = dashboard.panels(study, Constraints(max_accuracy_drop=0.6))
    statuses = {p.number: p.status for p in panels["trials"].points}
    # A, B on the front; C loses 0.5 points (feasible, on the front); D loses 1 point.
    assert statuses == {0: "front", 1: "front", 2: "front", 3: "infeasible"}
    assert panels["trials"].failed == [{"number": 4, "knobs": "fp32 accum=1 ckpt=off compile=none "
                                        "lr=0.001 prune=none quant=none kd=off",
                                        "reason": "RuntimeError: <b>boom</b>", "phase": "train"}]
    assert panels["trials"].recommended == rec.number == 2
    rows = {r.number: r for r in panels["table"]}
    assert rows[3].state == "infeasible" and rows[4].state == "fail" and rows[4].reason.endswith("</b>")
    assert rows[2].ratios["size_mib"] == pytest.approx(0.3)


def test_hypervolume_grows_with_better_trials_and_states_its_reference():
    study = fixture_study(FRONT)
    hv = hypervolume(study, Constraints())
    assert hv.numbers == [0, 1, 2, 3]
    assert hv.values == sorted(hv.values) and hv.values[-1] > hv.values[0] > 0
    assert "2x the baseline's latency, memory and size" in hv.reference
    # A in baseline ratios is (1, 1, 1, 0.1): with the reference at 2, its volume is 1*1*1*1.9.
    assert hv.values[0] == pytest.approx(1.9)


def test_small_and_failed_only_studies_say_why_panels_are_empty():
    failed_only = with_failure(optuna.create_study(directions=objectives.DIRECTIONS, study_name="f"))
    panels, rec = dashboard.panels(failed_only)
    assert rec is None
    assert panels["trials"].empty == "no completed trial yet (1 failed)"
    assert panels["hypervolume"].empty == "no baseline measured yet"
    assert "at least 3 completed trials" in panels["importance"].empty
    assert panels["breakdown"].empty
    html = render.page(panels, "")
    assert html.count('class="empty"') >= 4 and "RuntimeError: &lt;b&gt;boom&lt;/b&gt;" in html
    one = fixture_study({"A": FRONT["A"]})
    assert hypervolume(one, Constraints()).empty == "1 completed trial: a curve needs two"


def test_hundreds_of_trials_render():
    points = {f"t{i}": {"accuracy": 0.85 + (i % 10) / 200, "latency_ms": 1 + i % 7, "memory_mib": 10 + i % 13,
                        "size_mib": 1 + i % 5} for i in range(300)}
    study = fixture_study(points)
    panels, _ = dashboard.panels(study)
    page = render.page(panels, "text")
    assert len(panels["table"]) == 300 and page.count("<tr") > 300


def test_user_text_is_escaped_everywhere(tmp_path):
    study = with_failure(fixture_study(FRONT))
    panels, _ = dashboard.panels(study)
    panels["context"].study = INJECTED
    panels["context"].workload = {"name": INJECTED, "model": INJECTED}
    page = render.page(panels, INJECTED)
    assert INJECTED not in page
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page


# -- the page in a real browser -------------------------------------------------------------------

def _browser():
    from browser import executable

    return require(executable(), "ADVISOR_REQUIRE_BROWSER",
                   "Debian's chromium (apt-get install chromium); .ci/run installs it")


COUNT_POINTS = """(() => {
  const out = {};
  document.querySelectorAll('.js-plotly-plot').forEach(gd => {
    let n = 0;
    (gd.data || []).forEach(t => {
      if (t.dimensions) n += (t.dimensions[0].values || []).length;
      else n += ((t.type === 'bar' && t.orientation === 'h') ? t.y : t.x || []).length;
    });
    out[gd.id] = {traces: (gd.data || []).length, points: n,
                  drawn: gd.querySelectorAll('.main-svg').length};
  });
  return JSON.stringify(out);
})()"""


def test_the_dashboard_of_a_real_study_in_headless_chromium(workdir):
    import json

    from browser import Chromium

    exe = _browser()
    knobs = {**PLAIN, "lr": 1e-3}
    compressed = {**knobs, "prune_kind": "structured", "prune_ratio": 0.5, "quantization": "int8-dynamic"}
    advisor.run("workloads:faulty", trials=4, progress=False, study=INJECTED, sampler="random", seed=0,
                enqueue=[knobs, compressed, {**knobs, "lr": 2e-3}, {**knobs, "accumulation": 2}],
                **FAST)
    path = api.dashboard(INJECTED).resolve()
    assert path.parent.name == "dashboards" and path.exists()
    panels = json.loads(path.read_text().split('id="advisor-panels">')[1].split("</script>")[0])
    assert panels == {"points": 3, "failed": 1, "stopped": 0, "front": panels["front"], "hypervolume": 3}

    chrome = Chromium(exe)
    try:
        for domain in ("Page", "Runtime", "Network", "Log"):
            chrome.send(f"{domain}.enable")
        chrome.send("Page.navigate", url=path.as_uri())
        chrome.wait_for("window.Plotly !== undefined && document.readyState === 'complete'")
        drawn = json.loads(chrome.wait_for(
            "(() => { const plots = document.querySelectorAll('.js-plotly-plot');"
            " return plots.length >= 4 && [...plots].every(p => p.querySelector('.main-svg'))"
            f" ? {COUNT_POINTS} : ''; }})()"))
        # Every plotted trial plus the baseline and the recommendation in the scatter matrix.
        assert drawn["scatter-matrix"]["points"] == 3 + 2
        assert drawn["parallel"]["points"] == 3
        assert drawn["hypervolume"]["points"] == 3
        assert drawn["breakdown"]["points"] > 0
        assert set(drawn) >= {"scatter-matrix", "parallel", "hypervolume", "breakdown"}
        rows = chrome.evaluate("document.querySelectorAll('#trials tbody tr').length")
        assert rows == 4
        assert "injected fault at micro-batch 8" in chrome.evaluate("document.body.innerText")
        # The injected study name is text, never markup or code.
        assert chrome.evaluate("window.__pwned === undefined")
        assert INJECTED in chrome.evaluate("document.querySelector('h1').textContent")
        assert chrome.evaluate("document.querySelectorAll('h1 script, h1 img').length") == 0
        ARTIFACTS.mkdir(exist_ok=True)
        chrome.screenshot(ARTIFACTS / "dashboard.png")
        assert chrome.errors() == []
        assert [u for u in chrome.requests() if not u.startswith(("file:", "data:", "about:"))] == []
    finally:
        chrome.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
