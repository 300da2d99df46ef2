"""Prometheus' own binaries for tests: promtool and amtool, and real `prometheus` / `prometheus-alertmanager`
servers on free loopback ports with data in a temporary directory, stopped at the end of the test.

They come from Debian's packages (`make test` installs them). Where one is missing the test skips, except with
CI=true, where that is a failure (as for PostgreSQL).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .serverproc import end_process, free_port

__all__ = ["REPO", "require_binary", "BinaryServer", "prometheus_server", "alertmanager_server", "get_json"]

REPO = Path(__file__).resolve().parents[2]


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    msg = f"{name} is not installed (Debian: apt-get install prometheus prometheus-alertmanager; make test does)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg + " (CI=true: the Prometheus tests must run)")
    pytest.skip(msg)


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


class BinaryServer:
    """A server binary on 127.0.0.1:`port`, logging to `log_path`, ready once `ready_path` answers 200."""

    def __init__(self, argv: list[str], port: int, ready_path: str, log_path: Path) -> None:
        self.argv, self.port, self.ready_path, self.log_path = argv, port, ready_path, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> BinaryServer:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.argv[0]} not ready on {self.url} within {timeout}s")

    def stop(self) -> None:
        end_process(self.proc)
        self.proc = None


def prometheus_server(config: Path, work_dir: Path) -> BinaryServer:
    port = free_port()
    argv = [require_binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={work_dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"]
    return BinaryServer(argv, port, "/-/ready", work_dir / "prometheus.log")


def alertmanager_server(config: Path, work_dir: Path) -> BinaryServer:
    port = free_port()
    argv = [require_binary("prometheus-alertmanager"), f"--config.file={config}",
            f"--storage.path={work_dir / 'alertmanager'}", f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address="]  # no gossip port: a single, local instance
    return BinaryServer(argv, port, "/-/ready", work_dir / "alertmanager.log")
