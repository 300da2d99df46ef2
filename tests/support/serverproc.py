"""A real gradwatch server in a subprocess on a loopback port, for tests that must go over HTTP.

`start()` migrates the database (`gradwatch db upgrade`), starts `gradwatch serve` and waits for /healthz;
`kill()` is SIGKILL (a crash), `stop()` a graceful SIGTERM. The same port and database can be started again.
`headers` is what a test should send: empty while the server is open (no token exists), the Authorization of an
all-projects admin token when started with `auth=True` (made with `gradwatch token create` before it starts).
`gradwatch` is the command line that is `gradwatch`: the checkout's by default, an installed wheel's in the
packaging test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ServerProcess", "end_process", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _new_log_file() -> Path:
    fd, path = tempfile.mkstemp(prefix="gradwatch-server-", suffix=".log")
    os.close(fd)  # only the name is wanted: start() opens it for each run of the process
    return Path(path)


def end_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to a process that still runs and wait for it; SIGKILL after 10 s. A no-op for None or a process
    that already ended."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class ServerProcess:
    def __init__(self, database_url: str, port: int | None = None, env: dict[str, str] | None = None,
                 log_path: Path | None = None, args: list[str] | None = None, cwd: Path | None = None,
                 gradwatch: Sequence[str] = (sys.executable, "-m", "gradwatch_service"), auth: bool = False) -> None:
        self.database_url = database_url
        self.gradwatch = list(gradwatch)
        self.cwd = cwd
        self.port = port or free_port()
        self.env = {**os.environ, "GRADWATCH_DATABASE_URL": database_url, **(env or {})}
        self.log_path = log_path or _new_log_file()
        self.args = list(args or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self.auth = auth
        self.headers: dict[str, str] = {}
        """the Authorization header a test should send; empty in open mode"""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def migrate(self) -> None:
        subprocess.run([*self.gradwatch, "db", "upgrade"], env=self.env, cwd=self.cwd, check=True,
                       capture_output=True)

    def create_token(self, name: str, scopes: Sequence[str], project: str | None = None) -> dict[str, Any]:
        """A new token on this server's database (`gradwatch token create --json`): its public fields and
        `token`, the secret."""
        cmd = [*self.gradwatch, "token", "create", "--name", name, "--json"]
        cmd += [arg for scope in scopes for arg in ("--scope", scope)]
        cmd += ["--project", project] if project else []
        done = subprocess.run(cmd, env=self.env, cwd=self.cwd, check=True, capture_output=True, text=True)
        created: dict[str, Any] = json.loads(done.stdout)
        return created

    def start(self, wait: bool = True, migrate: bool = True, timeout: float = 30.0) -> ServerProcess:
        if migrate:
            self.migrate()
        if self.auth and not self.headers:
            self.headers = {"Authorization": f"Bearer {self.create_token('tests', ['admin'])['token']}"}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [*self.gradwatch, "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args],
            env=self.env, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                err = self.log_path.read_text(errors="replace")
                raise RuntimeError(f"gradwatch serve exited with {self.proc.returncode}: {err[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"gradwatch serve did not answer on {self.url} within {timeout}s")

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, sig: int) -> None:
        end_process(self.proc, sig)
        self.proc = None
        if self._log is not None:
            self._log.close()
        self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
