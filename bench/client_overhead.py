"""What the gradwatch client costs a training job, side by side with the floor and with wandb.watch.

    python bench/client_overhead.py            # readable table
    python bench/client_overhead.py --json     # one JSON object (keys below)
    python bench/client_overhead.py --quick    # fewer repeats, no wandb (CI)
    python bench/client_overhead.py --log-only --json   # run.log() latency alone (up, down, hung): seconds

Measured on CPU on a 3.7M-parameter MLP with 50 parameter tensors (25 Linear(384, 384) layers):

- norms_vs_floor: the per-layer gradient norm pass (every tensor's norm plus the total) over the time of
  `torch.nn.utils.get_total_norm` on the same gradients, the floor for reading every gradient once.
- step_overhead_pct: a whole training step (forward, backward, clip, AdamW) with watch() + run.log() against
  the same step bare, both clipping (gradwatch.clip_grad_norm_ vs torch's). One bare and one watched step
  make a pair (back to back, in alternating order), so noise from other processes, which comes and goes
  over seconds, falls on both sides of it. The median over the pairs whose watched step sampled no weight
  and update norms (`plain_step_pct`) and the overhead with a sample on every step
  (`step_overhead_pct_every_step`, its own pairs) are weighed by the sampling period watch() chose for this
  model (`sample_period`, held fixed while measuring): (period - 1) plain steps and one sampled step. The
  few sampled pairs of the default run alone would give too noisy a median for the sample's cost.
- aa_step_pct: the same paired estimator between two bare models (no gradwatch on either side): what the
  method reads where there is nothing to find, the noise floor of plain_step_pct on this machine.
- log_p99_us_up / _down / _hung: run.log() call latency with the service up (a local HTTP sink in another
  process), down (connection refused) and hung (a socket that accepts and never answers).
- wandb_watch_step_overhead_pct: the same step with wandb.watch(model, log="gradients", log_freq=1) in
  offline mode (null, with the reason printed, where wandb cannot run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import gradwatch
from gradwatch import DENSE_STEPS, tensor_norms

DIM, LAYERS, BATCH = 384, 25, 256
DEVICE = torch.device("cpu")

SINK = r"""
import http.server, json, os, sys, threading
# Gone with the benchmark, even one killed by a timeout: its end of the pipe closes.
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_PUT(self): self._ok({"run_id": "x"})
    def do_POST(self):
        self._ok({"accepted": 0, "duplicates": 0, "open_incidents": []})
    def _ok(self, body):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        data = json.dumps(body).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data)
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i in range(LAYERS):
        layers.append(torch.nn.Linear(DIM, DIM))
        if i < LAYERS - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, DIM, generator=g)
    return model, opt, x.to(DEVICE), y.to(DEVICE)


@contextlib.contextmanager
def sink_server() -> Iterator[str]:
    with subprocess.Popen([sys.executable, "-c", SINK], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as proc:
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline())
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.kill()


@contextlib.contextmanager
def hung_server() -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections complete in the kernel's backlog; nothing ever reads or answers
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def timed(fn: Callable[[], Any], n: int) -> float:
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


# -- 1. the norm pass against the floor ----------------------------------------------------------------------
def norms_vs_floor(repeats: int) -> dict[str, float]:
    model, _opt, x, y = build()
    torch.nn.functional.mse_loss(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]

    def ours() -> None:
        norms, total = tensor_norms(grads)
        torch.stack([*norms, total])  # packed for the one-step-late read-back, as watch() does

    def floor() -> None:
        torch.nn.utils.get_total_norm(grads)

    for fn in (ours, floor):
        timed(fn, 20)
    ours_t, floor_t = [], []
    for _ in range(repeats):
        ours_t.append(timed(ours, 20))
        floor_t.append(timed(floor, 20))
    o, f = statistics.median(ours_t), statistics.median(floor_t)
    return {"ours_ms": o * 1e3, "floor_ms": f * 1e3, "ratio": o / f}


# -- 2. whole-step overhead ----------------------------------------------------------------------------------
def plain_step(model: Any, opt: Any, x: Any, y: Any) -> None:
    """The uninstrumented training step every comparison is made against: forward, backward, torch's clip, step."""
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def step_overhead(url: str, pairs: int, spool: Path, **watch_options: int) -> dict[str, float]:
    bare_model, bare_opt, x, y = build()
    model, opt, _, _ = build()
    run = gradwatch.init(project="bench", name="client_overhead", url=url, spool_dir=spool)
    watch = gradwatch.watch(model, opt, run, **watch_options)
    state = {"bare": 0, "watched": 0}

    def bare_step() -> None:
        plain_step(bare_model, bare_opt, x, y)
        state["bare"] += 1

    def watched_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        gradwatch.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run.log(state["watched"], loss=loss)
        state["watched"] += 1

    timed(bare_step, 3)
    timed(watched_step, 3 + DENSE_STEPS)  # past watch()'s dense start: the figures are the steady state
    timed(watched_step, 5)  # the cadence has seen samples (the dense start) and plain steps
    if watch.weight_every is None:
        period = watch.cadence.shortest = watch.cadence.longest = watch.cadence.period

        def sampled() -> bool:
            return watch.last_sample == state["watched"] - 1
    else:
        period = watch.weight_every

        def sampled() -> bool:
            return (state["watched"] - 1) % period == 0

    result = paired(bare_step, watched_step, max(pairs, 2 * period), sampled, period)
    run.finish()
    return {**result, "sample_period": period}


def paired(bare: Callable[[], Any], other: Callable[[], Any], pairs: int, sampled: Callable[[], bool],
           period: int) -> dict[str, float]:
    """Pairs of one bare and one instrumented step, back to back in alternating order, so that noise from other
    processes (which comes and goes over seconds) falls on both sides of a pair. `sampled()` says whether the
    instrumented step just run did its every-`period`-steps work: `plain_pct` is the median over the other
    pairs, `overhead_pct` weighs the median of those pairs by 1/period and the plain one by (period - 1)/period."""
    bare_t, other_t, plain, heavy = [], [], [], []
    for i in range(pairs):
        if i % 2 == 0:
            b = timed(bare, 1)
            o = timed(other, 1)
        else:
            o = timed(other, 1)
            b = timed(bare, 1)
        (heavy if sampled() else plain).append(o / b)
        bare_t.append(b)
        other_t.append(o)
    r_heavy = statistics.median(heavy) if heavy else statistics.median(plain)
    ratio = r_heavy if period <= 1 or not plain else ((period - 1) * statistics.median(plain) + r_heavy) / period
    return {"bare_ms": statistics.median(bare_t) * 1e3, "watched_ms": statistics.median(other_t) * 1e3,
            "overhead_pct": (ratio - 1) * 100,
            "plain_pct": (statistics.median(plain) - 1) * 100 if plain else (r_heavy - 1) * 100}


def aa_control(pairs: int) -> dict[str, float]:
    """The paired estimator on two bare models: the bias and noise of plain_step_pct where the truth is 0."""
    a_model, a_opt, x, y = build()
    b_model, b_opt, _, _ = build()

    def a_step() -> None:
        plain_step(a_model, a_opt, x, y)

    def b_step() -> None:
        plain_step(b_model, b_opt, x, y)

    timed(a_step, 3)
    timed(b_step, 3)
    return paired(a_step, b_step, pairs, lambda: False, 1)


def wandb_overhead(pairs: int) -> tuple[dict[str, float] | None, str | None]:
    try:
        import wandb
    except ImportError as exc:
        return None, f"wandb is not installed ({exc})"
    bare_model, bare_opt, x, y = build()
    model, opt, _, _ = build()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            os.environ.setdefault("WANDB_SILENT", "true")
            wrun = wandb.init(project="gradwatch-bench", mode="offline", dir=tmp)
            wandb.watch(model, log="gradients", log_freq=1)
        except Exception as exc:  # noqa: BLE001 - the reason is the result
            return None, f"wandb could not start offline: {type(exc).__name__}: {exc}"

        def bare_step() -> None:
            plain_step(bare_model, bare_opt, x, y)

        def wandb_step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            wandb.log({"loss": loss.item()})

        timed(bare_step, 3)
        timed(wandb_step, 3)
        result = paired(bare_step, wandb_step, pairs, lambda: True, 1)
        wrun.finish()
    return result, None


# -- 3. log() latency ----------------------------------------------------------------------------------------
def log_latency(url: str, n: int, spool: Path) -> dict[str, float]:
    run = gradwatch.init(project="bench", name="log_latency", url=url, spool_dir=spool, flush_timeout=1.0)
    clock = time.perf_counter_ns
    for step in range(1000):
        run.log(step, loss=1.0, grad_norm=2.0, lr=1e-3)
    samples = []
    for step in range(1000, 1000 + n):
        t0 = clock()
        run.log(step, loss=1.0, grad_norm=2.0, lr=1e-3)
        samples.append(clock() - t0)
        # A training step does other work between two logs; 20 us is a very fast one.
        until = clock() + 20_000
        while clock() < until:
            pass
    t0 = time.perf_counter()
    run.finish()
    finish_s = time.perf_counter() - t0
    samples.sort()
    return {"p50_us": samples[n // 2] / 1e3, "p99_us": samples[int(n * 0.99)] / 1e3,
            "max_us": samples[-1] / 1e3, "finish_s": finish_s}


def log_latencies(n_logs: int, spool: Path, say: Callable[..., None]) -> tuple[dict[str, float], ...]:
    """run.log() with the service up, down (connection refused) and hung (accepts, never answers)."""
    with sink_server() as url:
        up = log_latency(url, n_logs, spool)
    down = log_latency(closed_port_url(), n_logs, spool)
    with hung_server() as url:
        hung = log_latency(url, n_logs, spool)
    for name, r in (("up", up), ("down", down), ("hung", hung)):
        say(f"log() service {name:4}: p50 {r['p50_us']:.1f} us, p99 {r['p99_us']:.1f} us, "
            f"max {r['max_us']:.0f} us; finish() {r['finish_s']:.2f} s (target p99 <= 50 us)")
    return up, down, hung


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and no wandb (for CI)")
    parser.add_argument("--no-wandb", action="store_true", help="do not measure wandb.watch")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="where the model trains (the targets are for cpu)")
    parser.add_argument("--log-only", action="store_true", help="measure run.log() latency only")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    say: Callable[..., None] = (lambda *a, **k: print(*a, **k, file=sys.stderr)) if args.json else print
    logging_quiet()
    pairs, n_logs = (40, 5_000) if args.quick else (400, 20_000)
    n_params = sum(p.numel() for p in build()[0].parameters())
    say(f"model: {n_params / 1e6:.2f}M parameters in {2 * LAYERS} tensors, batch {BATCH}, on {DEVICE}, "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    if args.log_only:
        with tempfile.TemporaryDirectory() as tmp:
            up, down, hung = log_latencies(n_logs, Path(tmp), say)
        if args.json:
            print(json.dumps({f"log_{q}_us_{name}": round(r[f"{q}_us"], 1) for name, r in
                              (("up", up), ("down", down), ("hung", hung)) for q in ("p50", "p99")}))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp)
        floor = norms_vs_floor(10 if args.quick else 30)
        say(f"norm pass: per-layer {floor['ours_ms']:.3f} ms vs get_total_norm {floor['floor_ms']:.3f} ms "
            f"= {floor['ratio']:.2f}x (target <= 1.2x)")
        with sink_server() as url:
            default = step_overhead(url, pairs, spool)
            every = step_overhead(url, pairs // 4, spool, weight_every=1, update_every=1)
            period = default["sample_period"]
            overall = ((period - 1) * default["plain_pct"] + every["overhead_pct"]) / period
            say(f"step: bare {every['bare_ms']:.1f} ms, watch()+log {every['watched_ms']:.1f} ms "
                f"= {every['overhead_pct']:+.2f}% (weight and update norms on every step)")
            say(f"step: bare {default['bare_ms']:.1f} ms, watch()+log {default['watched_ms']:.1f} ms "
                f"= {default['plain_pct']:+.2f}% without a sample; with one every {period} steps (as watch() "
                f"chose): {overall:+.2f}% (target <= 1%)")
            control = aa_control(pairs // 4)
            say(f"step: two bare models, the same estimator: {control['plain_pct']:+.2f}% (the noise floor)")
        up, down, hung = log_latencies(n_logs, spool, say)
    if args.quick or args.no_wandb:
        wandb_result, reason = None, "skipped with --quick" if args.quick else "skipped with --no-wandb"
    else:
        wandb_result, reason = wandb_overhead(pairs // 4)
    if wandb_result is None:
        say(f"wandb.watch(log='gradients', log_freq=1): not measured: {reason}")
    else:
        say(f"wandb.watch(log='gradients', log_freq=1), offline: bare {wandb_result['bare_ms']:.1f} ms, "
            f"watched {wandb_result['watched_ms']:.1f} ms = {wandb_result['overhead_pct']:+.1f}%")
    if args.json:
        print(json.dumps({
            "device": str(DEVICE),
            "threads": torch.get_num_threads(),
            "norms_vs_floor": round(floor["ratio"], 3),
            "step_overhead_pct": round(overall, 2),
            "step_overhead_pct_every_step": round(every["overhead_pct"], 2),
            "sample_period": default["sample_period"],
            "plain_step_pct": round(default["plain_pct"], 2),
            "aa_step_pct": round(control["plain_pct"], 2),
            "log_p99_us_up": round(up["p99_us"], 1),
            "log_p99_us_down": round(down["p99_us"], 1),
            "log_p99_us_hung": round(hung["p99_us"], 1),
            "wandb_watch_step_overhead_pct": None if wandb_result is None
            else round(wandb_result["overhead_pct"], 1),
            "wandb_reason": reason,
        }))
    return 0


def logging_quiet() -> None:
    import logging

    logging.getLogger("gradwatch").setLevel(logging.ERROR)


if __name__ == "__main__":
    raise SystemExit(main())
