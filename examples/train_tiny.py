"""Train a small real model on CPU while gradwatch watches it.

    python examples/train_tiny.py --url http://127.0.0.1:8000 --steps 300
    python examples/train_tiny.py --explode        # a learning rate that blows up: NaN at about step 200

A 3-layer MLP learns a fixed non-linear regression task. It is instrumented the way the README shows: one
`gradwatch.watch(...)` line, the drop-in `gradwatch.clip_grad_norm_`, and `run.log(step, loss=...)`. With
`--explode` the learning rate is too high for SGD with momentum and nothing is clipped: the run looks healthy
for about 120 steps, then the gradient norm grows exponentially, overflows to inf and the loss turns into NaN
(about step 200 with the default seed). The service opens incidents, and the on_alert callback below prints
them as they arrive.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

import gradwatch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("GRADWATCH_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("GRADWATCH_TOKEN"))
    parser.add_argument("--project", default="demo")
    parser.add_argument("--name", default=None, help="run name (default: tiny-healthy or tiny-explode)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--explode", action="store_true", help="learning rate and init that make it blow up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--on-critical", choices=["warn", "stop", "raise"], default="warn",
                        help="what to do when a critical incident opens (stop: leave the loop)")
    parser.add_argument("--local-detection", action="store_true", default=None,
                        help="also run the detectors in-process with --on-critical warn (stop and raise always "
                             "do, to act at the step that raised the critical)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to sleep per step (a slower job)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def build(explode: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer, float]:
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 1),
    )
    if explode:
        return model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), math.inf
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3), 1.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    name = args.name or ("tiny-explode" if args.explode else "tiny-healthy")
    model, optimizer, max_norm = build(args.explode)
    config = {"model": "mlp-16-64-64-1", "optimizer": type(optimizer).__name__,
              "lr": optimizer.param_groups[0]["lr"], "clip": None if math.isinf(max_norm) else max_norm,
              "steps": args.steps, "explode": args.explode, "seed": args.seed}

    def on_alert(incident: dict) -> None:
        layer = f" (first in {incident['layer']})" if incident.get("layer") else ""
        print(f"  ALERT {incident.get('severity')}: {incident.get('signature')}{layer} — "
              f"{incident.get('message', '')}", flush=True)

    run = gradwatch.init(project=args.project, name=name, config=config, url=args.url, token=args.token,
                         on_alert=on_alert, on_critical=args.on_critical, local_detection=args.local_detection)
    gradwatch.watch(model, optimizer, run)
    print(f"run {run.run_id} ({name}) -> {args.url}", flush=True)

    generator = torch.Generator().manual_seed(args.seed + 1)
    teacher = torch.randn(16, 1, generator=generator)
    status = "finished"
    reported_nonfinite = False
    t0 = time.perf_counter()
    with run:
        for step in range(args.steps):
            x = torch.randn(64, 16, generator=generator)
            y = torch.sin(x @ teacher) + 0.1 * x[:, :1] ** 2
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            grad_norm = gradwatch.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            run.log(step, loss=loss)
            finite = math.isfinite(loss.item())
            if not args.quiet and (step % 50 == 0 or (not finite and not reported_nonfinite)):
                print(f"step {step:5d}  loss {loss.item():.4g}  grad_norm {grad_norm.item():.4g}", flush=True)
                reported_nonfinite = reported_nonfinite or not finite
            if args.delay:
                time.sleep(args.delay)
            if run.should_stop:
                print(f"stopping at step {step}: a critical incident is open", flush=True)
                status = "stopped"
                break
        report = run.finish(status)
    elapsed = time.perf_counter() - t0
    print(f"{report} in {elapsed:.1f} s", flush=True)
    return 0 if not report.lost else 1


if __name__ == "__main__":
    sys.exit(main())
