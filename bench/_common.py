"""Helpers shared by the benchmarks: databases to run against, a service process, output as table or JSON.

The benchmarks use gradwatch as a user would, through its public names and its command line, and nothing from
tests/: they must keep measuring the product, whatever the tests' helpers become.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["BenchServer", "Receiver", "PrometheusServer", "duration_s", "fresh_database", "get_json", "post_json",
           "metrics_token_file", "percentile", "print_table", "prometheus_rule", "rss_mb", "emit",
           "shipped_prometheus_config"]

REPO = Path(__file__).resolve().parents[1]

POSTGRES_ADMIN_URL = os.environ.get("GRADWATCH_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


class fresh_database:
    """A new, empty database: a SQLite file in `workdir`, or a PostgreSQL schema dropped on exit."""

    def __init__(self, backend: str, workdir: Path) -> None:
        self.backend, self.workdir = backend, workdir
        self.schema: str | None = None

    def __enter__(self) -> str:
        from sqlalchemy import create_engine, text

        if self.backend == "sqlite":
            self.path = self.workdir / f"bench-{uuid.uuid4().hex[:8]}.db"
            return f"sqlite:///{self.path}"
        self.schema = f"gw_bench_{uuid.uuid4().hex[:10]}"
        eng = create_engine(POSTGRES_ADMIN_URL)
        with eng.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{self.schema}"'))
        eng.dispose()
        return f"{POSTGRES_ADMIN_URL}?options=-csearch_path%3D{self.schema}"

    def __exit__(self, *exc: object) -> None:
        from sqlalchemy import create_engine, text

        if self.schema:
            eng = create_engine(POSTGRES_ADMIN_URL)
            with eng.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
            eng.dispose()


class BenchServer:
    """`gradwatch db upgrade`, then `gradwatch serve` on a free loopback port until `stop()` (SIGTERM)."""

    def __init__(self, database_url: str, log_path: Path, args: list[str] | None = None,
                 env: dict[str, str] | None = None, launcher: list[str] | None = None) -> None:
        self.env = {**os.environ, "GRADWATCH_DATABASE_URL": database_url, **(env or {})}
        self.log_path, self.args = log_path, list(args or [])
        self.launcher = launcher or ["-m", "gradwatch_service"]  # what follows `python`: the `gradwatch` command
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        gradwatch = [sys.executable, *self.launcher]
        subprocess.run([*gradwatch, "db", "upgrade"], env=self.env, check=True, capture_output=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([*gradwatch, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                                          *self.args], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(self.proc, self.url + "/healthz", self.log_path, timeout)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise

    def stop(self) -> None:
        _end(self.proc)
        self.proc = None


class Receiver:
    """A webhook receiver on 127.0.0.1 in the benchmark's process: answers 204, counts what it was sent, and
    hands each body with its arrival time (perf_counter, taken before answering) to `on_post`."""

    def __init__(self, on_post: Callable[[bytes, float], None] | None = None) -> None:
        self.received = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                arrived = time.perf_counter()
                self.send_response(204)
                self.end_headers()
                receiver.received += 1
                if on_post is not None:
                    on_post(body, arrived)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def post_json(url: str, body: Any, timeout: float = 30.0) -> Any:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def metrics_token_file(workdir: Path) -> Path:
    """A fresh /metrics token in `workdir`: the server reads it (GRADWATCH_METRICS_TOKEN_FILE) and so does
    Prometheus (the shipped job's credentials_file), as the compose stack's secret is read by both."""
    path = workdir / "metrics-token"
    path.write_text(secrets.token_urlsafe(32))
    return path


def shipped_prometheus_config(target: str, workdir: Path, token_file: Path) -> tuple[Path, dict[str, Any]]:
    """deploy/prometheus/prometheus.yml as shipped (intervals, rules.yml, alerting, the bearer token), with only
    the gradwatch scrape target replaced by `target` (host:port), its credentials_file by `token_file` and the
    rule file given by its absolute path, written to `workdir`. Returns the file and the config. (PyYAML comes
    with uvicorn[standard], the server extra.)"""
    import yaml

    deploy = REPO / "deploy" / "prometheus"
    config = yaml.safe_load((deploy / "prometheus.yml").read_text())
    config["rule_files"] = [str((deploy / f).resolve()) for f in config["rule_files"]]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "gradwatch"]
    assert len(jobs) == 1, "prometheus.yml has no single gradwatch job"
    for static in jobs[0]["static_configs"]:
        static["targets"] = [target]
    jobs[0]["authorization"]["credentials_file"] = str(token_file)
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path, config


def prometheus_rule(name: str) -> tuple[dict[str, Any], str | None]:
    """The alert rule `name` from deploy/prometheus/rules.yml, and its group's own `interval` (None: the global
    evaluation_interval)."""
    import yaml

    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == name:
                return dict(rule), group.get("interval")
    raise KeyError(f"no alert {name} in deploy/prometheus/rules.yml")


def duration_s(text: str) -> float:
    """A Prometheus duration ("15s", "1m", "1m30s") in seconds."""
    import re

    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a Prometheus duration: {text!r}"
    return sum(int(n) * units[u] for n, u in parts)


class PrometheusServer:
    """The `prometheus` binary (Debian's package) on a free loopback port, data in `workdir`, until `stop()`.
    `PrometheusServer.missing()` says why it cannot run here, or None."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.port = _free_port()
        self.log_path = workdir / "prometheus.log"
        self.argv = [shutil.which("prometheus") or "prometheus", f"--config.file={config}",
                     f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"]
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def missing() -> str | None:
        if shutil.which("prometheus") is None:
            return "the prometheus binary is not installed (Debian: apt-get install prometheus; make test does)"
        return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(self.proc, self.url + "/-/ready", self.log_path, timeout)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise
        return self

    def stop(self) -> None:
        _end(self.proc)
        self.proc = None


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; the process's log tail if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}: "
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def _end(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a process that still runs and wait for it; SIGKILL after 10 s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (`q` in 0..1): a latency that was observed, never an interpolation; NaN for none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process and its children (uvicorn workers) have used so far."""
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def rss_mb(pid: int, kind: str = "VmRSS") -> float:
    """Resident set size of a process and its children (uvicorn workers), in MB; `kind` "RssAnon" for the heap
    alone (what a leak grows) or "RssFile" for mapped files (the database's pages, which the kernel may drop)."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(kind + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(title)
    print("-" * len(title))
    for k, v in rows:
        shown = f"{v:,.1f}" if isinstance(v, float) else str(v)
        print(f"{k:<{width}}  {shown:>16}")
    print()


def emit(figures: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(figures))
