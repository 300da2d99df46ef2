"""The built-in pages in a real headless browser (Playwright + chromium) against a live server, on SQLite and
PostgreSQL: no console errors, the charts hold the stored points (read from the page's `window.__gradwatch`,
not its pixels), an incident shows within seconds of the ingest that opened it, and the login holds the token
the way it should."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gradwatch.wire import encode_binary_batch
from gradwatch_service.storage.db import make_engine, read_connection
from gradwatch_service.storage.rollups import lagging_runs

from ..support.browser import CHROMIUM_ARGS, require_chromium
from ..support.databases import new_run_id
from ..support.serverproc import ServerProcess
from ..support.trace_files import LAYERS, exploding_trace

LOADED = "() => window.__gradwatch && window.__gradwatch.loaded"
"""(A function, not an expression: polling an expression is an eval, which the page's CSP forbids.)"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Tab:
    """A page in a fresh browser context, with every console error and uncaught exception it shows."""

    def __init__(self, browser: Any, base_url: str) -> None:
        self.context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"{m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def data(self, expression: str = "window.__gradwatch") -> Any:
        return self.page.evaluate(f"JSON.parse(JSON.stringify({expression}))")


@pytest.fixture
def tab(browser: Any, server: ServerProcess) -> Iterator[Tab]:
    t = Tab(browser, server.url)
    yield t
    t.context.close()


def steps_body(lines: list[dict[str, Any]]) -> dict[str, Any]:
    return {"layers": LAYERS, "steps": [
        {"step": s["step"], "loss": s["loss"], "grad_norm": s["grad_norm"], "lr": s["lr"],
         "update_norm": s["update_norm"],
         "layer_grad_norms": [s["layer_grad_norms"][n] for n in LAYERS],
         "layer_weight_norms": [s["layer_weight_norms"][n] for n in LAYERS]} for s in lines]}


def make_run(http: httpx.Client, run_id: str, lines: list[dict[str, Any]], status: str = "finished") -> None:
    assert http.put(f"/v1/runs/{run_id}", json={"project": "pages", "name": "page test"}).status_code in (200, 201)
    if lines:
        http.post(f"/v1/runs/{run_id}/steps", json=steps_body(lines)).raise_for_status()
    http.put(f"/v1/runs/{run_id}", json={"status": status}).raise_for_status()


def wait_for_rollups(url: str, timeout_s: float = 30.0) -> None:
    """The server's rollup worker merges acknowledged steps after their commit, and a downsampled series reads
    the steps above the rollups raw: two reads of a long run show the same points once it holds every step."""
    engine = make_engine(url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with read_connection(engine) as conn:
                if not lagging_runs(conn):
                    return
            assert time.monotonic() < deadline, "the rollups did not catch up with the steps"
            time.sleep(0.05)
    finally:
        engine.dispose()


def by_field(series: list[dict[str, Any]], field: str, layer: str | None = None) -> dict[str, Any]:
    (s,) = [s for s in series if s["field"] == field and s["layer"] == layer]
    return {"steps": s["steps"], "values": s["values"]}


def test_run_page_holds_the_stored_points(tab: Tab, http: httpx.Client) -> None:
    run_id = new_run_id("page")
    lines = exploding_trace(run_id)[1:]
    make_run(http, run_id, lines)
    tab.page.goto(f"/runs/{run_id}")
    tab.page.wait_for_function(LOADED, timeout=15_000)
    charts = tab.data("window.__gradwatch.charts")
    stored = http.get(f"/v1/runs/{run_id}/steps").json()["steps"]
    assert len(stored) == len(lines) == 81
    for field in ("loss", "grad_norm"):  # a short run: every stored point, exactly, "NaN" and "Infinity" too
        assert charts["main"]["series"][field] == {"steps": [s["step"] for s in stored],
                                                   "values": [s[field] for s in stored]}
    assert charts["main"]["nonfinite_steps"] == [80]
    incidents = http.get(f"/v1/runs/{run_id}/incidents").json()["incidents"]
    assert incidents and sorted(charts["main"]["incidents"]) == sorted(i["opened_step"] for i in incidents)
    heatmap = charts["heatmap"]
    assert heatmap["layers"] == LAYERS
    for j, name in enumerate(LAYERS):
        assert heatmap["cells"][name]["values"] == [s["layer_grad_norms"][j] for s in stored]
    # the run finished, which closed its incident: the root cause is still the critical one's layer
    critical = [i for i in incidents if i["severity"] == "critical" and i["layer"]]
    assert heatmap["root_cause"] == min(critical, key=lambda i: i["opened_step"])["layer"]
    ratio = charts["ratio"]  # update norm / the weights' total norm, step by step
    assert ratio["steps"][:80] == list(range(80))
    assert ratio["values"][5] == pytest.approx(lines[5]["update_norm"] / (3 * (10.0 + 0.05) ** 2) ** 0.5)
    assert ratio["values"][80] == "NaN"
    table = tab.page.inner_text("#incidents")
    assert all(i["signature"] in table for i in incidents)
    assert tab.page.inner_text("#run-status") == "finished"
    assert tab.errors == []


def test_incident_shows_within_seconds_of_its_ingest(tab: Tab, http: httpx.Client) -> None:
    run_id = new_run_id("live")
    lines = exploding_trace(run_id)[1:]
    make_run(http, run_id, lines[:50], status="running")
    tab.page.goto(f"/runs/{run_id}")
    tab.page.wait_for_function(LOADED, timeout=15_000)
    assert tab.page.locator("#incidents tr[data-incident]").count() == 0
    http.post(f"/v1/runs/{run_id}/steps", json=steps_body(lines[50:])).raise_for_status()
    started = time.monotonic()
    tab.page.wait_for_selector("#incidents tr[data-incident]", timeout=5_000)
    shown_after = time.monotonic() - started
    assert shown_after < 5.0
    tab.page.wait_for_function("() => window.__gradwatch.charts.main.nonfinite_steps.length > 0", timeout=5_000)
    assert tab.data("window.__gradwatch.run.last_step") == 80
    assert tab.errors == []


def test_long_run_reads_the_downsampled_series(tab: Tab, http: httpx.Client, server: ServerProcess) -> None:
    """A run longer than the chart is wide: the page shows what /series serves for the same max_points, spike
    included, and stays fast."""
    run_id = new_run_id("long")
    make_run(http, run_id, [], status="running")
    n, spike = 40_000, 27_183
    for lo in range(0, n, 5000):
        steps = [{"step": s, "loss": 1.0 + (s % 7) * 0.01, "grad_norm": 500.0 if s == spike else 1.0 + (s % 5) * 0.1,
                  "layer_grad_norms": [0.5, 0.6, 0.7]} for s in range(lo, lo + 5000)]
        body = encode_binary_batch({"layers": LAYERS, "steps": steps})
        http.post(f"/v1/runs/{run_id}/steps", content=body,
                  headers={"Content-Type": "application/vnd.gradwatch.steps+binary"}).raise_for_status()
    http.put(f"/v1/runs/{run_id}", json={"status": "finished"}).raise_for_status()
    wait_for_rollups(server.database_url)
    started = time.monotonic()
    tab.page.goto(f"/runs/{run_id}")
    tab.page.wait_for_function(LOADED, timeout=15_000)
    load_s = time.monotonic() - started
    main = tab.data("window.__gradwatch.charts.main.series")
    served = http.get(f"/v1/runs/{run_id}/series",
                      params={"fields": "loss,grad_norm", "max_points": 1000}).json()["series"]
    assert main["grad_norm"] == by_field(served, "grad_norm") and main["loss"] == by_field(served, "loss")
    assert len(main["grad_norm"]["steps"]) <= 1000 < n
    assert main["grad_norm"]["values"][main["grad_norm"]["steps"].index(spike)] == 500.0
    assert load_s < 5.0, f"{load_s:.2f} s"
    assert tab.errors == []


def test_runs_list(tab: Tab, http: httpx.Client) -> None:
    run_id = new_run_id("listed")
    make_run(http, run_id, exploding_trace(run_id)[1:], status="running")  # running: its incident is open
    assert run_id in http.get("/", params={"project": "pages"}).text  # server-rendered, before any script
    assert run_id in http.get("/", params={"project": "pages", "status": ""}).text  # the form's "any" status
    tab.page.goto("/?project=pages")
    tab.page.wait_for_function("() => window.__gradwatch && window.__gradwatch.loads > 0", timeout=15_000)
    row = tab.page.locator(f'tr[data-run-id="{run_id}"]')
    text = row.inner_text()
    assert "running" in text and "80" in text and "NaN" in text and "Infinity" in text and "critical" in text
    listed = {r["run_id"]: r for r in tab.data("window.__gradwatch.runs")}
    assert listed[run_id]["grad_norm"] == "Infinity" and listed[run_id]["open_criticals"] >= 1
    row.locator("a").click()
    tab.page.wait_for_function(LOADED, timeout=15_000)
    assert tab.page.url.endswith(f"/runs/{run_id}")
    assert tab.errors == []


# ------------------------------------------------------------------------------------------------ login

@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("pages-auth")
    proc = ServerProcess(f"sqlite:///{tmp / 'auth.db'}", auth=True, log_path=tmp / "server.log")
    proc.start()
    yield proc
    proc.stop()


def test_login_keeps_the_token_in_an_http_only_cookie(browser: Any, secured: ServerProcess,
                                                      tmp_path: Path) -> None:
    read = secured.create_token("reader", ["read"])["token"]
    ingest = secured.create_token("writer", ["ingest"])["token"]
    with httpx.Client(base_url=secured.url, timeout=30, headers=secured.headers) as admin:
        run_id = new_run_id("secret")
        make_run(admin, run_id, exploding_trace(run_id)[1:20])
    with httpx.Client(base_url=secured.url, timeout=30) as anon:
        first = anon.get("/")
        assert first.status_code == 303 and first.headers["location"] == "/login?next=%2F"
        assert anon.get("/ui/runs").status_code == 401
        assert anon.get(f"/ui/runs/{run_id}/data").status_code == 401
        assert anon.get(f"/runs/{run_id}").status_code == 303
        page = anon.get("/login")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        cross = anon.post("/login", data={"token": read}, headers={"Origin": "https://evil.example"})
        assert cross.status_code == 403 and "set-cookie" not in cross.headers
        assert anon.post("/login", data={"token": read}, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        assert anon.post("/login", data={"token": ingest}).status_code == 401  # no read scope
        assert anon.post("/login", content="a=1&b=2&c=3&d=4&e=5",
                         headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 400
        ok = anon.post("/login", data={"token": read, "next": "//evil.example/x"})
        assert ok.status_code == 303 and ok.headers["location"] == "/"  # never an open redirect
        cookie = ok.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        # the cookie opens the pages, never the API: nothing a browser sends on its own reaches /v1
        assert anon.cookies.get("gradwatch_token") == read  # the client keeps it, as a browser does
        assert anon.get("/v1/runs").status_code == 401
        assert anon.get("/ui/runs").status_code == 200

    t = Tab(browser, secured.url)
    try:
        t.page.goto(f"/runs/{run_id}")
        assert "/login" in t.page.url and read not in t.page.url
        t.page.fill("input[name=token]", "gwt_wrong_secret")
        t.page.click("button[type=submit]")
        assert "not valid" in t.page.inner_text("main")
        t.page.fill("input[name=token]", read)
        t.page.click("button[type=submit]")
        t.page.wait_for_function(LOADED, timeout=15_000)
        assert t.page.url.endswith(f"/runs/{run_id}") and read not in t.page.url
        assert t.page.evaluate("document.cookie") == ""  # HttpOnly: the page's scripts never see the token
        (cookie,) = [c for c in t.context.cookies() if c["name"] == "gradwatch_token"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert t.data("window.__gradwatch.run.run_id") == run_id
        t.page.click("form.logout button")
        t.page.wait_for_url("**/login")
        assert not [c for c in t.context.cookies() if c["name"] == "gradwatch_token"]
        # the browser shows one console error: the wrong token's 401 answer to the form; nothing else
        assert [e for e in t.errors if "401" not in e] == []
    finally:
        t.context.close()
