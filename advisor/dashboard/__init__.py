"""The study dashboard: one self-contained HTML file per study, where a user decides.

``data`` computes what each panel shows (pure, tested); ``render`` draws it with plotly.
``write(study)`` builds both and writes ``dashboards/<study>.html``.
"""

from __future__ import annotations

import re
from pathlib import Path

import optuna

from advisor import recommend
from advisor.dashboard import data, render
from advisor.errors import AdvisorError
from advisor.recommend import Constraints

DEFAULT_DIR = "dashboards"


def panels(study: optuna.Study, constraints: Constraints | None = None, goal: str = "balanced",
           rec: recommend.Recommendation | None = None) -> tuple[dict, recommend.Recommendation | None]:
    """Every panel's data, and the recommendation (None before a trial completed; ``rec``
    when the caller has it already)."""
    constraints = constraints or Constraints.from_dict(study.user_attrs.get("constraints", {}))
    rec = rec or recommend.recommend_if_any(study, constraints, goal)
    return {
        "trials": data.trials(study, constraints, rec),
        "hypervolume": data.hypervolume(study, constraints),
        "importance": data.importance(rec, study),
        "table": data.table(study, constraints),
        "breakdown": data.breakdown(rec),
        "context": data.context(study, constraints),
    }, rec


def default_path(study_name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", study_name).strip(".-") or "study"
    return Path(DEFAULT_DIR) / f"{safe}.html"


def write(study: optuna.Study, path: str | Path | None = None, goal: str = "balanced",
          rec: recommend.Recommendation | None = None) -> Path:
    """Write the study's dashboard (default ``dashboards/<study>.html``); returns the path."""
    from advisor.report import render_recommendation

    content, rec = panels(study, goal=goal, rec=rec)
    text = render_recommendation(rec, hint=False) if rec else ""
    path = Path(path) if path else default_path(study.study_name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render.page(content, text), encoding="utf-8")
    except OSError as exc:
        raise AdvisorError(f"cannot write {path}: {exc.strerror or exc}; choose another -o PATH") from None
    return path
