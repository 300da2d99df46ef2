"""How fast the built-in run page opens on a long run: it reads the downsampled series the API serves, so a
10^6-step run should open about as fast as a short one.

Run: `python bench/page.py [--quick] [--json] [--steps N] [--layers L] [--repeat R] [--backends sqlite,postgres]`

Per database, a gradwatch (`gradwatch serve`, one worker) ingests one run of N steps (default 10^6, --quick
50,000) and L layers (default 50), as bench/query.py makes them (an explosion in the last 1 %, ending in NaN).
Then R times (default 10, --quick 3): GET /ui/runs/{id}/data (what the page's script fetches: the run, its
incidents, loss, grad norm, update and learning-rate series and every layer's gradient and weight norm at 1,000
points) timed client side; and the page itself opened in headless chromium (Playwright, Debian's `chromium`),
timed from navigation start to the end of its first drawing of every chart (`window.__gradwatch.firstDrawnMs`).
Without chromium or Playwright the page figures are null and `page_reason` says why.

JSON keys: per database `<db>_data_p50_ms`, `<db>_data_p99_ms`, `<db>_data_kb`, `<db>_page_load_p50_ms`,
`<db>_page_load_max_ms`; over the databases (the worse one): `data_p50_ms`, `page_load_p50_ms`; and `steps`,
`layers`, `page_reason`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BenchServer, emit, fresh_database, percentile, print_table  # noqa: E402
from query import Api, ingest_run  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def chromium() -> tuple[str | None, str | None]:
    """(chromium's path, None), or (None, why the page cannot be timed)."""
    path = os.environ.get("GRADWATCH_TEST_CHROMIUM") or shutil.which("chromium")
    if not path:
        return None, "chromium is not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return None, f"playwright is not installed: {exc}"
    return path, None


def page_loads(url: str, path: str, repeat: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            for _ in range(repeat):
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                page = context.new_page()
                page.goto(url)
                page.wait_for_function("() => window.__gradwatch && window.__gradwatch.loaded", timeout=60_000)
                out.append(float(page.evaluate("() => window.__gradwatch.firstDrawnMs")))
                context.close()
        finally:
            browser.close()
    return out


def figures_for(backend: str, n: int, n_layers: int, repeat: int, workdir: Path, browser: str | None) -> dict[str, Any]:
    with fresh_database(backend, workdir) as url:
        server = BenchServer(url, workdir / f"server-{backend}.log")
        server.start()
        try:
            api = Api(server.url)
            run_id = f"page-{backend}"
            started = time.perf_counter()
            ingest_run(api, run_id, n, n_layers)
            print(f"{backend}: {n:,} steps of {n_layers} layers ingested in {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)
            api.call("PUT", f"/v1/runs/{run_id}", b'{"status": "finished"}')
            took, size = [], 0
            for _ in range(repeat):
                start = time.perf_counter()
                api.conn.request("GET", f"/ui/runs/{run_id}/data?max_points=1000")
                answer = api.conn.getresponse()
                body = answer.read()
                if answer.status != 200:
                    raise SystemExit(f"GET /ui/runs/{run_id}/data: {answer.status} {body[:300]!r}")
                took.append((time.perf_counter() - start) * 1000)
                size = len(body)
            api.close()
            loads = page_loads(f"{server.url}/runs/{run_id}", browser, repeat) if browser else []
        finally:
            server.stop()
    return {f"{backend}_data_p50_ms": statistics.median(took), f"{backend}_data_p99_ms": percentile(took, 99),
            f"{backend}_data_kb": size / 1024,
            f"{backend}_page_load_p50_ms": statistics.median(loads) if loads else None,
            f"{backend}_page_load_max_ms": max(loads) if loads else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--layers", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--backends", default="sqlite,postgres")
    args = ap.parse_args()
    n = args.steps or (50_000 if args.quick else 1_000_000)
    repeat = args.repeat or (3 if args.quick else 10)
    browser, reason = chromium()
    figures: dict[str, Any] = {"steps": n, "layers": args.layers, "page_reason": reason}
    backends = [b for b in args.backends.split(",") if b]
    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-page-") as tmp:
        for backend in backends:
            figures.update(figures_for(backend, n, args.layers, repeat, Path(tmp), browser))
    figures["data_p50_ms"] = max(figures[f"{b}_data_p50_ms"] for b in backends)
    loads = [figures[f"{b}_page_load_p50_ms"] for b in backends]
    figures["page_load_p50_ms"] = None if None in loads else max(loads)
    if not args.json:
        print_table(f"run page on a {n:,}-step run of {args.layers} layers ({repeat} loads each)",
                    [(k, v) for k, v in figures.items() if v is not None])
    emit(figures, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
