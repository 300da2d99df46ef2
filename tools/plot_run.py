"""Draw a real exploding run as gradwatch's own API returns it: docs/img/exploding_run.png (the README's picture).

    .venv/bin/python tools/plot_run.py                       # own service and SQLite file, trains, draws
    .venv/bin/python tools/plot_run.py --url URL --run RUN   # a run already on a running service

With no --url it starts a gradwatch service on a temporary SQLite database and trains examples/train_tiny.py
with --explode against it (real PyTorch on the CPU, instrumented with gradwatch.watch). Either way everything
drawn is read back over HTTP, from GET /v1/runs/{id}/series and /v1/runs/{id}/incidents: the loss and total
gradient norm (log scale), the per-layer gradient norms as a heatmap (each layer over its own median, so the
layer that blows up first stands out), the steps whose values are not finite, and every incident the service's
detectors opened. It is what the Run dashboard shows, drawn without Grafana. Needs matplotlib (the dev extra).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "img" / "exploding_run.png"
PROJECT = "readme-picture"
COLOURS = {"critical": "#d62728", "warning": "#ff7f0e"}
NONFINITE_COLOUR = "#7b2cbf"
WIRE_VALUES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def value(v: Any) -> float | None:
    """A wire value as a float: NaN and ±Infinity travel as strings; None is "not measured"."""
    if v is None:
        return None
    return WIRE_VALUES[v] if isinstance(v, str) else float(v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_on_own_service(steps: int, seed: int) -> tuple[str, str, subprocess.Popen[bytes], Any]:
    """Start gradwatch on a temporary SQLite file and train the exploding tiny model against it."""
    workdir = Path(tempfile.mkdtemp(prefix="gradwatch-plot-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GRADWATCH_DATABASE_URL": f"sqlite:///{workdir / 'gradwatch.db'}"}
    gradwatch = [sys.executable, "-m", "gradwatch_service"]
    subprocess.run([*gradwatch, "db", "upgrade"], env=env, check=True, capture_output=True)
    log = open(workdir / "server.log", "ab")  # noqa: SIM115 - open for the life of the service
    server = subprocess.Popen([*gradwatch, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            if get(url + "/readyz").get("status") == "ok":
                break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"gradwatch did not start; see {workdir / 'server.log'}")
        time.sleep(0.2)
    subprocess.run([sys.executable, str(ROOT / "examples" / "train_tiny.py"), "--url", url, "--project", PROJECT,
                    "--name", "tiny-explode", "--explode", "--steps", str(steps), "--seed", str(seed), "--quiet"],
                   check=True)
    run_id = get(f"{url}/v1/runs?project={PROJECT}&limit=1")["runs"][0]["run_id"]
    return url, run_id, server, log


def read_run(url: str, run_id: str) -> dict[str, Any]:
    """Everything the picture shows, from the API: the run, its series (all steps) and its incidents."""
    rid = urllib.parse.quote(run_id, safe="")
    run = get(f"{url}/v1/runs/{rid}")
    series = get(f"{url}/v1/runs/{rid}/series?fields=loss,grad_norm,layer_grad_norms")["series"]
    incidents = get(f"{url}/v1/runs/{rid}/incidents")["incidents"]
    scalars = {s["field"]: (s["steps"], [value(v) for v in s["values"]]) for s in series if s["layer"] is None}
    layers = [(s["layer"], s["steps"], [value(v) for v in s["values"]])
              for s in series if s["field"] == "layer_grad_norms"]
    return {"run": run, "scalars": scalars, "layers": layers, "incidents": incidents}


def draw(data: dict[str, Any], out: Path) -> None:
    run, scalars, layers, incidents = data["run"], data["scalars"], data["layers"], data["incidents"]
    fig, (ax_loss, ax_grad, ax_heat) = plt.subplots(
        3, 1, figsize=(11, 9), sharex=True, gridspec_kw={"height_ratios": [1, 1, 1.5]}, constrained_layout=True)
    for ax, field, label in ((ax_loss, "loss", "loss"), (ax_grad, "grad_norm", "total gradient norm")):
        steps, vals = scalars[field]
        finite = [(s, v) for s, v in zip(steps, vals, strict=True) if v is not None and math.isfinite(v) and v > 0]
        ax.plot([s for s, _ in finite], [v for _, v in finite], color="#1f77b4", lw=1.2, label=label)
        ax.set_yscale("log")
        ax.set_ylabel(label + " (log)")
        ax.grid(True, which="major", alpha=0.3)
        bad = [s for s, v in zip(steps, vals, strict=True) if v is not None and not math.isfinite(v)]
        if bad:
            ax.axvspan(bad[0] - 0.5, max(steps) + 0.5, color=NONFINITE_COLOUR, alpha=0.15,
                       label=f"NaN/Inf: {len(bad)} steps from step {bad[0]}")
    _mark_incidents((ax_loss, ax_grad), incidents)
    ax_loss.legend(loc="upper left", fontsize=9, framealpha=0.9)
    ax_grad.legend(loc="upper left", fontsize=9, framealpha=0.9)

    names = [name for name, _, _ in layers]
    all_steps = sorted({s for _, steps, _ in layers for s in steps})
    index = {s: i for i, s in enumerate(all_steps)}
    grid = [[math.nan] * len(all_steps) for _ in layers]
    saturated = 8.0
    for row, (_, steps, vals) in enumerate(layers):
        typical = _median([v for v in vals if v is not None and math.isfinite(v) and v > 0])
        for s, v in zip(steps, vals, strict=True):
            if v is None:
                continue
            if not math.isfinite(v):
                grid[row][index[s]] = saturated
            elif v > 0 and typical:
                grid[row][index[s]] = max(-1.0, min(saturated, math.log10(v / typical)))
    image = ax_heat.imshow(grid, aspect="auto", interpolation="nearest", cmap="turbo",
                           norm=Normalize(-1.0, saturated),
                           extent=(all_steps[0] - 0.5, all_steps[-1] + 0.5, len(layers) - 0.5, -0.5))
    ax_heat.set_yticks(range(len(names)), names, fontsize=8)
    ax_heat.set_ylabel("layer")
    ax_heat.set_xlabel("step")
    bar = fig.colorbar(image, ax=ax_heat, pad=0.01)
    bar.set_label("log10(grad norm / layer's median)\nNaN/Inf at the top", fontsize=8)
    root = _root_cause(incidents)
    if root in names:
        tick = ax_heat.get_yticklabels()[names.index(root)]
        tick.set_color(COLOURS["critical"])
        tick.set_fontweight("bold")
    ax_heat.set_facecolor("#d9d9d9")  # a layer not measured at a step
    ax_heat.set_title("per-layer gradient norms, each over its own median (grey: not measured)"
                      + (f"; the detectors' first layer: {root}" if root else ""), fontsize=10, loc="left")
    _mark_incidents((ax_heat,), incidents, labels=False)
    config = run.get("config") or {}
    fig.suptitle(f"gradwatch: a real exploding run ({run['run_id']}: {config.get('model', '')}, "
                 f"{config.get('optimizer', '')} lr={config.get('lr', '')}), read back from the API",
                 fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _root_cause(incidents: list[dict[str, Any]]) -> str | None:
    """The layer the first critical incident names: whose norm broke out of its own band first."""
    critical = sorted((i for i in incidents if i["severity"] == "critical" and i.get("layer")),
                      key=lambda i: (i["opened_step"], i["seq"]))
    return critical[0]["layer"] if critical else None


def _mark_incidents(axes: tuple[Any, ...], incidents: list[dict[str, Any]], labels: bool = True) -> None:
    for inc in sorted(incidents, key=lambda i: (i["opened_step"], i["seq"])):
        colour = COLOURS[inc["severity"]]
        for ax in axes:
            ax.axvline(inc["opened_step"], color=colour, lw=1.4, ls="--")
        if labels:
            layer = f", first in {inc['layer']}" if inc.get("layer") else ""
            axes[-1].plot([], [], color=colour, ls="--",
                          label=f"{inc['signature']} ({inc['severity']}) at step {inc['opened_step']}{layer}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running gradwatch service (default: start one and train a run on it)")
    ap.add_argument("--run", help="the run to draw (with --url)")
    ap.add_argument("--steps", type=int, default=220, help="NaN from about step 180 with the default seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    server = log = None
    try:
        if args.url:
            if not args.run:
                ap.error("--run is needed with --url")
            url, run_id = args.url.rstrip("/"), args.run
        else:
            url, run_id, server, log = train_on_own_service(args.steps, args.seed)
        data = read_run(url, run_id)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
            log.close()
    draw(data, args.out)
    print(f"{args.out}: run {run_id}, {len(data['layers'])} layers, {len(data['incidents'])} incidents")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
