"""gradwatch: watch training jobs for exploding gradients.

    import gradwatch
    run = gradwatch.init(project="resnet", name="lr0.1", config={"lr": 0.1})
    gradwatch.watch(model, optimizer, run)          # per-layer norms, one fused pass, no extra sync
    for step, batch in enumerate(loader):
        ...
        gradwatch.clip_grad_norm_(model.parameters(), 1.0)   # drop-in; its pass also yields the norms
        optimizer.step()
        run.log(step, loss=loss)
    run.finish()

Importing this package loads only the standard library; `watch` and `clip_grad_norm_` import torch when
called.
"""

from __future__ import annotations

from typing import Any as _Any

from ._errors import CriticalIncident, GradwatchError
from ._options import DENSE_STEPS, InitOptions, Options
from ._run import DeliveryReport, Run, init
from ._sink import StepSink as _StepSink
from ._transport import Transport
from .wire import VERSION as _VERSION

__all__ = [
    "DENSE_STEPS",
    "CriticalIncident",
    "DeliveryReport",
    "GradwatchError",
    "InitOptions",
    "Options",
    "Run",
    "Transport",
    "clip_grad_norm_",
    "init",
    "tensor_norms",
    "watch",
]

__version__ = _VERSION


def watch(model: _Any, optimizer: _Any, run: _StepSink, *, scaler: _Any = None, start_step: int = 0,
          weight_every: int | None = None, update_every: int | None = None, dense_steps: int = DENSE_STEPS) -> _Any:
    """Instrument a PyTorch model and optimizer: per-layer gradient, weight and update norms for every step.

    scaler: the GradScaler in use (steps it skips are recorded as skipped); start_step: the number of the next
    optimizer step; weight_every / update_every: sample weight / update norms every N steps (0: never; None:
    on a cadence that keeps them under 0.25 % of the training time); dense_steps: measure them on every one of
    the first N steps. `gradwatch._torch.watch` says more; it returns the `Watch` (`.remove()` detaches it)."""
    from ._torch import watch as _watch

    return _watch(model, optimizer, run, scaler=scaler, start_step=start_step, weight_every=weight_every,
                  update_every=update_every, dense_steps=dense_steps)


def clip_grad_norm_(parameters: _Any, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> _Any:
    """Drop-in for `torch.nn.utils.clip_grad_norm_` (same arguments, same return value) whose norm pass also
    gives watch() the per-layer norms, so clipping plus monitoring costs no more than clipping."""
    from ._torch import clip_grad_norm_ as _clip

    return _clip(parameters, max_norm, norm_type, error_if_nonfinite, foreach)


def tensor_norms(tensors: list[_Any], norm_type: float = 2.0, foreach: bool | None = None) -> tuple[list[_Any], _Any]:
    """The norm of each tensor (0-d tensors, in input order) and their total, in one fused pass grouped and
    ordered exactly as `torch.nn.utils.get_total_norm` does it (so the total is identical): what watch() and
    clip_grad_norm_ compute per step, for a loop that wants the per-layer norms itself."""
    from ._torch import tensor_norms as _norms

    return _norms(tensors, norm_type, foreach)
