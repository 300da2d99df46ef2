"""Generate gradwatch's Grafana dashboards from code: deploy/grafana/dashboards/{fleet,run}.json.

    .venv/bin/python tools/dashboards.py          # (re)write the JSON (`make dashboards`)
    .venv/bin/python tools/dashboards.py --check  # exit 1, naming the files, if the committed JSON differs

Built with Grafana's own grafana-foundation-sdk (the dev extra), so the JSON has the schema Grafana's tooling
writes; the SDK has no PostgreSQL query type, so `Sql` below is one (the data source's documented fields).
Two data sources, by the uids deploy/grafana/provisioning/ gives them: `prometheus` (what /metrics exports:
the fleet, alerts, service health) and `gradwatch-postgres` (the database, read as `gradwatch_reader`: every
step, layer and incident). docs/dashboards.md says what each panel shows.

Run-level panels read the step rollups for long runs: each query first picks the coarsest level (buckets of
16384, 4096, 1024, 256 or 64 steps, or the raw steps) that still gives the panel at least one bucket per point it
can draw (Grafana's time range over $__interval_ms), and draws every bucket's finite minimum and maximum at their
own steps, as GET /v1/runs/{id}/series downsamples: a spike survives any zoom level.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import heatmap as heatmap_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import table as table_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, dashboard
from grafana_foundation_sdk.models import heatmap as heatmap_m

from gradwatch_service.storage.models import ROLLUP_WIDTHS  # each 4x the one before

OUT_DIR = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards"

PROMETHEUS = dashboard.DataSourceRef(type_val="prometheus", uid="prometheus")
POSTGRES = dashboard.DataSourceRef(type_val="grafana-postgresql-datasource", uid="gradwatch-postgres")
FLEET_UID, RUN_UID = "gradwatch-fleet", "gradwatch-run"
TAGS = ["gradwatch"]
CRITICAL, WARNING, OK = "red", "orange", "green"


# --- a PostgreSQL query (the SDK has none) ---------------------------------------------------------------------

class SqlQuery(cogvariants.Dataquery):
    """A raw-SQL target of Grafana's PostgreSQL data source: `format` is time_series or table."""

    def __init__(self, ref_id: str, raw_sql: str, format_val: str) -> None:
        self.ref_id, self.raw_sql, self.format_val = ref_id, raw_sql, format_val

    def to_json(self) -> dict[str, object]:
        return {"datasource": POSTGRES, "editorMode": "code", "format": self.format_val, "rawQuery": True,
                "rawSql": self.raw_sql, "refId": self.ref_id}


class Sql(cogbuilder.Builder[cogvariants.Dataquery]):
    def __init__(self, raw_sql: str, format_val: str = "time_series", ref_id: str = "A") -> None:
        self._query = SqlQuery(ref_id, _dedent(raw_sql), format_val)

    def build(self) -> SqlQuery:
        return self._query


def _dedent(sql: str) -> str:
    lines = [line.rstrip() for line in sql.strip("\n").splitlines()]
    indent = min(len(line) - len(line.lstrip()) for line in lines if line)
    return "\n".join(line[indent:] for line in lines)


def promql(expr: str, legend: str = "__auto", ref_id: str = "A", instant: bool = False) -> prom_b.Dataquery:
    query = prom_b.Dataquery().expr(expr).legend_format(legend).ref_id(ref_id).datasource(PROMETHEUS)
    return query.instant().format(prom_b.prometheus.PromQueryFormat.TABLE) if instant else query.range()


# --- SQL shared by the run panels ------------------------------------------------------------------------------

FROM, TO = "$__unixEpochFrom()", "$__unixEpochTo()"
NONFINITE = "('NaN'::float8, 'Infinity'::float8, '-Infinity'::float8)"

COUNT_WIDTH = 1024  # steps in view are counted on this level: at most ~1,000 rows for 10^6 steps
LEVEL_CASE = "\n                  ".join(f"WHEN steps >= {w} * points THEN {w}" for w in reversed(ROLLUP_WIDTHS))

RUN_AND_LEVEL = f"""
    WITH run AS (
      SELECT id, layer_names FROM runs WHERE run_id = '${{run}}'
    ), view AS (
      -- steps in the time range (counted on a rollup level) and how many points the panel can draw
      SELECT coalesce(sum(r.n), 0) AS steps, min(r.first_step) AS lo, max(r.last_step) AS hi,
             ({TO} - {FROM}) * 1000.0 / $__interval_ms AS points
      FROM run LEFT JOIN step_rollups r
        ON r.run_pk = run.id AND r.width = {COUNT_WIDTH} AND r.time_max >= {FROM} AND r.time_min <= {TO}
    ), level AS (
      -- the coarsest level that still has a bucket per point; the raw steps (width 1) when none has
      SELECT CASE {LEVEL_CASE}
                  ELSE 1 END AS width, lo, hi
      FROM view
    ), raw AS (
      SELECT s.* FROM steps s, run, level
      WHERE level.width = 1 AND s.run_pk = run.id AND s.step BETWEEN level.lo AND level.hi
        AND s.time BETWEEN {FROM} AND {TO}
    ), rolled AS (
      SELECT r.* FROM step_rollups r, run, level
      WHERE r.run_pk = run.id AND r.width = level.width AND r.time_max >= {FROM} AND r.time_min <= {TO}
    )"""


def at_step(step: str) -> str:
    """A step's time inside a rollup bucket `r`, interpolated between the bucket's first and last step."""
    return (f"r.time_min + (r.time_max - r.time_min) * ({step} - r.first_step)"
            f" / greatest(r.last_step - r.first_step, 1)")


def scalar_sql(field: str, name: str) -> str:
    """One series of a scalar field: every finite raw value, or each bucket's minimum and maximum at their steps."""
    return f"""{RUN_AND_LEVEL}
    SELECT to_timestamp(t) AS time, v AS "{name}" FROM (
      SELECT time AS t, {field} AS v FROM raw WHERE {field} NOT IN {NONFINITE}
      UNION ALL
      SELECT {at_step("p.step")}, p.v
      FROM rolled r CROSS JOIN LATERAL (VALUES (r.{field}_min_step, r.{field}_min),
                                               (r.{field}_max_step, r.{field}_max)) AS p(step, v)
      WHERE p.v IS NOT NULL
    ) AS points
    ORDER BY 1"""


LR_SQL = f"""{RUN_AND_LEVEL}
    SELECT to_timestamp(t) AS time, v AS "learning rate" FROM (
      SELECT time AS t, lr AS v FROM raw WHERE lr NOT IN {NONFINITE}
      UNION ALL
      SELECT {at_step("r.lr_last_step")}, r.lr_last FROM rolled r WHERE r.lr_last NOT IN {NONFINITE}
    ) AS points
    ORDER BY 1"""

UPDATE_RATIO_SQL = f"""{RUN_AND_LEVEL}, ratios AS (
      -- the step's update norm over the weights' norm, and the largest ratio of any one layer
      SELECT s.time AS t, s.update_norm / w.norm AS total, w.worst
      FROM raw s CROSS JOIN LATERAL (
        SELECT sqrt(sum(wn * wn)) AS norm, max(un / nullif(wn, 0)) AS worst
        FROM unnest(s.layer_weight_norms, s.layer_update_norms) AS l(wn, un)) AS w
      WHERE s.update_norm IS NOT NULL
      UNION ALL
      -- a bucket's largest update norms over its last weight norms (weights move slowly within a bucket)
      SELECT {at_step("r.update_norm_max_step")}, r.update_norm_max / w.norm, w.worst
      FROM rolled r CROSS JOIN LATERAL (
        SELECT sqrt(sum(wn * wn)) AS norm, max(un / nullif(wn, 0)) AS worst
        FROM unnest(r.layer_weight_norms_last, r.layer_update_norms_max) AS l(wn, un)) AS w
      WHERE r.update_norm_max IS NOT NULL
    )
    SELECT to_timestamp(t) AS time,
           CASE WHEN total NOT IN {NONFINITE} THEN total END AS "update / weight",
           CASE WHEN worst NOT IN {NONFINITE} THEN worst END AS "worst layer"
    FROM ratios
    WHERE total NOT IN {NONFINITE} OR worst NOT IN {NONFINITE}
    ORDER BY 1"""

HEATMAP_CAP = 6  # log10 of a layer's norm over its median in view is clipped to [-2, 6]; non-finite shows as 6
LAYER_HEATMAP_SQL = f"""{RUN_AND_LEVEL}, cells AS (
      SELECT s.time AS t, l.i, l.v, l.v IN {NONFINITE} AS bad
      FROM raw s CROSS JOIN LATERAL unnest(s.layer_grad_norms) WITH ORDINALITY AS l(v, i)
      UNION ALL
      SELECT (r.time_min + r.time_max) / 2, l.i, l.v, l.nonfinite > 0
      FROM rolled r CROSS JOIN LATERAL
        unnest(r.layer_grad_norms_max, r.layer_grad_norms_nonfinite) WITH ORDINALITY AS l(v, nonfinite, i)
    ), typical AS (
      SELECT i, percentile_cont(0.5) WITHIN GROUP (ORDER BY v) AS median
      FROM cells WHERE v > 0 AND NOT bad GROUP BY i
    )
    SELECT to_timestamp(c.t) AS time,
           lpad(c.i::text, 3, '0') || ' ' || (run.layer_names ->> (c.i - 1)::int) AS metric,
           CASE WHEN c.bad THEN {HEATMAP_CAP}
                WHEN c.v <= 0 THEN -2
                ELSE greatest(-2, least({HEATMAP_CAP}, log(c.v / t.median))) END AS value
    FROM cells c CROSS JOIN run JOIN typical t USING (i)
    WHERE c.bad OR c.v IS NOT NULL
    ORDER BY 1, 2"""

NONFINITE_STEPS_SQL = f"""{RUN_AND_LEVEL}
    SELECT to_timestamp(t) AS time, loss, grad_norm AS "grad norm" FROM (
      SELECT time AS t, (loss IN {NONFINITE})::int AS loss, (grad_norm IN {NONFINITE})::int AS grad_norm
      FROM raw WHERE loss IN {NONFINITE} OR grad_norm IN {NONFINITE}
      UNION ALL
      SELECT (r.time_min + r.time_max) / 2, r.loss_nonfinite, r.grad_norm_nonfinite
      FROM rolled r WHERE r.loss_nonfinite + r.grad_norm_nonfinite > 0
    ) AS buckets
    ORDER BY 1"""

FIRST_NONFINITE = """
      SELECT min(least(r.loss_nan_step, r.loss_posinf_step, r.loss_neginf_step,
                       r.grad_norm_nan_step, r.grad_norm_posinf_step, r.grad_norm_neginf_step))
      FROM step_rollups r WHERE r.run_pk = runs.id AND r.width = 16384"""

RUN_SUMMARY_SQL = f"""
    SELECT runs.status, runs.last_step AS "last step", runs.n_steps AS steps,
           (SELECT count(*) FROM incidents i WHERE i.run_pk = runs.id AND i.status = 'open') AS "open incidents",
           ({FIRST_NONFINITE.strip()}) AS "first non-finite step"
    FROM runs WHERE runs.run_id = '${{run}}'"""

RUN_INCIDENTS_SQL = """
    SELECT i.seq AS "#", i.severity, i.signature, i.status, i.opened_step AS opened, i.last_step AS "last fired",
           i.resolved_step AS resolved, i.layer AS "first layer", i.message
    FROM incidents i JOIN runs ON runs.id = i.run_pk
    WHERE runs.run_id = '${run}'
    ORDER BY i.seq"""


def incident_annotation_sql(severity: str) -> str:
    return f"""
    SELECT to_timestamp(o.time) AS time, to_timestamp(coalesce(e.time, o.time)) AS timeend,
           i.signature || ' (' || i.severity || ') at step ' || i.opened_step
             || coalesce(', first in ' || i.layer, '') || ': ' || i.message AS text,
           i.signature || ',' || i.severity AS tags
    FROM incidents i
    JOIN runs ON runs.id = i.run_pk
    JOIN steps o ON o.run_pk = i.run_pk AND o.step = i.opened_step
    LEFT JOIN steps e ON e.run_pk = i.run_pk AND e.step = coalesce(i.resolved_step, i.last_step)
    WHERE runs.run_id = '${{run}}' AND i.severity = '{severity}' AND $__unixEpochFilter(o.time)
    ORDER BY 1"""


FIRST_NONFINITE_ANNOTATION_SQL = f"""
    SELECT to_timestamp(s.time) AS time,
           'first non-finite loss or grad norm at step ' || s.step AS text, 'nonfinite' AS tags
    FROM runs JOIN steps s ON s.run_pk = runs.id AND s.step = ({FIRST_NONFINITE.strip()})
    WHERE runs.run_id = '${{run}}' AND $__unixEpochFilter(s.time)"""

RUN_VARIABLE_SQL = "SELECT run_id FROM runs ORDER BY updated_at DESC LIMIT 500"

ACTIVE_RUNS_SQL = """
    -- runs still marked running, and runs updated in the time range; the latest *measured* values, as /metrics
    SELECT r.run_id AS run, p.name AS project, r.status, r.last_step AS "last step",
           (SELECT s.loss FROM steps s WHERE s.run_pk = r.id AND s.loss IS NOT NULL
            ORDER BY s.step DESC LIMIT 1) AS loss,
           (SELECT s.grad_norm FROM steps s WHERE s.run_pk = r.id AND s.grad_norm IS NOT NULL
            ORDER BY s.step DESC LIMIT 1) AS "grad norm",
           (SELECT count(*) FROM incidents i WHERE i.run_pk = r.id AND i.status = 'open') AS "open incidents",
           r.updated_at AS updated,
           floor(extract(epoch FROM r.created_at) * 1000) AS from_ms,
           ceil(extract(epoch FROM r.updated_at) * 1000) + 60000 AS to_ms
    FROM runs r JOIN projects p ON p.id = r.project_id
    WHERE r.status = 'running' OR $__timeFilter(r.updated_at)
    ORDER BY r.updated_at DESC
    LIMIT 200"""

OPEN_INCIDENTS_SQL = """
    SELECT r.run_id AS run, i.severity, i.signature, i.opened_step AS "opened at step", i.layer AS "first layer",
           i.message, i.opened_at AS opened
    FROM incidents i JOIN runs r ON r.id = i.run_pk
    WHERE i.status = 'open'
    ORDER BY i.severity = 'critical' DESC, i.opened_at DESC
    LIMIT 100"""


# --- panel helpers ---------------------------------------------------------------------------------------------

def log_scale() -> common_b.ScaleDistributionConfig:
    return common_b.ScaleDistributionConfig().type(common.ScaleDistribution.LOG).log(10)


def series_panel(title: str, description: str, target: Any, *, log: bool = False, unit: str = "short",
                 span: int = 12, height: int = 8, datasource: dashboard.DataSourceRef = POSTGRES) -> ts_b.Panel:
    panel = (ts_b.Panel().title(title).description(description).datasource(datasource).with_target(target)
             .span(span).height(height).unit(unit).line_width(1).show_points(common.VisibilityMode.NEVER)
             .span_nulls(True)
             .legend(common_b.VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM))
             .tooltip(common_b.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                      .sort(common.SortOrder.DESCENDING)))
    return panel.scale_distribution(log_scale()) if log else panel


def thresholds(*steps: tuple[float | None, str]) -> dash_b.ThresholdsConfig:
    return dash_b.ThresholdsConfig().mode(dashboard.ThresholdsMode.ABSOLUTE).steps(
        [dashboard.Threshold(value=value, color=color) for value, color in steps])


def stat_panel(title: str, description: str, target: Any, *, span: int = 4, unit: str = "short",
               steps: tuple[tuple[float | None, str], ...] = ((None, OK),),
               datasource: dashboard.DataSourceRef = PROMETHEUS) -> stat_b.Panel:
    return (stat_b.Panel().title(title).description(description).datasource(datasource).with_target(target)
            .span(span).height(4).unit(unit).thresholds(thresholds(*steps))
            .color_mode(common.BigValueColorMode.BACKGROUND).graph_mode(common.BigValueGraphMode.NONE)
            .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))


def table_panel(title: str, description: str, target: Any, *, span: int = 24, height: int = 8,
                datasource: dashboard.DataSourceRef = POSTGRES) -> table_b.Panel:
    return (table_b.Panel().title(title).description(description).datasource(datasource).with_target(target)
            .span(span).height(height))


def severity_colours() -> list[dashboard.ValueMapping]:
    return [dashboard.ValueMap(options={
        "critical": dashboard.ValueMappingResult(color=CRITICAL, index=0),
        "warning": dashboard.ValueMappingResult(color=WARNING, index=1),
    })]


def colour_cells() -> dict[str, Any]:
    return {"type": "color-text"}


# --- the dashboards --------------------------------------------------------------------------------------------

def fleet() -> dash_b.Dashboard:
    run_link = (f"/d/{RUN_UID}/gradwatch-run?var-run=${{__value.raw}}"
                "&from=${__data.fields.from_ms}&to=${__data.fields.to_ms}")
    active_runs = (
        table_panel("Active runs", "Runs marked running and runs updated in the time range (PostgreSQL), with "
                    "their latest measured loss and gradient norm (NaN and Inf shown as they are) and open "
                    "incidents. Click a run for its own dashboard.", Sql(ACTIVE_RUNS_SQL, "table"), height=9)
        .override_by_name("run", [dashboard.DynamicConfigValue(id_val="links", value=[
            {"title": "Open the run's dashboard", "url": run_link}])])
        .override_by_name("open incidents", [
            dashboard.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-background"}),
            dashboard.DynamicConfigValue(id_val="thresholds", value=thresholds((None, OK), (1, CRITICAL)).build())])
        .override_by_name("from_ms", [dashboard.DynamicConfigValue(id_val="custom.hidden", value=True)])
        .override_by_name("to_ms", [dashboard.DynamicConfigValue(id_val="custom.hidden", value=True)])
        .override_by_name("loss", [dashboard.DynamicConfigValue(id_val="decimals", value=4)])
        .override_by_name("grad norm", [dashboard.DynamicConfigValue(id_val="decimals", value=4)])
    )
    open_incidents = (
        table_panel("Open incidents", "Every open incident (PostgreSQL), critical first: the signature, the step "
                    "it opened at and the layer whose norm broke out of its band first.",
                    Sql(OPEN_INCIDENTS_SQL, "table"), height=8)
        .override_by_name("severity", [
            dashboard.DynamicConfigValue(id_val="custom.cellOptions", value=colour_cells()),
            dashboard.DynamicConfigValue(id_val="mappings", value=severity_colours())])
    )
    firing = (
        table_panel("Alerts firing", "Prometheus' ALERTS in state firing: the rules of deploy/prometheus/rules.yml "
                    "(runbook: docs/runbook.md).",
                    promql('max by (alertname, severity, project, run) (ALERTS{alertstate="firing"})',
                           instant=True), span=12, height=8, datasource=PROMETHEUS)
        .with_transformation(dashboard.DataTransformerConfig(id_val="organize", options={
            "excludeByName": {"Time": True, "Value": True}}))
    )
    return (
        dash_b.Dashboard("gradwatch: fleet").uid(FLEET_UID).tags(TAGS).editable().refresh("30s")
        .time("now-1h", "now").timezone("browser").tooltip(dashboard.DashboardCursorSync.CROSSHAIR)
        .description("Every active training run, its incidents and alerts, and the gradwatch service's health.")
        .link(dash_b.DashboardLink("Run").type(dashboard.DashboardLinkType.DASHBOARDS).tags(TAGS)
              .as_dropdown(True).include_vars(False).keep_time(True))
        .with_row(dash_b.Row("Runs"))
        .with_panel(stat_panel("Active runs", "Runs updated within GRADWATCH_METRICS_ACTIVE_SECONDS.",
                               promql("max(gradwatch_runs_active)")))
        .with_panel(stat_panel("Open incidents by severity", "Open incidents of active runs (one count per run, "
                               "signature and severity, however many replicas report it).",
                               promql("sum by (severity) (max by (project, run, signature, severity) "
                                      "(gradwatch_run_open_incidents))", "{{severity}}"),
                               span=8, steps=((None, OK), (1, CRITICAL))))
        .with_panel(stat_panel("Alerts firing", "Prometheus alerts in state firing, every rule.",
                               promql('count(ALERTS{alertstate="firing"}) or vector(0)'),
                               steps=((None, OK), (1, CRITICAL))))
        .with_panel(stat_panel("Runs not exported", "Active runs left out of /metrics by "
                               "GRADWATCH_METRICS_MAX_RUNS: the run panels cannot see them.",
                               promql("max(gradwatch_runs_not_exported)"), steps=((None, OK), (1, WARNING))))
        .with_panel(stat_panel("Run state readable", "1 when gradwatch could read run state from the database "
                               "at its last scrape; 0 means the run alerts are blind.",
                               promql("min(gradwatch_run_state_up)"), steps=((None, CRITICAL), (1, OK))))
        .with_panel(active_runs)
        .with_panel(series_panel("Latest loss by run", "gradwatch_run_loss: each active run's latest measured "
                                 "loss (log scale; NaN and Inf leave gaps, the Active runs table shows them).",
                                 promql("max by (project, run) (gradwatch_run_loss)", "{{run}}"), log=True,
                                 datasource=PROMETHEUS))
        .with_panel(series_panel("Latest gradient norm by run", "gradwatch_run_grad_norm: each active run's "
                                 "latest measured total gradient norm (log scale).",
                                 promql("max by (project, run) (gradwatch_run_grad_norm)", "{{run}}"), log=True,
                                 datasource=PROMETHEUS))
        .with_panel(open_incidents.span(12))
        .with_panel(firing)
        .with_row(dash_b.Row("Service"))
        .with_panel(stat_panel("gradwatch up", "Prometheus' up{job=\"gradwatch\"}, the least of the replicas.",
                               promql('min(up{job="gradwatch"})'), steps=((None, CRITICAL), (1, OK))))
        .with_panel(stat_panel("Webhook outbox", "Webhook deliveries waiting to be sent or retried.",
                               promql("max(gradwatch_webhook_outbox_depth)"), steps=((None, OK), (100, WARNING))))
        .with_panel(stat_panel("5xx share", "Share of requests answered 5xx over the last 5 minutes.",
                               promql('(sum(rate(gradwatch_http_requests_total{status=~"5.."}[5m])) or vector(0))'
                                      " / sum(rate(gradwatch_http_requests_total[5m]))"),
                               unit="percentunit", steps=((None, OK), (0.01, WARNING), (0.05, CRITICAL))))
        .with_panel(stat_panel("Database errors", "Database errors raised to the service over the last 5 minutes, "
                               "every replica.",
                               promql("sum(increase(gradwatch_database_errors_total[5m])) or vector(0)"),
                               steps=((None, OK), (1, CRITICAL))))
        .with_panel(stat_panel("Ingest p99 batch", "99th percentile of the steps per ingested batch, 5 minutes.",
                               promql("histogram_quantile(0.99, sum by (le) "
                                      "(rate(gradwatch_ingest_batch_steps_bucket[5m])))")))
        .with_panel(stat_panel("Detector p99", "99th percentile of the detectors' time per batch, 5 minutes.",
                               promql("histogram_quantile(0.99, sum by (le) "
                                      "(rate(gradwatch_detector_duration_seconds_bucket[5m])))"), unit="s"))
        .with_panel(series_panel("Ingest rate", "Steps and measured values stored per second (resent duplicates "
                                 "not counted), every replica.", promql(
                                     "sum(rate(gradwatch_ingested_steps_total[$__rate_interval]))", "steps/s"),
                                 span=8, datasource=PROMETHEUS)
                    .with_target(promql("sum(rate(gradwatch_ingested_values_total[$__rate_interval]))",
                                        "values/s", ref_id="B")))
        .with_panel(series_panel("Request latency", "p50 and p99 of the time from a request's arrival to the end "
                                 "of its response, by route template.", promql(
                                     "histogram_quantile(0.99, sum by (le, route) "
                                     "(rate(gradwatch_http_request_duration_seconds_bucket[$__rate_interval])))",
                                     "p99 {{route}}"), unit="s", span=8, datasource=PROMETHEUS)
                    .with_target(promql("histogram_quantile(0.5, sum by (le, route) "
                                        "(rate(gradwatch_http_request_duration_seconds_bucket[$__rate_interval])))",
                                        "p50 {{route}}", ref_id="B")))
        .with_panel(series_panel("Requests by status", "Requests answered per second, by status code.", promql(
            "sum by (status) (rate(gradwatch_http_requests_total[$__rate_interval]))", "{{status}}"),
            unit="reqps", span=8, datasource=PROMETHEUS))
    )


def run() -> dash_b.Dashboard:
    variable = (dash_b.QueryVariable("run").label("Run").datasource(POSTGRES).query(RUN_VARIABLE_SQL)
                .refresh(dashboard.VariableRefresh.ON_DASHBOARD_LOAD).sort(dashboard.VariableSort.DISABLED))
    annotations = [
        _annotation("Critical incidents", CRITICAL, incident_annotation_sql("critical")),
        _annotation("Warnings", WARNING, incident_annotation_sql("warning")),
        _annotation("First non-finite step", "purple", FIRST_NONFINITE_ANNOTATION_SQL),
    ]
    heatmap = (
        heatmap_b.Panel().title("Per-layer gradient norms").datasource(POSTGRES).span(24).height(10)
        .max_data_points(250)  # cells a few pixels wide: a quarter of the steps (or buckets) a line panel reads
        .description("Each layer's gradient norm (largest in each bucket) over its own median in view, as log10, "
                     f"clipped to [-2, {HEATMAP_CAP}]; NaN and Inf show at the top of the scale. A layer that blows "
                     "up first lights up first. Rows are the layers in the run's order.")
        .with_target(Sql(LAYER_HEATMAP_SQL))
        .calculate(False)
        .rows_frame(heatmap_b.RowsHeatmapOptions().layout(common.HeatmapCellLayout.UNKNOWN))
        .color(heatmap_b.HeatmapColorOptions().mode(heatmap_m.HeatmapColorMode.SCHEME).scheme("Turbo")
               .scale(heatmap_m.HeatmapColorScale.LINEAR).steps(64).min(-2).max(HEATMAP_CAP))
        .y_axis(heatmap_b.YAxisConfig().axis_placement(common.AxisPlacement.LEFT).reverse(True))
        .filter_values(heatmap_b.FilterValueRange().le(-1e9))  # the default hides cells <= 1e-9: most of ours
        .cell_gap(0).show_value(common.VisibilityMode.NEVER).show_legend()
    )
    nonfinite = (
        series_panel("Non-finite steps", "Steps whose loss or gradient norm is NaN or Inf (a count per bucket "
                     "at the rollup levels). Grafana cannot draw NaN, so they are marked here and by the purple "
                     "annotation at the first one.", Sql(NONFINITE_STEPS_SQL), span=12)
        .draw_style(common.GraphDrawStyle.BARS).fill_opacity(80).span_nulls(False)
        .color_scheme(dash_b.FieldColor().mode(dashboard.FieldColorModeId.FIXED).fixed_color("purple"))
    )
    incidents = (
        table_panel("Incidents", "The run's incidents (PostgreSQL), with the layer whose norm broke out first.",
                    Sql(RUN_INCIDENTS_SQL, "table"), span=16, height=7)
        .override_by_name("severity", [
            dashboard.DynamicConfigValue(id_val="custom.cellOptions", value=colour_cells()),
            dashboard.DynamicConfigValue(id_val="mappings", value=severity_colours())])
    )
    alerts = table_panel("Alerts firing for this run", "Prometheus alerts in state firing with run=\"$run\".",
                         promql('max by (alertname, severity) (ALERTS{alertstate="firing", run="${run}"})',
                                instant=True), span=8, height=7, datasource=PROMETHEUS)
    return (
        dash_b.Dashboard("gradwatch: run").uid(RUN_UID).tags(TAGS).editable().refresh("30s")
        .time("now-6h", "now").timezone("browser").tooltip(dashboard.DashboardCursorSync.CROSSHAIR)
        .description("One training run: loss, gradient norms, per-layer norms, update ratio and learning rate, "
                     "incidents marked. Long runs read the step rollups.")
        .link(dash_b.DashboardLink("Fleet").type(dashboard.DashboardLinkType.DASHBOARDS).tags(TAGS)
              .as_dropdown(True).keep_time(True))
        .with_variable(variable)
        .annotations(annotations)
        .with_panel(stat_panel("Run", "Status, last step, steps stored, open incidents and the first step whose "
                               "loss or grad norm is not finite.", Sql(RUN_SUMMARY_SQL, "table"), span=24,
                               datasource=POSTGRES)
                    .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(True).fields("/.*/"))
                    .color_mode(common.BigValueColorMode.NONE))
        .with_panel(series_panel("Loss", "Loss on a log scale: each bucket's finite minimum and maximum at their "
                                 "steps (every step when zoomed in); incidents as annotations.",
                                 Sql(scalar_sql("loss", "loss")), log=True))
        .with_panel(series_panel("Gradient norm", "Total gradient norm before clipping, log scale, as for the "
                                 "loss; incidents as annotations.", Sql(scalar_sql("grad_norm", "grad norm")),
                                 log=True))
        .with_panel(heatmap)
        .with_panel(series_panel("Update / weight ratio", "The step's update norm over the weights' norm, and the "
                                 "largest ratio of any one layer (sampled steps only), log scale.",
                                 Sql(UPDATE_RATIO_SQL), log=True, span=12))
        .with_panel(series_panel("Learning rate", "The learning rate logged with each step (last in each bucket).",
                                 Sql(LR_SQL), span=12))
        .with_panel(nonfinite)
        .with_panel(incidents)
        .with_panel(alerts)
    )


def _annotation(name: str, colour: str, sql: str) -> dash_b.AnnotationQuery:
    target = Sql(sql, "table", ref_id="Anno")
    return dash_b.AnnotationQuery().name(name).datasource(POSTGRES).enable(True).icon_color(colour).target(target)


# --- output ----------------------------------------------------------------------------------------------------

def render() -> dict[str, str]:
    """File name -> the dashboard's JSON text, as committed."""
    return {f"{name}.json": json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"
            for name, build in (("fleet", fleet), ("run", run))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run `make dashboards`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
