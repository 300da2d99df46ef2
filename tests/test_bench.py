"""The benchmarks keep working: each runs in --quick mode and prints the JSON keys its issue names.

No timing is asserted here (timings belong in docs/benchmarks.md); only that every figure is there and sane.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .support.databases import require_postgres

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, *args: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--json", *args], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _non_public_imports(script: Path) -> list[str]:
    """What a benchmark imports from gradwatch's private modules or names, or from the tests."""
    found = []
    for node in ast.walk(ast.parse(script.read_text(), str(script))):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules, names = [node.module], [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            modules, names = [a.name for a in node.names], []
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "tests" or (parts[0] in ("gradwatch", "gradwatch_service")
                                       and any(p.startswith("_") for p in parts[1:] + names)):
                found.append(f"{script.name}:{node.lineno}: {module} {names}")
    return found


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_benchmarks_use_only_public_names_and_nothing_from_the_tests(script: str) -> None:
    assert _non_public_imports(BENCH / script) == []


@pytest.mark.slow
def test_ingest_benchmark_reports_its_figures() -> None:
    require_postgres()
    figures = _run("ingest.py", "--steps", "500", "--alerting", "both")
    keys = {"sqlite_values_per_s", "sqlite_raw_values_per_s", "sqlite_ratio_to_raw", "postgres_values_per_s",
            "postgres_raw_values_per_s", "postgres_ratio_to_raw", "service_rss_mb", "ingest_alerting_on_vs_off",
            *(f"{db}_{k}" for db in ("sqlite", "postgres") for k in (
                "alerting_off_values_per_s", "alerting_on_values_per_s", "ingest_alerting_on_vs_off"))}
    assert keys <= set(figures)
    assert all(figures[k] > 0 for k in keys)
    assert figures["sqlite_ratio_to_raw"] == pytest.approx(
        figures["sqlite_values_per_s"] / figures["sqlite_raw_values_per_s"], rel=0.01)
    # with one pair (--quick) the ratio is that pair's; the overall figure is the worse database's
    assert figures["sqlite_ingest_alerting_on_vs_off"] == pytest.approx(
        figures["sqlite_alerting_on_values_per_s"] / figures["sqlite_alerting_off_values_per_s"], rel=0.01)
    assert figures["ingest_alerting_on_vs_off"] == min(figures["sqlite_ingest_alerting_on_vs_off"],
                                                       figures["postgres_ingest_alerting_on_vs_off"])
    assert figures["sqlite_alerting_scrapes"] >= 1 and figures["postgres_alerting_scrapes"] >= 1


@pytest.mark.slow
def test_ingest_against_another_checkout_reports_both_sides_and_the_service_cpu() -> None:
    """`--against` this very checkout: both sides run, each side's CPU a step is counted from /proc."""
    figures = _run("ingest.py", "--steps", "2000", "--backends", "sqlite", "--pairs", "1",
                   "--against", str(BENCH.parent))  # 8,000 steps: some tens of the CPU clock's 10 ms ticks
    keys = {f"sqlite_{k}" for k in ("values_per_s", "against_values_per_s", "ratio_to_against", "cpu_us_per_step",
                                    "against_cpu_us_per_step", "cpu_ratio_to_against")}
    assert keys <= set(figures)
    assert all(figures[k] > 0 for k in keys)
    assert len(figures["sqlite_ratio_to_against_pairs"]) == 1 and figures["sqlite_rollups_settled_ms"] >= 0


@pytest.mark.slow
def test_storage_benchmark_reports_bytes_per_value() -> None:
    require_postgres()
    figures = _run("storage.py", "--steps", "2000")
    assert set(figures) == {"sqlite_bytes_per_value", "postgres_bytes_per_value"}
    # a float64 per value is the floor; the row and page overhead must stay modest
    assert 8.0 < figures["sqlite_bytes_per_value"] < 16.0
    assert 8.0 < figures["postgres_bytes_per_value"] < 24.0


@pytest.mark.slow
def test_detect_benchmark_reports_its_figures() -> None:
    figures = _run("detect.py")
    assert figures["detect_us_per_step_50_layers"] > 0
    assert 0 < figures["ingest_ratio_detection_on"] < 2


@pytest.mark.slow
@pytest.mark.torch
def test_client_overhead_benchmark_reports_its_figures() -> None:
    pytest.importorskip("torch")
    figures = _run("client_overhead.py")
    for key in ("norms_vs_floor", "step_overhead_pct", "plain_step_pct", "aa_step_pct", "log_p99_us_up",
                "log_p99_us_down", "log_p99_us_hung"):
        assert isinstance(figures[key], float), key
    assert figures["norms_vs_floor"] > 0 and figures["log_p99_us_hung"] > 0
    assert "wandb_watch_step_overhead_pct" in figures  # null with --quick, and the reason says so
    assert figures["wandb_watch_step_overhead_pct"] is None and figures["wandb_reason"]


@pytest.mark.slow
def test_alert_latency_benchmark_reports_its_figures() -> None:
    require_postgres()
    figures = _run("alert_latency.py")
    for key in ("webhook_p50_ms", "webhook_p99_ms", "sqlite_webhook_p50_ms", "sqlite_webhook_p99_ms",
                "postgres_webhook_p50_ms", "postgres_webhook_p99_ms"):
        assert figures[key] > 0, key
    assert figures["webhook_p50_ms"] <= figures["webhook_p99_ms"]
    # Prometheus with the shipped intervals (one run under --quick), or null and why where the binary is missing
    if figures["prometheus_firing_s"] is None:
        assert figures["prometheus_reason"] and figures["prometheus_firing_runs"] == 0
    else:
        assert 0 < figures["prometheus_firing_s"] <= figures["prometheus_firing_max_s"]
        assert figures["prometheus_firing_runs"] == 1
        assert figures["prometheus_scrape_interval_s"] > 0 and figures["prometheus_evaluation_interval_s"] > 0


@pytest.mark.slow
def test_dashboards_benchmark_reports_its_figures() -> None:
    require_postgres()
    figures = _run("dashboards.py", "--steps", "100000", "--layers", "4")
    assert figures["steps"] == 100_000
    for panel in ("loss", "grad_norm", "heatmap", "update_ratio", "lr", "nonfinite"):
        assert figures[f"{panel}_ms"] > 0 and figures[f"{panel}_raw_ms"] > 0, panel
        assert figures[f"{panel}_width"] in (64, 256, 1024, 4096, 16384), panel  # 10^5 steps: a rollup level
        assert 0 < figures[f"{panel}_rows"] < figures[f"{panel}_raw_rows"], panel


def test_soak_benchmark_reports_its_figures() -> None:
    figures = _run("soak.py", "--seconds", "4", "--runs", "10", "--procs", "2", "--probe-memory")
    for key in ("throughput_values_per_s", "p99_ms", "p99_ms_first_half", "p99_ms_second_half", "rss_mb_start",
                "rss_mb_end"):
        assert figures[key] > 0, key
    assert isinstance(figures["rss_slope_mb_per_min_last_half"], float)
    assert figures["errors"] == 0 and figures["runs"] == 10 and figures["batches"] > 0
    series = figures["series"]
    assert len(series) == 4 and sum(row["batches"] for row in series) == figures["batches"]
    assert all(row["rss_mb"] > 0 and row["p50_ms"] <= row["p99_ms"] for row in series)
    assert all(0.0 <= row["steal_pct"] <= 100.0 for row in series)  # /proc/stat: this machine is Linux
    assert figures["intervals_with_steal"] == sum(row["steal_pct"] > 1.0 for row in series)
    if figures["intervals_with_steal"] == 0:  # nothing left out: the calm p99s are the halves' own
        assert figures["p99_ms_first_half_calm"] == figures["p99_ms_first_half"]
        assert figures["p99_ms_second_half_calm"] == figures["p99_ms_second_half"]
    memory = figures["memory"]  # bench/_memory_probe.py's view from inside the service
    assert 0 < memory["malloc_in_use_mb"]["end"] < memory["rss_anon_mb"]["end"] <= figures["rss_mb_end"]
    assert memory["python_blocks"]["end"] > 10_000 and memory["gc_objects"]["end"] > 10_000
    assert 0 < memory["pymalloc_in_use_mb"]["end"] <= memory["pymalloc_arenas_mb"]["end"] < figures["rss_mb_end"]
    assert memory["threads"]["end"] >= 2  # the service's own and the probe's
    assert all(isinstance(m["slope_per_min_last_half"], float) for m in memory.values())


@pytest.mark.slow
def test_query_benchmark_reports_its_figures() -> None:
    require_postgres()
    figures = _run("query.py", "--steps", "20000", "--short", "3000", "--repeat", "2",
                   "--ingest-steps", "500")
    keys = {"series_p50_ms", "layer_p50_ms", "heatmap_p50_ms", "long_vs_short", "ingest_rollups_ratio"}
    assert keys <= set(figures)
    assert all(figures[k] > 0 for k in keys)
    assert figures["ingest_rollups_ratio"] == min(figures["sqlite_ingest_rollups_ratio"],
                                                  figures["postgres_ingest_rollups_ratio"])


@pytest.mark.slow
def test_page_benchmark_reports_its_figures() -> None:
    from .support.browser import require_chromium

    require_chromium()
    figures = _run("page.py", "--backends", "sqlite", "--steps", "5000", "--repeat", "2")
    assert figures["steps"] == 5000 and figures["page_reason"] is None
    for key in ("sqlite_data_p50_ms", "sqlite_data_kb", "sqlite_page_load_p50_ms", "data_p50_ms", "page_load_p50_ms"):
        assert figures[key] > 0, key
