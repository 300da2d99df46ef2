"""`make demo`: migrate an embedded SQLite database, start the service, train two tiny models against it.

One healthy run and one that explodes (`--explode`), both real PyTorch training on the CPU, instrumented with
`gradwatch.watch`. Then it reads back from the API what a dashboard would: the runs, a downsampled series and
the incidents the detectors opened, and leaves the service running for you to explore (Ctrl-C stops it); it
ends by printing the address of the exploding run's page.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("GRADWATCH_DEMO_DIR", ROOT / ".gradwatch"))


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with {proc.returncode}; see {DATA_DIR / 'server.log'}")
        try:
            if get(url + "/readyz").get("status") == "ok":
                return
        except (OSError, urllib.error.URLError, ValueError):
            time.sleep(0.2)
    raise SystemExit(f"the service did not become ready on {url} within {timeout}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--exit", action="store_true", help="stop the service after the demo instead of waiting")
    args = ap.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "GRADWATCH_DATABASE_URL": f"sqlite:///{DATA_DIR / 'gradwatch.db'}"}
    DATA_DIR.mkdir(exist_ok=True)
    gradwatch = [sys.executable, "-m", "gradwatch_service"]
    subprocess.run([*gradwatch, "db", "upgrade"], env=env, check=True)
    log = open(DATA_DIR / "server.log", "ab")  # noqa: SIM115 - open for the life of the service
    server = subprocess.Popen([*gradwatch, "serve", "--host", "127.0.0.1", "--port", str(args.port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, server)
        print(f"gradwatch is serving on {url}  (API docs: {url}/docs, log: {DATA_DIR / 'server.log'})\n")
        stamp = time.strftime("%H%M%S")
        runs = {"healthy": f"demo-healthy-{stamp}", "exploding": f"demo-exploding-{stamp}"}
        for kind, name in runs.items():
            print(f"training a tiny model ({kind}) ...")
            cmd = [sys.executable, str(ROOT / "examples" / "train_tiny.py"), "--url", url, "--project", "demo",
                   "--name", name, "--steps", str(args.steps)] + (["--explode"] if kind == "exploding" else [])
            subprocess.run(cmd, check=True, env={**os.environ, "GRADWATCH_URL": url})
        show(url)
        page = f"{url}/runs/{run_id_of(url, runs['exploding'])}"
        if args.exit:
            print(f"\nThe exploding run's page (while the service runs): {page}")
            return 0
        print(f"\nThe service keeps running on {url} (all runs: {url}/); Ctrl-C stops it.")
        print(f"The exploding run's page: {page}", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.terminate()
        server.wait(10)
        log.close()


def show(url: str) -> None:
    listed = get(url + "/v1/runs?project=demo&limit=2")["runs"]
    print(f"\nGET /v1/runs?project=demo  ->  {len(listed)} latest runs")
    for run in listed:
        print(f"  {run['run_id']:<28} status={run['status']:<9} steps={run['n_steps']:<5} layers={run['n_layers']}")
    for run in listed:
        rid = run["run_id"]
        series = get(f"{url}/v1/runs/{rid}/series?fields=loss,grad_norm&max_points=12")["series"]
        print(f"\nGET /v1/runs/{rid}/series?fields=loss,grad_norm&max_points=12")
        for s in series:
            shown = ", ".join(f"{st}:{_fmt(v)}" for st, v in zip(s["steps"], s["values"], strict=True))
            print(f"  {s['field']:<10} {shown}")
        incidents = get(f"{url}/v1/runs/{rid}/incidents")["incidents"]
        print(f"GET /v1/runs/{rid}/incidents  ->  {len(incidents)} incident(s)")
        for inc in sorted(incidents, key=lambda i: i["opened_step"]):
            print(f"  step {inc['opened_step']:<4} {inc['severity']:<8} {inc['signature']:<16} "
                  f"layer={inc['layer']}  ({inc['status']})")


def run_id_of(url: str, name: str) -> str:
    """The id the client chose for the demo run named `name`."""
    listed = get(url + "/v1/runs?project=demo&limit=20")["runs"]
    return next(r["run_id"] for r in listed if r["name"] == name)


def _fmt(v: Any) -> str:
    return v if isinstance(v, str) or v is None else f"{v:.3g}"


if __name__ == "__main__":
    raise SystemExit(main())
