"""An append-only, size-bounded spool of request bodies on local disk, one directory per run.

Steps wait here while the service is unreachable (or the in-memory queue is full) and are sent, in order,
when it comes back; `gradwatch sync` uploads what a finished job left. Each line of a segment file is a whole
batch body, `batch_id` included, so a resend is byte-for-byte the same request and the service de-duplicates
it. A healthy run never touches the disk: the directory is created on the first append.

    <root>/<run_id>/run.json        the run's PUT body, URL and owner (pid, host); never the token
    <root>/<run_id>/000001.jsonl    batches, one per line, oldest segment first: {"batch_id", "n", "binary":
                                    base64 of the binary body}, or a JSON body (older spools; a batch the
                                    binary form cannot carry)
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ._batch import spooled_steps

__all__ = ["META_FILE", "Spool", "SpoolFull", "directory_size", "hostname", "owner_alive", "spooled_runs"]

META_FILE = "run.json"
SEGMENT_SUFFIX = ".jsonl"


class SpoolFull(Exception):
    """Appending would take the spool directory over its size bound."""


def directory_size(root: Path) -> int:
    total = 0
    try:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(dirpath, name)).st_size
    except OSError:
        pass
    return total


def hostname() -> str:
    import socket  # imported when needed: `import gradwatch` stays cheap

    return socket.gethostname()


def owner_alive(meta: dict[str, Any]) -> bool:
    """Whether the process that wrote this run's spool is still running (on this host)."""
    owner = meta.get("owner") or {}
    if owner.get("host") != hostname():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def spooled_runs(root: Path) -> Iterator[Path]:
    """Run directories under `root` that hold a spool."""
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if child.is_dir() and (child / META_FILE).exists():
            yield child


class Spool:
    """The spool of one run. Appends are thread-safe; draining is done by one thread at a time."""

    def __init__(self, directory: Path, max_bytes: int, used_bytes: int | None = None):
        self.directory = directory
        self.max_bytes = max_bytes
        self._used = directory_size(directory.parent) if used_bytes is None else used_bytes
        self._lock = threading.Lock()
        self._current = self._highest_segment() + 1
        self._offsets: dict[Path, int] = {}
        self.corrupt_lines = 0

    # -- writing ---------------------------------------------------------------------------------------
    def append(self, body: dict[str, Any]) -> None:
        """Add one batch body; raises SpoolFull or OSError (the caller counts the steps as lost)."""
        line = (json.dumps(body, separators=(",", ":"), allow_nan=False) + "\n").encode()
        with self._lock:
            if self._used + len(line) > self.max_bytes:
                raise SpoolFull(f"spool {self.directory.parent} is at its bound of {self.max_bytes} bytes")
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self._segment(self._current)
            with open(path, "ab") as f:
                f.write(line)
            self._used += len(line)

    def write_meta(self, meta: dict[str, Any], create: bool = False) -> None:
        """Replace run.json atomically; only where the directory exists unless `create`."""
        with self._lock:
            if not create and not self.directory.is_dir():
                return
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{META_FILE}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(meta, allow_nan=False))
            os.replace(tmp, self.directory / META_FILE)

    def read_meta(self) -> dict[str, Any] | None:
        try:
            meta = json.loads((self.directory / META_FILE).read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    # -- reading ---------------------------------------------------------------------------------------
    def segments(self) -> list[Path]:
        try:
            return sorted(p for p in self.directory.iterdir() if p.suffix == SEGMENT_SUFFIX)
        except OSError:
            return []

    def has_pending(self) -> bool:
        return bool(self.segments())

    def pending_steps(self) -> int:
        count = 0
        for path in self.segments():
            for body in self._read(path, 0):
                count += spooled_steps(body[1])
        return count

    def drain(self, send: Callable[[dict[str, Any]], bool], max_batches: int | None = None) -> bool:
        """Send spooled bodies oldest first. `send` returns False to stop (service down): what is left stays
        for the next drain. Returns True when the spool is empty."""
        segments = self.segments()
        if not segments:
            return True
        sent = 0
        # Probe with the oldest body before rotating, so that an outage does not leave a segment per attempt.
        # Under the lock: the oldest segment may be the one being appended to, and a line is whole only then.
        with self._lock:
            probe = next(self._read(segments[0], self._offsets.get(segments[0], 0)), None)
        if probe is not None:
            if not send(probe[1]):
                return False
            self._offsets[segments[0]] = probe[0]
            sent = 1
        with self._lock:
            # New appends go to a fresh segment, so the ones drained here are never written to again.
            if self._segment(self._current).exists():
                self._current += 1
        for path in self.segments():
            if path == self._segment(self._current):
                break
            for end, body in self._read(path, self._offsets.get(path, 0)):
                if max_batches is not None and sent >= max_batches:
                    return False
                if not send(body):
                    return False
                sent += 1
                self._offsets[path] = end
            self._remove_segment(path)
        return not self.has_pending()

    def remove_if_empty(self) -> None:
        """Delete the run's directory once nothing is left in it to send."""
        if self.has_pending():
            return
        with contextlib.suppress(OSError):
            for child in self.directory.iterdir():
                child.unlink()
            self.directory.rmdir()

    # -- helpers ---------------------------------------------------------------------------------------
    def _read(self, path: Path, offset: int) -> Iterator[tuple[int, dict[str, Any]]]:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                position = offset
                for line in f:
                    position += len(line)
                    if not line.endswith(b"\n"):
                        self.corrupt_lines += 1  # a write torn by a crash; drained segments are closed
                        break
                    try:
                        body = json.loads(line)
                    except ValueError:
                        self.corrupt_lines += 1
                        continue
                    if isinstance(body, dict):
                        yield position, body
        except FileNotFoundError:
            return

    def _remove_segment(self, path: Path) -> None:
        with self._lock:
            try:
                size = path.stat().st_size
                path.unlink()
            except OSError:
                return
            self._used = max(0, self._used - size)
            self._offsets.pop(path, None)

    def _segment(self, number: int) -> Path:
        return self.directory / f"{number:06d}{SEGMENT_SUFFIX}"

    def _highest_segment(self) -> int:
        numbers = [int(p.stem) for p in self.segments() if p.stem.isdigit()]
        return max(numbers, default=0)
