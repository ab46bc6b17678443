"""Draw the panels (``content.py``) into one self-contained HTML file with plotly.

plotly.js is embedded once, so the file opens from disk with no network. Text that comes from
the user or the study (names, workload references, failure reasons) is written into the page
through ``html.escape`` only, never into plotly's markup or a script.
"""

from __future__ import annotations

import html
import json

import plotly.colors as pcolors
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from advisor import knobs as knob_table
from advisor.dashboard import content as panel
from advisor.knobs import Knobs
from advisor.objectives import OBJECTIVES

COLORS = {"front": "#d62728", "dominated": "#7f7f7f", "infeasible": "#c7c7c7",
          "baseline": "#1f77b4", "recommended": "#2ca02c"}
_CONFIG = {"displaylogo": False, "responsive": True}


def _label(name: str, serving: bool = False) -> str:
    o = next(o for o in OBJECTIVES if o.name == name)
    if serving and name == "latency_ms":
        return "p99 request latency (ms)"
    return f"{o.label} ({o.unit})" if o.unit else o.label


def _hover(point: panel.Point, serving: bool = False) -> str:
    knobs = Knobs.from_dict(point.knobs).describe().replace(" ", "<br>")
    values = "<br>".join(f"{_label(o.name, serving)}: {point.metrics[o.name]:.4g}" for o in OBJECTIVES)
    return f"trial #{point.number} ({point.status})<br>{knobs}<br>{values}"


def scatter_matrix(trials: panel.Trials) -> go.Figure:
    dims = [o.name for o in OBJECTIVES]
    serving = trials.serving is not None
    fig = go.Figure()
    for status in ("dominated", "infeasible", "front"):
        pts = [p for p in trials.points if p.status == status]
        if not pts:
            continue
        fig.add_trace(go.Splom(
            name=f"{status} ({len(pts)})",
            dimensions=[{"label": _label(d, serving), "values": [p.metrics[d] for p in pts]} for d in dims],
            text=[_hover(p, serving) for p in pts], hoverinfo="text",
            marker={"color": COLORS[status], "size": 7 if status == "front" else 5,
                    "line": {"width": 0.5, "color": "white"}},
            diagonal_visible=False, showupperhalf=False))
    if trials.baseline:
        fig.add_trace(go.Splom(
            name="baseline",
            dimensions=[{"label": _label(d, serving), "values": [trials.baseline[d]]} for d in dims],
            text=["baseline<br>" + "<br>".join(f"{_label(d, serving)}: {trials.baseline[d]:.4g}" for d in dims)],
            hoverinfo="text", marker={"color": COLORS["baseline"], "size": 13, "symbol": "star"},
            diagonal_visible=False, showupperhalf=False))
    rec = next((p for p in trials.points if p.number == trials.recommended), None)
    if rec is not None:
        fig.add_trace(go.Splom(
            name=f"recommended (#{rec.number})",
            dimensions=[{"label": _label(d, serving), "values": [rec.metrics[d]]} for d in dims],
            text=["recommended<br>" + _hover(rec, serving)], hoverinfo="text",
            marker={"color": COLORS["recommended"], "size": 14, "symbol": "diamond",
                    "line": {"width": 1, "color": "black"}},
            diagonal_visible=False, showupperhalf=False))
    fig.update_layout(height=720, dragmode="select", hovermode="closest",
                      legend={"orientation": "h", "y": 1.06}, margin={"t": 40})
    return fig


def parallel(trials: panel.Trials) -> go.Figure:
    points = trials.points
    knob_names = [k for k in knob_table.names() if len({str(p.knobs[k]) for p in points}) > 1]
    dims = []
    for k in knob_names:
        values = [p.knobs[k] for p in points]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and k != "accumulation":
            dims.append({"label": k, "values": values})
        else:
            levels = sorted({str(v) for v in values})
            dims.append({"label": k, "values": [levels.index(str(v)) for v in values],
                         "tickvals": list(range(len(levels))), "ticktext": levels})
    for o in OBJECTIVES:
        dims.append({"label": _label(o.name, trials.serving is not None),
                     "values": [p.metrics[o.name] for p in points]})
    color = [{"front": 2, "dominated": 1, "infeasible": 0}[p.status] for p in points]
    fig = go.Figure(go.Parcoords(
        dimensions=dims,
        line={"color": color, "cmin": 0, "cmax": 2,
              "colorscale": [[0, COLORS["infeasible"]], [0.5, COLORS["dominated"]], [1, COLORS["front"]]]}))
    fig.update_layout(height=460, margin={"l": 80, "r": 80, "t": 60})
    return fig


def hypervolume(hv: panel.Hypervolume) -> go.Figure:
    fig = go.Figure(go.Scatter(x=list(range(1, len(hv.values) + 1)), y=hv.values, mode="lines+markers",
                               text=[f"after trial #{n}" for n in hv.numbers], hoverinfo="text+y"))
    fig.update_layout(height=340, xaxis_title="completed trials", yaxis_title="hypervolume",
                      margin={"t": 30})
    return fig


def importance(imp: panel.Importance, serving: bool = False) -> go.Figure:
    fig = go.Figure()
    for name, scores in imp.per_objective.items():
        fig.add_trace(go.Bar(name=_label(name, serving), y=[k for k, _ in scores], x=[v for _, v in scores],
                             orientation="h"))
    fig.update_layout(height=380, barmode="group", xaxis_title="share of the objective's variance (fANOVA)",
                      margin={"t": 30}, yaxis={"autorange": "reversed"})
    return fig


def breakdown(b: panel.Breakdown) -> go.Figure:
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("wall time per phase (s)", "training memory (MiB)"))
    fig.add_trace(go.Bar(x=list(b.phases), y=list(b.phases.values()), name="time"), 1, 1)
    fig.add_trace(go.Bar(x=list(b.memory), y=list(b.memory.values()), name="memory"), 1, 2)
    fig.update_layout(height=360, showlegend=False, margin={"t": 40})
    return fig


def sensitivity(sens: panel.Sensitivity) -> go.Figure:
    """Loss rise per layer per quantization family (protected layers marked), and each
    structured pruning unit's loss rise against its ratio (the chosen ratio marked)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45],
                        subplot_titles=("quantized alone: loss rise", "pruned alone: loss rise by ratio"))
    kept = set(sens.chosen.get("protected") or [])
    names = [f"{row['name']}{' (kept)' if row['name'] in kept else ''}" for row in sens.layers]
    for family in sorted({f for row in sens.layers for f in row["quant"]}):
        fig.add_trace(go.Bar(name="int8-static/qat" if family == "pt2e" else family, orientation="h", y=names,
                             x=[row["quant"].get(family) for row in sens.layers],
                             hovertext=[f"{row['params']} parameters, {100 * (row.get('time_share') or 0):.0f}% "
                                        f"of the forward time" for row in sens.layers]), 1, 1)
    chosen = sens.chosen.get("prune_ratios") or {}
    for unit in sens.units:
        fig.add_trace(go.Scatter(name=unit["name"], x=unit["ratios"], y=unit["rises"], mode="lines+markers"), 1, 2)
        if unit["name"] in chosen and chosen[unit["name"]] in unit["ratios"]:
            at = unit["ratios"].index(chosen[unit["name"]])
            fig.add_trace(go.Scatter(x=[unit["ratios"][at]], y=[unit["rises"][at]], mode="markers",
                                     marker={"size": 14, "symbol": "star"}, showlegend=False,
                                     hovertext=f"#{sens.number}: {unit['name']} at {unit['ratios'][at]:g}"), 1, 2)
    fig.update_layout(height=max(360, 22 * len(sens.layers)), barmode="group", margin={"t": 40})
    fig.update_xaxes(title_text="pruning ratio of the unit", row=1, col=2)
    return fig


def _figure(fig: go.Figure, div_id: str) -> str:
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id, config=_CONFIG)


def _empty(reason: str) -> str:
    return f'<p class="empty">Empty: {html.escape(reason)}.</p>'


def _trials_table(rows: list[panel.Row], serving: bool = False) -> str:
    e = html.escape
    extra = ["p50 request latency (ms)", "served requests/s", "overload share"] if serving else []
    head = ["trial", "state"] + [_label(o.name, serving) for o in OBJECTIVES] + extra + ["knobs", "reason"]
    out = ['<table class="sortable" id="trials"><thead><tr>']
    out += [f'<th data-col="{i}">{e(h)}</th>' for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for r in rows:
        cells = [(r.number, f"#{r.number}"), (r.state, r.state)]
        for o in OBJECTIVES:
            if o.name in r.metrics:
                ratio = r.ratios.get(o.name)
                text = f"{r.metrics[o.name]:.4g}" + (f" ({ratio:.2f}x)" if ratio is not None else "")
                cells.append((r.metrics[o.name], text))
            else:
                cells.append(("", ""))
        if serving:
            sv = r.serving
            cells += [(sv["p50_ms"], f"{sv['p50_ms']:.3g}") if sv else ("", ""),
                      (sv["throughput_rps"], f"{sv['throughput_rps']:.0f}") if sv else ("", ""),
                      (sv["overload_share"], f"{100 * sv['overload_share']:.1f}%"
                       + (" saturated" if sv["saturated"] else "")) if sv else ("", "")]
        cells += [(r.knobs, r.knobs), (r.reason, r.reason)]
        out.append(f'<tr class="{e(r.state)}">' + "".join(
            f'<td data-value="{e(str(v))}">{e(str(t))}</td>' for v, t in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _operators(ops: dict[str, list[dict]]) -> str:
    e = html.escape
    out = []
    for where, rows in ops.items():
        if not rows:
            continue
        keys = list(rows[0])
        out.append(f"<h3>top operators, {e(where)}</h3><table><tr>" +
                   "".join(f"<th>{e(k)}</th>" for k in keys) + "</tr>")
        for row in rows:
            out.append("<tr>" + "".join(f"<td>{e(_fmt(row[k]))}</td>" for k in keys) + "</tr>")
        out.append("</table>")
    return "".join(out)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _context(ctx: panel.Context) -> str:
    e = html.escape
    hw = ctx.hardware
    items = [("device", f"{hw.get('device', '?')} ({hw.get('name', '?')}), {hw.get('cores', '?')} cores"),
             ("torch", hw.get("torch_version", "?")),
             ("workload", f"{ctx.workload.get('name')} ({ctx.workload.get('model')})"),
             ("constraints", ctx.constraints),
             ("settings", ", ".join(f"{k}={v}" for k, v in ctx.settings.items()))]
    out = ["<dl>"] + [f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in items] + ["</dl>"]
    if ctx.excluded:
        out.append("<h3>left out of the search space on this hardware</h3><ul>")
        out += [f"<li>{e(str(x['knob']))}={e(str(x['value']))}: {e(str(x['reason']))}</li>" for x in ctx.excluded]
        out.append("</ul>")
    return "".join(out)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ddd;padding:3px 6px}
th{background:#f4f4f4;cursor:pointer} tr.fail td{color:#a00} tr.infeasible td{color:#888}
.empty{color:#777;font-style:italic} dt{font-weight:bold;float:left;width:110px} dd{margin-left:120px}
.rec{background:#eef8ee;padding:8px 12px;white-space:pre-wrap;font-family:monospace;font-size:12px}
"""

_SORT = """
document.querySelectorAll('table.sortable th').forEach(function (th) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), col = +th.dataset.col, body = table.tBodies[0];
    var asc = th.dataset.asc !== '1'; th.dataset.asc = asc ? '1' : '0';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.value, y = b.cells[col].dataset.value;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def page(panels: dict, recommendation_text: str) -> str:
    """The HTML document: ``panels`` holds each panel's data (see ``advisor.dashboard.build``)."""
    e = html.escape
    ctx: panel.Context = panels["context"]
    trials: panel.Trials = panels["trials"]
    sections = []

    def section(title: str, body: str, panel: str) -> None:
        sections.append(f'<section id="{panel}"><h2>{e(title)}</h2>{body}</section>')

    section("Recommendation", f'<div class="rec">{e(recommendation_text)}</div>'
            if recommendation_text else _empty("no completed trial to recommend from"), "recommendation")
    body = _empty(trials.empty) if trials.empty else _figure(scatter_matrix(trials), "scatter-matrix")
    failed = len(trials.failed)
    note = (f"<p>{failed} failed trial{' has' if failed == 1 else 's have'} no measurements: "
            f"see the table of all trials below.</p>") if failed else ""
    if trials.stopped:
        steps = ", ".join(f"#{s['number']} at step {s['step']}" for s in trials.stopped)
        note += (f"<p>{len(trials.stopped)} trial{' was' if len(trials.stopped) == 1 else 's were'} "
                 f"stopped early, at a rung of the fine-tune ({e(steps)}); never on the front. Why: "
                 f"the table of all trials below.</p>")
    if trials.serving:
        sv = trials.serving
        note += (f"<p>Serving load: {sv['serving_rate']:g} requests/s, Poisson arrivals, "
                 f"{sv['serving_requests']} requests on a simulated clock fed by each model's "
                 f"measured batch times; latency is p99 request latency with queueing; overload "
                 f"counts requests later than {sv['serving_deadline_ms']:g} ms. The baseline "
                 f"serves each request alone.</p>")
    section("Pareto front: every pair of objectives", note + body, "pareto")
    section("From knobs to objectives", _empty(trials.empty) if trials.empty or len(trials.points) < 2
            else _figure(parallel(trials), "parallel"), "parallel-panel")
    hv: panel.Hypervolume = panels["hypervolume"]
    reference = f"<p>Reference point: {e(hv.reference)}; feasible trials only.</p>"
    section("Hypervolume over trials", _empty(hv.empty) if hv.empty
            else reference + _figure(hypervolume(hv), "hypervolume"), "hypervolume-panel")
    imp: panel.Importance = panels["importance"]
    section("Which knobs matter", _empty(imp.empty) if imp.empty
            else _figure(importance(imp, trials.serving is not None), "importance"), "importance-panel")
    b: panel.Breakdown = panels["breakdown"]
    section(f"Recommended trial #{b.number}: where time and memory went" if b.number is not None
            else "Recommended trial", _empty(b.empty) if b.empty
            else _figure(breakdown(b), "breakdown") + _operators(b.operators), "breakdown-panel")
    sens: panel.Sensitivity = panels["sensitivity"]
    mark = (f"<p>Marked: what the recommended trial #{sens.number} chose (kept layers; a star at each "
            f"unit's ratio).</p>") if sens.chosen else ""
    section("Per-layer sensitivity (measured once, with the baseline's weights)",
            _empty(sens.empty) if sens.empty else mark + _figure(sensitivity(sens), "sensitivity"),
            "sensitivity-panel")
    section("All trials (click a column to sort)",
            _trials_table(panels["table"], trials.serving is not None) if panels["table"]
            else _empty("no trial yet"), "table-panel")
    section("Hardware, software and the search space", _context(ctx), "context")
    title = f"advisor: study {ctx.study}"
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{_STYLE}</style>"
            f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>"
            f"<h1>{e(title)}</h1>" + "".join(sections) +
            f"<script>{_SORT}</script>"
            f"<script type=\"application/json\" id=\"advisor-panels\">"
            f"{json.dumps(_summary(panels)).replace('</', '<' + chr(92) + '/')}</script>"
            "</body></html>")


def _summary(panels: dict) -> dict:
    """Counts the browser test compares with what rendered."""
    trials: panel.Trials = panels["trials"]
    return {"points": len(trials.points), "failed": len(trials.failed), "stopped": len(trials.stopped),
            "front": sum(1 for p in trials.points if p.status == "front"),
            "hypervolume": len(panels["hypervolume"].values)}


def _compute_figure(es: dict) -> go.Figure:
    """Hypervolume against compute (share of random search's full trials), per method."""
    fig = go.Figure()
    shares = [5 * (i + 1) for i in range(len(next(iter(es["methods"].values()))["chart"]))]
    palette = pcolors.qualitative.Plotly
    for i, (name, m) in enumerate(es["methods"].items()):
        label = f"{name} (default)" if m.get("default") else name
        hv, color = m["chart"], palette[i % len(palette)]  # a band and its line alike
        fig.add_trace(go.Scatter(x=shares + shares[::-1], y=[h["q75"] for h in hv] + [h["q25"] for h in hv][::-1],
                                 fill="toself", fillcolor=color, opacity=0.15, line={"width": 0}, showlegend=False,
                                 hoverinfo="skip", legendgroup=name, name=label))
        fig.add_trace(go.Scatter(x=shares, y=[h["median"] for h in hv], mode="lines", legendgroup=name,
                                 line={"color": color, "width": 4 if m.get("default") else 2},
                                 name=f"{label}, {m['seeds']} seeds"))
    fig.add_hline(y=es["target_hypervolume"], line_dash="dot",
                  annotation_text=f"random search, {es['scale_trials']} full trials (median)")
    fig.update_layout(title=f"Hypervolume at equal compute (100% = {es['scale_s'] / 60:.1f} min of trials)",
                      xaxis_title="compute, % of random search's full trials",
                      yaxis_title="hypervolume of the feasible front", height=520, margin={"t": 60})
    return fig


def search_efficiency(report: dict) -> str:
    """A self-contained page: hypervolume against trials per sampler (median line, band
    between the 25th and 75th percentiles over seeds), one-at-a-time as a marker."""
    fig = go.Figure()
    steps = report["steps"]
    for name, r in report["samplers"].items():
        hv = [r["hypervolume"][str(b)] for b in steps]
        label = f"{name} (default)" if name == "tpe" else name
        fig.add_trace(go.Scatter(x=steps + steps[::-1], y=[h["q75"] for h in hv] + [h["q25"] for h in hv][::-1],
                                 fill="toself", opacity=0.2, line={"width": 0}, showlegend=False,
                                 hoverinfo="skip", legendgroup=name, name=label))
        fig.add_trace(go.Scatter(x=steps, y=[h["median"] for h in hv], mode="lines+markers",
                                 name=f"{label}, {r['seeds']} seeds", legendgroup=name))
    oat = report["one_at_a_time"]
    fig.add_trace(go.Scatter(x=[oat["trials"]], y=[oat["hypervolume"]], mode="markers",
                             marker={"size": 12, "symbol": "diamond"},
                             name=f"one technique at a time ({oat['trials']} trials)"))
    fig.add_hline(y=report["grid_hypervolume"], line_dash="dot",
                  annotation_text="every grid configuration")
    hw = report["hardware"]
    fig.update_layout(
        title=f"Search efficiency: {html.escape(report['workload'])} on {hw['device']} "
              f"({html.escape(hw['name'])}), {report['grid_size']} measured configurations",
        xaxis_title="trials", yaxis_title="hypervolume of the front (objectives / baseline)",
        height=520, margin={"t": 60})
    body = pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id="search-efficiency",
                       config=_CONFIG)
    if report.get("early_stopping"):
        body += pio.to_html(_compute_figure(report["early_stopping"]), include_plotlyjs=False,
                            full_html=False, div_id="search-compute", config=_CONFIG)
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>advisor: search efficiency"
            f"</title><script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>"
            f"{body}</body></html>")
