"""Is the service's API what another checkout's is? The OpenAPI schema of `create_app()` here and there, compared.

    .venv/bin/python tools/openapi_diff.py /tmp/gw-main       # a checkout, e.g. `git worktree add /tmp/gw-main main`
    .venv/bin/python tools/openapi_diff.py --dump             # this tree's schema as JSON (keys sorted)

A restructuring that must not change the API (paths, parameters, bodies, answers, their descriptions and
examples) shows an empty diff. Each schema is built in a fresh interpreter of this virtualenv, the other
checkout's `gradwatch` and `gradwatch_service` first on its path (as bench/ingest.py --against does), on an
empty SQLite file (the app is built, not served: nothing is read from the database). Exits 1 when they differ.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DUMP = """
import json, sys
from gradwatch_service.app import create_app
from gradwatch_service.settings import Settings
app = create_app(Settings(database_url=sys.argv[1], metrics=True))
print(json.dumps(app.openapi(), indent=1, sort_keys=True))
"""


def overlay_of(checkout: Path, workdir: Path) -> Path:
    """A folder whose `gradwatch` and `gradwatch_service` are the checkout's (its migrations inside)."""
    out = workdir / "overlay"
    (out / "gradwatch_service").mkdir(parents=True)
    (out / "gradwatch").symlink_to(checkout / "client" / "gradwatch")
    for entry in (checkout / "service" / "gradwatch_service").iterdir():
        if entry.name not in ("__pycache__", "migrations"):
            (out / "gradwatch_service" / entry.name).symlink_to(entry)
    (out / "gradwatch_service" / "migrations").symlink_to(checkout / "migrations")
    return out


def schema_of(checkout: Path | None, workdir: Path) -> str:
    workdir.mkdir(parents=True)
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = str(overlay_of(checkout.resolve(), workdir))
    url = f"sqlite:///{workdir / 'openapi.db'}"
    return subprocess.run([sys.executable, "-c", DUMP, url], env=env, check=True, capture_output=True,
                          text=True, cwd=workdir).stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", nargs="?", help="another checkout of gradwatch to compare this tree with")
    ap.add_argument("--dump", action="store_true", help="print this tree's schema and stop")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gradwatch-openapi-") as tmp:
        here = schema_of(None, Path(tmp) / "here")
        if args.dump or not args.checkout:
            print(here, end="")
            return 0
        there = schema_of(Path(args.checkout), Path(tmp) / "there")
    diff = list(difflib.unified_diff(there.splitlines(), here.splitlines(), args.checkout, "this tree", lineterm=""))
    print("\n".join(diff) if diff else f"OpenAPI schemas identical ({len(json.loads(here)['paths'])} paths, "
                                       f"{len(here.splitlines())} lines)")
    return 1 if diff else 0


if __name__ == "__main__":
    raise SystemExit(main())
