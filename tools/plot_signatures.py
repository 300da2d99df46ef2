"""Draw one picture per detector signature from a real dev trace where it fires: docs/img/<signature>.png.

    .venv/bin/python tools/plot_signatures.py [--traces ../shared/traces/dev] [--out docs/img]

Each figure replays one run through the detectors and shows what they saw: the loss against its early level
and the loss_divergence limit, the grad norm against its robust band, and the update/weight ratio against its
band, with every incident opened marked (red: critical, orange: warning) and the run's labelled divergence
step dashed. Needs matplotlib (the dev extra); the detectors themselves do not.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gradwatch.detect import DetectorConfig, StepInput, advance, held_signatures, new_state  # noqa: E402
from gradwatch.incidents import new_incident_state, track_incidents  # noqa: E402
from gradwatch.replay import read_trace  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TRACES = os.path.join(HERE, "..", "..", "shared", "traces", "dev")

# signature -> (run, last step to draw or None for all, why this run)
EXAMPLES: dict[str, tuple[str, int | None, str]] = {
    "nonfinite": ("dev-072-cnn", None, "grad norm overflows to inf after a 2-step blow-up"),
    "grad_spike": ("dev-049-transformer", None, "a healthy run: one spike far above its band is a warning, not a page"),
    "grad_growth": ("dev-119-lstm", 300, "grad norm leaves its band and keeps climbing, 21 steps before divergence"),
    "loss_divergence": ("dev-083-cnn", 260, "trained to near zero, then gives most of it back, 86 steps ahead"),
    "update_ratio": ("dev-059-transformer", 40, "first Adam step 11.5x the weights: critical at step 0"),
}
COLOURS = {"critical": "#d62728", "warning": "#ff7f0e"}


def replay_with_bands(steps: list[StepInput], cfg: DetectorConfig) -> dict[str, list[Any]]:
    """Per step: the measurements, the bands the detectors judged them against, and the incidents opened."""
    state = new_state()
    incidents = new_incident_state()
    rows: dict[str, list[Any]] = {k: [] for k in ("step", "loss", "loss_slow", "loss_limit", "giveback", "grad", "g_mu",
                                                   "g_hi", "ratio", "r_mu", "r_hi")}
    opened: list[tuple[int, str, str]] = []
    for step in steps:
        g_ready = state["g_n"] >= cfg.warmup_steps
        r_ready = state["r_n"] >= cfg.warmup_steps
        g_mu, g_dev = state["g_mu"], max(state["g_dev"], cfg.band_dev_floor)
        r_mu, r_dev = state["r_mu"], max(state["r_dev"], cfg.band_dev_floor)
        state, events = advance(state, step, cfg)
        incidents, new, _ = track_incidents(incidents, events, step.step, cfg, held_signatures(state))
        opened += [(step.step, inc["signature"], inc["severity"]) for inc in new]
        weights = [v for v in (step.layer_weight_norms or {}).values() if v is not None]
        w = math.hypot(*weights) if weights else math.nan
        u = step.update_norm
        rows["step"].append(step.step)
        rows["loss"].append(_positive(step.loss))
        rows["loss_slow"].append(math.exp(state["l_slow"]) if state["l_n"] else math.nan)
        rows["loss_limit"].append(math.exp(state["l_start"]) * cfg.loss_factor
                                  if state["l_n"] > cfg.loss_start_steps else math.nan)
        progress = state["l_start"] - state["l_best"]
        rows["giveback"].append(math.exp(state["l_best"] + cfg.loss_giveback_share * progress)
                                if state["l_n"] > cfg.warmup_steps
                                and progress >= math.log(cfg.loss_giveback_min_progress) else math.nan)
        rows["grad"].append(_positive(step.grad_norm))
        rows["g_mu"].append(math.exp(g_mu) if g_ready else math.nan)
        rows["g_hi"].append(math.exp(g_mu + cfg.spike_z * g_dev) if g_ready else math.nan)
        rows["ratio"].append(_positive(u / w) if u is not None and w and math.isfinite(w) else math.nan)
        rows["r_mu"].append(math.exp(r_mu) if r_ready else math.nan)
        rows["r_hi"].append(math.exp(r_mu + cfg.ratio_z * r_dev) if r_ready else math.nan)
    rows["opened"] = opened
    return rows


def _positive(x: Any) -> float:
    """Log axes cannot show 0, NaN or inf: those become gaps (a non-finite step is marked by its incident)."""
    return float(x) if x is not None and math.isfinite(x) and x > 0 else math.nan


def draw(signature: str, run_id: str, rows: dict[str, list[Any]], header: dict[str, Any], why: str,
         cfg: DetectorConfig, path: str) -> None:
    fig, axes = plt.subplots(3, 1, figsize=(8.0, 6.4), sharex=True)
    x = rows["step"]
    ax = axes[0]
    ax.semilogy(x, rows["loss"], color="#1f77b4", lw=0.6, alpha=0.6, label="loss")
    ax.semilogy(x, rows["loss_slow"], color="#17becf", lw=1.0, label="slow average")
    ax.semilogy(x, rows["loss_limit"], color="#555555", lw=0.8, ls=":",
                label=f"loss_divergence limit ({cfg.loss_factor:g}x early level)")
    ax.semilogy(x, rows["giveback"], color="#8c564b", lw=0.8, ls="--",
                label=f"give-back level ({cfg.loss_giveback_share:.0%} of progress lost; slow average)")
    ax = axes[1]
    ax.semilogy(x, rows["grad"], color="#9467bd", lw=0.8, label="grad norm")
    ax.semilogy(x, rows["g_mu"], color="#555555", lw=0.8, label="band mean")
    ax.semilogy(x, rows["g_hi"], color="#555555", lw=0.8, ls=":", label=f"band + {cfg.spike_z:g} dev (spike)")
    ax = axes[2]
    ax.semilogy(x, rows["ratio"], color="#2ca02c", lw=0.8, label="update / weight norm")
    ax.semilogy(x, rows["r_mu"], color="#555555", lw=0.8, label="band mean")
    ax.semilogy(x, rows["r_hi"], color="#555555", lw=0.8, ls=":", label=f"band + {cfg.ratio_z:g} dev")
    ax.axhline(cfg.ratio_critical, color="#d62728", lw=0.6, ls="--",
               label=f"{cfg.ratio_critical:g}x: critical before the band warms up")
    ax.set_xlabel("step")
    labels = header.get("labels", {})
    diverged_at = labels.get("diverged_at")
    for ax in axes:
        if diverged_at is not None:
            ax.axvline(diverged_at, color="black", lw=0.8, ls="--")
        for step, sig, severity in rows["opened"]:
            ax.axvline(step, color=COLOURS[severity], lw=1.2 if sig == signature else 0.5,
                       alpha=0.5 if sig == signature else 0.3, zorder=0)
        ax.legend(loc="upper left", fontsize=7, frameon=False)
        ax.tick_params(labelsize=7)
    first = next((s for s, sig, _ in rows["opened"] if sig == signature), None)
    outcome = labels.get("outcome", "?")
    when = f", labelled diverged at {diverged_at} (dashed)" if diverged_at is not None else ", labelled healthy"
    fig.suptitle(f"{signature}: {run_id}, first at step {first}{when}\n{why}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"{path}: {run_id} ({outcome}), {signature} first at step {first}, {os.path.getsize(path) // 1024} KB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--traces", default=DEFAULT_TRACES, help="directory of the dev traces")
    parser.add_argument("--out", default=os.path.join(HERE, "..", "docs", "img"), help="where to write the PNGs")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.traces):
        print(f"plot_signatures: no traces at {args.traces}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    cfg = DetectorConfig()
    for signature, (run_id, last, why) in EXAMPLES.items():
        path = os.path.join(args.traces, f"{run_id}.jsonl")
        if not os.path.exists(path):
            path += ".gz"
        _, steps = read_trace(path)
        header = _header(path)
        if last is not None:
            steps = [s for s in steps if s.step <= last]
        rows = replay_with_bands(steps, cfg)
        if not any(sig == signature for _, sig, _ in rows["opened"]):
            print(f"plot_signatures: {signature} does not fire on {run_id} any more; pick another run",
                  file=sys.stderr)
            return 1
        draw(signature, run_id, rows, header, why, cfg, os.path.join(args.out, f"{signature}.png"))
    return 0


def _header(path: str) -> dict[str, Any]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        first: dict[str, Any] = json.loads(f.readline())
    return first if first.get("kind") == "run" else {}


if __name__ == "__main__":
    sys.exit(main())
