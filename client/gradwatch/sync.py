"""`gradwatch sync [DIR]`: upload the steps that jobs left in their spool while the service was unreachable.

Each run's spool holds whole batch bodies with their `batch_id`, so syncing twice, or syncing what the job
itself already delivered, stores nothing twice. Runs still in progress in a live process are left to that
process unless `--force`; a run whose process died while "running" is marked "crashed".
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ._options import Options, default_spool_dir
from ._spool import META_FILE, Spool, owner_alive, spooled_runs
from ._transport import HttpTransport
from ._worker import DeliveryStats, Worker

__all__ = ["SyncResult", "add_arguments", "run", "sync_run"]


@dataclass
class SyncResult:
    run_id: str
    sent: int = 0
    left: int = 0
    lost: int = 0
    skipped: str | None = None
    ok: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", type=Path, default=None,
                        help="spool directory, or one run's directory inside it "
                             "(default: $GRADWATCH_SPOOL_DIR or ~/.cache/gradwatch/spool)")
    parser.add_argument("--url", default=None, help="service URL (default: the one each run was logging to)")
    parser.add_argument("--token", default=os.environ.get("GRADWATCH_TOKEN"),
                        help="bearer token with the ingest scope (default: $GRADWATCH_TOKEN)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request")
    parser.add_argument("--force", action="store_true", help="also sync runs whose process is still running")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    root: Path = args.dir if args.dir is not None else default_spool_dir()
    directories = [root] if (root / META_FILE).exists() else list(spooled_runs(root))
    if not directories:
        print(f"nothing to sync in {root}")
        return 0
    failed = 0
    for directory in directories:
        result = sync_run(directory, url=args.url, token=args.token, timeout=args.timeout, force=args.force)
        if result.skipped:
            print(f"{result.run_id}: skipped ({result.skipped})")
            continue
        line = f"{result.run_id}: {result.sent} steps sent"
        if result.lost:
            line += f", {result.lost} lost (see the log above)"
        if result.left:
            line += f", {result.left} left in the spool (service unreachable? run sync again)"
        print(line)
        failed += not result.ok
    return 1 if failed else 0


def sync_run(directory: Path, url: str | None = None, token: str | None = None, timeout: float = 10.0,
             force: bool = False) -> SyncResult:
    """Deliver one run's spool; the directory is removed once everything in it is stored."""
    spool = Spool(directory, max_bytes=1 << 62, used_bytes=0)
    meta = spool.read_meta() or {}
    run_id = str(meta.get("run_id") or directory.name)
    result = SyncResult(run_id)
    if not meta.get("url") and not url:
        result.skipped = f"no {META_FILE}, and no --url given"
        return result
    alive = owner_alive(meta)
    if alive and not meta.get("finished") and not force:
        result.skipped = f"process {meta['owner']['pid']} still owns it; --force to sync anyway"
        return result
    body = dict(meta.get("run") or {})
    if body.get("status", "running") == "running" and not alive:
        body["status"] = "crashed"
    pending = spool.pending_steps()
    options = Options(url=url or meta["url"], token=token, spool_dir=directory.parent, timeout=timeout)
    stats = DeliveryStats()
    transport = HttpTransport(options.url, token, timeout, options.compress, binary=options.wire == "binary")
    worker = Worker(run_id, body, options, spool, stats, transport)
    try:
        result.ok = worker.deliver_spool()
    finally:
        transport.close()
    result.left = spool.pending_steps()
    result.lost = sum(stats.lost.values())
    result.sent = pending - result.left - result.lost
    if result.ok:
        spool.remove_if_empty()
    return result
