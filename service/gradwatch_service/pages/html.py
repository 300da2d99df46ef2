"""The pages' HTML, rendered on the server with every value escaped. Scripts and styles are files of their own
(`static/`), so the Content-Security-Policy can forbid inline script altogether."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from html import escape
from urllib.parse import quote

from gradwatch._format import fmt_value  # the CLI's spelling of a value: one for terminal and page
from gradwatch.wire import RUN_STATUSES

from ..run_summaries import RunSummary
from ..schemas import Incident, RunPublic

__all__ = ["login_page", "not_found_page", "run_page", "runs_page"]


def _cell(v: float | None) -> str:
    cls = ' class="nonfinite"' if v is not None and not math.isfinite(v) else ""
    return f"<td{cls}>{escape(fmt_value(v))}</td>"


def _when(t: datetime | None) -> str:
    return "—" if t is None else escape(t.strftime("%Y-%m-%d %H:%M:%S UTC"))


def _page(title: str, body: str, *, script: str | None = None, logged_in: bool = False) -> str:
    logout = ('<form method="post" action="/logout" class="logout"><button type="submit">log out</button></form>'
              if logged_in else "")
    scripts = f'<script src="/ui/static/{script}" defer></script>' if script else ""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{escape(title)} · gradwatch</title><link rel="stylesheet" href="/ui/static/style.css">'
            f'<link rel="icon" href="/ui/static/favicon.svg" type="image/svg+xml">'
            f'{scripts}</head><body><header><a class="brand" href="/">gradwatch</a>{logout}</header>'
            f'<main>{body}</main></body></html>\n')


def _open_cell(warnings: int, criticals: int) -> str:
    if not warnings and not criticals:
        return '<td class="none">0</td>'
    parts = []
    if criticals:
        parts.append(f'<span class="sev critical">{criticals} critical</span>')
    if warnings:
        parts.append(f'<span class="sev warning">{warnings} warning</span>')
    return f"<td>{' '.join(parts)}</td>"


def runs_page(rows: Sequence[RunSummary], count: int, *, project: str | None, status: str | None,
              logged_in: bool) -> str:
    options = "".join(f'<option value="{s}"{" selected" if s == status else ""}>{s}</option>'
                      for s in ("", *RUN_STATUSES))
    body_rows = "".join(
        f'<tr data-run-id="{escape(r.run_id)}"><td><a href="/runs/{quote(r.run_id)}">{escape(r.run_id)}</a>'
        f'{f"<div class=sub>{escape(r.name)}</div>" if r.name else ""}</td>'
        f"<td>{escape(r.project)}</td><td><span class=\"status {escape(r.status)}\">{escape(r.status)}</span></td>"
        f"<td>{'—' if r.last_step is None else r.last_step}</td>{_cell(r.loss)}{_cell(r.grad_norm)}"
        f"{_open_cell(r.open_warnings, r.open_criticals)}<td>{_when(r.updated_at)}</td></tr>"
        for r in rows)
    if not rows:
        body_rows = '<tr class="empty"><td colspan="8">no runs yet</td></tr>'
    shown = f"{len(rows)} of {count}" if count > len(rows) else f"{count}"
    body = (f'<h1>Runs <small id="runs-count">{shown}</small></h1>'
            f'<form class="filters" method="get" action="/"><label>project <input name="project" '
            f'value="{escape(project or "")}" size="16"></label> <label>status <select name="status">{options}'
            f'</select></label> <button type="submit">show</button></form>'
            f'<table id="runs" data-project="{escape(project or "")}" data-status="{escape(status or "")}">'
            f"<thead><tr><th>run</th><th>project</th><th>status</th><th>last step</th><th>loss</th>"
            f"<th>grad norm</th><th>open incidents</th><th>updated</th></tr></thead><tbody>{body_rows}</tbody></table>")
    return _page("runs", body, script="runs.js", logged_in=logged_in)


def _incident_rows(incidents: Sequence[Incident]) -> str:
    if not incidents:
        return '<tr class="empty"><td colspan="7">no incidents</td></tr>'
    return "".join(
        f'<tr class="{escape(i.status)}" data-incident="{escape(i.id)}"><td>{i.opened_step}</td>'
        f'<td><span class="sev {escape(i.severity)}">{escape(i.severity)}</span></td><td>{escape(i.signature)}</td>'
        f"<td>{escape(i.layer or '—')}</td><td>{escape(i.status)}"
        f"{'' if i.resolved_step is None else f' at {i.resolved_step}'}</td><td>{escape(i.message)}</td></tr>"
        for i in incidents)


def run_page(run: RunPublic, incidents: Sequence[Incident], *, max_points: int, logged_in: bool) -> str:
    name = f" — {escape(run.name)}" if run.name else ""
    body = (f'<div id="run" data-run-id="{escape(run.run_id)}" data-max-points="{max_points}">'
            f'<h1>{escape(run.run_id)}{name} <span id="run-status" class="status {escape(run.status)}">'
            f"{escape(run.status)}</span></h1>"
            f'<p class="meta">project <b>{escape(run.project)}</b> · <span id="run-steps">{run.n_steps}</span> steps'
            f' · last step <span id="run-last-step">{"—" if run.last_step is None else run.last_step}</span>'
            f" · {len(run.layers)} layers · updated {_when(run.updated_at)}</p>"
            f'<p id="load-error" class="error" hidden></p>'
            f'<section><h2>Loss and gradient norm <small>log scale · incidents marked · '
            f'non-finite steps in purple</small></h2><canvas id="chart-main" height="300"></canvas></section>'
            f'<section><h2>Per-layer gradient norm <small>each layer against its own median · the root-cause '
            f'layer outlined</small></h2><canvas id="chart-heatmap" height="240"></canvas></section>'
            f'<section><h2>Update-to-weight ratio <small>update norm ÷ weight norm, log scale</small></h2>'
            f'<canvas id="chart-ratio" height="180"></canvas></section>'
            f'<section><h2>Incidents</h2><table id="incidents"><thead><tr><th>step</th><th>severity</th>'
            f"<th>signature</th><th>root-cause layer</th><th>status</th><th>what</th></tr></thead>"
            f"<tbody>{_incident_rows(incidents)}</tbody></table></section></div>")
    return _page(run.run_id, body, script="run.js", logged_in=logged_in)


def login_page(*, next_path: str, message: str | None = None) -> str:
    error = f'<p class="error">{escape(message)}</p>' if message else ""
    body = (f"<h1>Log in</h1>{error}<form method=\"post\" action=\"/login\" class=\"login\">"
            f'<input type="hidden" name="next" value="{escape(next_path)}">'
            f'<label>API token with the read scope <input type="password" name="token" autocomplete="off" '
            f'required size="48" autofocus></label> <button type="submit">log in</button></form>'
            f'<p class="sub">Make one with <code>gradwatch token create --name me --scope read</code>. It is kept in a '
            f"cookie only this site's pages receive, until the browser closes.</p>")
    return _page("log in", body)


def not_found_page(run_id: str) -> str:
    return _page("not found", f'<h1>Not found</h1><p>Run <code>{escape(run_id)}</code> does not exist (or belongs to '
                              f'a project this token does not see). <a href="/">All runs</a></p>')
