"""The study dashboard: one self-contained HTML file per study, where a user decides.

``content`` says what each panel shows from the study's record (pure, tested); ``render``
draws it with plotly. ``write(study)`` builds both and writes ``dashboards/<study>.html``.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from advisor import recommend
from advisor.constraints import Constraints
from advisor.dashboard import content as panel_data
from advisor.dashboard import render
from advisor.errors import AdvisorError
from advisor.files import DASHBOARD_DIR, safe_name
from advisor.study.record import StudyRecord


def panels(study: optuna.Study | StudyRecord, constraints: Constraints | None = None, goal: str = "balanced",
           rec: recommend.Recommendation | None = None) -> tuple[dict, recommend.Recommendation | None]:
    """Every panel's data, and the recommendation (None before a trial completed; ``rec``
    when the caller has it already)."""
    record = StudyRecord.of(study)
    judged = record.front(constraints)
    rec = rec or recommend.recommend_if_any(record, judged.constraints, goal)
    return {
        "trials": panel_data.trials(record, judged, rec),
        "hypervolume": panel_data.hypervolume(record, judged),
        "importance": panel_data.importance(rec, record),
        "table": panel_data.table(record, judged),
        "breakdown": panel_data.breakdown(rec),
        "context": panel_data.context(record, judged),
        "sensitivity": panel_data.sensitivity(record, rec),
    }, rec


def default_path(study_name: str) -> Path:
    return Path(DASHBOARD_DIR) / f"{safe_name(study_name)}.html"


def write(study: optuna.Study | StudyRecord, path: str | Path | None = None, goal: str = "balanced",
          rec: recommend.Recommendation | None = None) -> Path:
    """Write the study's dashboard (default ``dashboards/<study>.html``); returns the path."""
    from advisor.report import render_recommendation

    record = StudyRecord.of(study)
    content, rec = panels(record, goal=goal, rec=rec)
    text = render_recommendation(rec, hint=False) if rec else ""
    path = Path(path) if path else default_path(record.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render.page(content, text), encoding="utf-8")
    except OSError as exc:
        raise AdvisorError(f"cannot write {path}: {exc.strerror or exc}; choose another -o PATH") from None
    return path
