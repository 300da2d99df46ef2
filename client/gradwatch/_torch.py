"""PyTorch instrumentation: per-layer gradient, weight and update norms for every optimizer step.

Cost is the point. Norms come from fused multi-tensor kernels (`torch._foreach_norm`, grouped by device and
dtype exactly as `torch.nn.utils.clip_grad_norm_` groups them), all of a step's results are packed into one
small tensor copied to pinned host memory without blocking, and that copy is read at a later step once the
device has finished it, so the training loop never waits on the device for monitoring (on CPU there is no
device to wait for: a step's norms are recorded in its own step hook, so the step is complete when the
user logs its loss, and local detection can judge it there). Where the user clips with
`gradwatch.clip_grad_norm_`, the clipping pass's per-tensor norms are reused, so clipping plus monitoring
reads the gradients once, like clipping alone.

Step numbers are optimizer steps counted by the watch from `start_step` (default 0), including steps that
AMP's GradScaler skipped; log your loss with the same count and the two merge into one step.
"""

from __future__ import annotations

import collections
import functools
import math
import time
import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

from ._options import DENSE_STEPS
from ._sink import StepSink

__all__ = ["Cadence", "Watch", "clip_grad_norm_", "tensor_norms", "watch"]

_watches: weakref.WeakSet[Watch] = weakref.WeakSet()
MAX_IN_FLIGHT = 4  # steps whose norms may still be on their way from the device


class Cadence:
    """How far apart weight and update norms are sampled when `weight_every`/`update_every` are left to the
    watch (None). A sample reads the weights four or five times (a copy before the step, the weight norms, the
    difference and its norms after it): 10-15 % of a CPU step, so a fixed period makes the overhead depend on
    the model and the machine. The period is instead the shortest (at least `shortest`, at most `longest`)
    that keeps samples under `budget` of the training time, from running averages of what one sample costs
    and what a step without one takes."""

    def __init__(self, shortest: int = 20, longest: int = 500, budget: float = 0.0025) -> None:
        self.shortest = shortest
        self.longest = longest
        self.budget = budget
        self.period = shortest
        self._step_s: float | None = None
        self._sample_s: float | None = None

    def step_took(self, seconds: float) -> None:
        """A step without a sample, from one step hook to the next."""
        self._step_s = _average(self._step_s, seconds)
        self._update()

    def sample_took(self, seconds: float) -> None:
        """The extra work of one sample."""
        self._sample_s = _average(self._sample_s, seconds)
        self._update()

    def _update(self) -> None:
        if self._step_s and self._sample_s is not None:
            wanted = math.ceil(self._sample_s / (self.budget * self._step_s))
            self.period = min(self.longest, max(self.shortest, wanted))


def _average(old: float | None, new: float) -> float:
    return new if old is None else 0.8 * old + 0.2 * new


def tensor_norms(tensors: list[torch.Tensor], norm_type: float = 2.0,
                 foreach: bool | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The norm of each tensor (0-d tensors, in input order) and their total, computed exactly as
    `torch.nn.utils.get_total_norm` computes them (same grouping, same order), so the totals are identical."""
    norms, _, total = _norms(tensors, norm_type, foreach)
    return norms, total


def _norms(tensors: list[torch.Tensor], norm_type: float = 2.0,
           foreach: bool | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
    """`tensor_norms`, and the norms as one 1-d tensor in input order where they are (one device and dtype:
    the stack the total is taken of), else None: a step's read-back then needs no stack of its own."""
    grouped: dict[Any, Any] = _group_tensors_by_device_and_dtype([tensors], with_indices=True)  # type: ignore[list-item]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    in_group_order: list[torch.Tensor] = []
    in_input_order = len(grouped) == 1
    for (device, _), ([group], indices) in grouped.items():
        norms: Any
        if (foreach is None and _has_foreach_support(group, device)) or (
            foreach and _device_has_foreach_support(device)
        ):
            norms = torch._foreach_norm(group, norm_type)
        elif foreach:
            raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
        else:
            norms = [torch.linalg.vector_norm(g, norm_type) for g in group]
        in_group_order.extend(norms)
        for index, norm in zip(indices, norms, strict=True):
            out[index] = norm
        in_input_order = in_input_order and list(indices) == list(range(len(tensors)))
    first_device = tensors[0].device
    stacked = torch.stack([n.to(first_device) for n in in_group_order])
    total = torch.linalg.vector_norm(stacked, norm_type)
    return out, stacked if in_input_order else None, total  # type: ignore[return-value]


@torch.no_grad()
def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_`, returning the same total norm (before clipping), whose per-tensor norms
    are handed to any `watch()` of these parameters so that it does not read the gradients again."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    with_grad = [p for p in parameters if p.grad is not None]
    if not with_grad:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    norms, stacked, total = _norms([p.grad for p in with_grad], norm_type, foreach)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")
    if norm_type == 2.0 and _watches:
        clip = _ClipNorms([id(p) for p in with_grad], norms, stacked, total)
        for w in list(_watches):
            try:
                w._take_clip_norms(clip)
            except Exception as exc:
                w.run.instrumentation_error(exc)
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach)
    return total


class _ClipNorms(NamedTuple):
    """What a clip measured, for the watches of those parameters: their ids and norms in the clip's order."""
    ids: list[int]
    norms: list[torch.Tensor]
    stacked: torch.Tensor | None
    total: torch.Tensor


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """A hook that fails must not take the optimizer step down with it (unless the run is strict)."""

    @functools.wraps(method)
    def hook(self: Watch, *args: Any, **kwargs: Any) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception as exc:
            self.run.instrumentation_error(exc)

    return hook


class Watch:
    """Hooks on one optimizer (and optionally its GradScaler) that log a model's norms to a run."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, run: StepSink, *,
                 scaler: Any = None, start_step: int = 0, weight_every: int | None = None,
                 update_every: int | None = None, dense_steps: int = DENSE_STEPS, gradients_at_step: bool = True):
        self.run = run
        self.gradients_at_step = gradients_at_step
        """Whether the step pre-hook takes the gradient norms (False: `measure_gradients` is called instead)."""
        self.optimizer = optimizer
        self.step = start_step
        self.weight_every = None if weight_every is None else max(0, weight_every)
        self.update_every = None if update_every is None else max(0, update_every)
        self.cadence = Cadence()
        self.last_sample = start_step - 1
        """The last step whose weight and update norms were sampled on the cadence (the period counts from it)."""
        self._dense_until = start_step + max(0, dense_steps)
        self._hook_at: float | None = None  # when the previous step hook ran (for an unsampled step)
        self._sample_parts: list[Any] = []  # this step's sample work: seconds, or CUDA (start, end) events
        self._timing: list[list[Any]] = []  # earlier samples' events, read once the device has passed them
        seen: set[int] = set()
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.names.append(name)
                self.params.append(p)
        self._ids = [id(p) for p in self.params]
        self._id_set = frozenset(self._ids)
        self._clip: _ClipNorms | None = None
        self._grad: tuple[list[int], torch.Tensor | None, list[torch.Tensor], torch.Tensor | None] | None = None
        self._snapshot: list[torch.Tensor] | None = None
        self._buffers: list[torch.Tensor] | None = None
        self._pending: collections.deque[tuple[Any, ...]] = collections.deque()
        self._slots: list[tuple[torch.Tensor, Any]] = []  # free pinned buffers and their events (CUDA)
        self._handles: list[Any] = []
        self._scaler = scaler
        self._scaler_step: Any = None
        if not run.enabled:
            return
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))
        self._handles.append(optimizer.register_step_post_hook(self._after_step))
        if scaler is not None:
            self._wrap_scaler(scaler)
        run.add_flush_hook(self.collect)
        _watches.add(self)

    def remove(self) -> None:
        """Detach every hook (the last step is read back first)."""
        self.collect()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._scaler_step is not None:
            del self._scaler.step
            self._scaler_step = None
        _watches.discard(self)

    def measure_gradients(self, scale: Any = None) -> None:
        """Take this step's gradient norms now, for the step hooks to record: for a framework that calls the
        optimizer's step before the gradients exist (Lightning runs the backward pass as the step's closure)
        or clips them before the step. Call it once per optimizer step, where the gradients are final (after
        AMP's unscaling, before clipping); with `gradients_at_step=False` the step pre-hook takes none itself.
        `scale`: the loss scale the gradients are still multiplied by (a tensor: divided without a sync)."""
        if self.run.finished or not self._handles:
            return
        try:
            with torch.no_grad():
                present, total, norms, stacked = self._gradient_norms()
                if scale is not None and norms:
                    norms = list(torch._foreach_div(norms, scale))
                    total = None if total is None else total / scale
                    stacked = None if stacked is None else stacked / scale
                self._grad = (present, total, norms, stacked)
        except Exception as exc:
            self.run.instrumentation_error(exc)

    # -- hooks -------------------------------------------------------------------------------------------
    def _gradient_norms(self) -> tuple[list[int], torch.Tensor | None, list[torch.Tensor], torch.Tensor | None]:
        """The norms of the gradients there are now: a clip's where one just measured them (nothing to redo)."""
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        clip, self._clip = self._clip, None
        norms: list[torch.Tensor] = []
        stacked = total = None
        if present:
            if clip is not None and len(present) == len(self._ids) and clip.ids == self._ids:
                norms, stacked, total = clip.norms, clip.stacked, clip.total  # the usual case: nothing to redo
            else:
                by_id = dict(zip(clip.ids, clip.norms, strict=True)) if clip is not None else {}
                if by_id and all(self._ids[i] in by_id for i in present):
                    norms = [by_id[self._ids[i]] for i in present]
                    if len(present) == len(by_id):
                        total = clip.total  # type: ignore[union-attr]
                else:
                    norms, stacked, total = _norms([self.params[i].grad for i in present])  # type: ignore[misc]
            if total is None:
                _, stacked, total = _norms(norms)  # the norms of the norms are the norms
        return present, total, norms, stacked

    def _take_clip_norms(self, clip: _ClipNorms) -> None:
        if not self._id_set.isdisjoint(clip.ids):
            self._clip = clip

    @_guarded
    @torch.no_grad()
    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.run.finished:  # the run is over; the model may train on (or be watched by a new run)
            return
        now = time.perf_counter()
        if self._hook_at is not None:
            self.cadence.step_took(now - self._hook_at)
        self._hook_at = now
        self.collect(wait=False)
        self._read_timing()
        if self.gradients_at_step:
            self._grad = self._gradient_norms()
        if self._due(self.update_every):
            started = self._timer()
            self._snapshot = self._copy_weights()
            self._timed(started)

    @_guarded
    @torch.no_grad()
    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.run.finished:
            return
        present, total, norms, stacked = self._grad or ([], None, [], None)
        self._grad = None
        parts = [stacked] if stacked is not None else list(norms)
        layout = {"grad": len(norms), "total": total is not None}
        if total is not None:
            parts.append(total)
        weights_due = self._due(self.weight_every)
        sampled = self._snapshot is not None or weights_due
        on_cadence = (weights_due and self.weight_every is None) or (
            self._snapshot is not None and self.update_every is None)
        started = self._timer() if sampled else None
        if weights_due:
            weights, _ = tensor_norms([p.detach() for p in self.params])
            parts += weights
            layout["weight"] = len(weights)
        if self._snapshot is not None:
            deltas = self._snapshot
            self._snapshot = None
            torch._foreach_sub_(deltas, [p.detach() for p in self.params])
            updates, update_total = tensor_norms(deltas)
            parts += updates
            parts.append(update_total)
            layout["update"] = len(updates)
        if sampled:
            self._timed(started)
            self._sample_done()
            if on_cadence:
                self.last_sample = self.step
            self._hook_at = None  # the next interval includes this sample: not a plain step
        lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
        packed = self._pack(parts) if parts else []
        if isinstance(packed, tuple) or self._pending:
            self._pending.append((self.step, present, layout, packed, lr))
            self.run.hold(self.step)
        else:  # on the host already: recorded now, so the step is complete when the user logs its loss
            self._log_result(self.step, present, layout, packed, lr, held=False)
        self.step += 1

    def _due(self, every: int | None) -> bool:
        """Whether this step measures what is sampled `every` steps (None: on the cadence's period): always
        during the first `dense_steps`."""
        if every == 0:
            return False
        if self.step < self._dense_until:
            return True
        if every is None:
            return self.step - self.last_sample >= self.cadence.period
        return self.step % every == 0

    def _timer(self) -> Any:
        """A mark before sample work: the host clock on CPU, an event on the device's stream elsewhere (the
        host only queues the work there; its cost is the device's)."""
        device = self.params[0].device if self.params else None
        if device is None or device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event

    def _timed(self, started: Any) -> None:
        """Add the work since `started` to this step's sample (a copy before the step, norms after it)."""
        if isinstance(started, float):
            self._sample_parts.append(time.perf_counter() - started)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.params[0].device))
        self._sample_parts.append((started, end))

    def _sample_done(self) -> None:
        parts, self._sample_parts = self._sample_parts, []
        if parts and all(isinstance(p, float) for p in parts):
            self.cadence.sample_took(sum(parts))
        elif parts:
            self._timing.append(parts)

    def _read_timing(self) -> None:
        """Sample costs measured on the device, once its events have passed (never waits)."""
        while self._timing and all(end.query() for _, end in self._timing[0]):
            self.cadence.sample_took(sum(start.elapsed_time(end) for start, end in self._timing.pop(0)) / 1e3)

    def _copy_weights(self) -> list[torch.Tensor]:
        """The weights before the step, for update norms. On CPU into buffers kept between steps: fresh 15 MB
        from the OS costs page faults worth ten times the copy. Accelerator allocators cache, so there the
        copy is made only on the steps that need it and the memory is given back."""
        weights = [p.detach() for p in self.params]
        if weights and weights[0].device.type == "cpu":
            if self._buffers is None:
                self._buffers = [torch.empty_like(w) for w in weights]
            torch._foreach_copy_(self._buffers, weights)
            return self._buffers
        return list(torch._foreach_mul(weights, 1.0))

    def _pack(self, parts: list[torch.Tensor]) -> list[float] | tuple[torch.Tensor, Any]:
        """A step's results (0-d and 1-d tensors): read on the spot on CPU, where there is no device to wait
        for; elsewhere packed into one tensor copied to pinned host memory without blocking (a slot)."""
        device = parts[0].device
        if device.type != "cuda":
            values: list[float] = []
            for t in parts:
                v = t.tolist()
                if isinstance(v, list):
                    values += v
                else:
                    values.append(v)
            return values
        if any(t.device != device for t in parts):
            parts = [t.to(device) for t in parts]
        packed = torch.cat([t.reshape(-1) for t in parts]).float()
        slot = self._slots.pop() if self._slots else None
        if slot is None or slot[0].numel() != packed.numel():
            slot = (torch.empty(packed.shape, dtype=torch.float32, pin_memory=True), torch.cuda.Event())
        host, event = slot
        host.copy_(packed, non_blocking=True)
        event.record(torch.cuda.current_stream(device))
        return slot

    def collect(self, wait: bool = True) -> None:
        """Log the norms of earlier steps. With `wait=False` (from the step hook) only those the device has
        finished computing are read, at most MAX_IN_FLIGHT steps late: the hook never waits on the device, so
        the host can keep queueing work ahead of it as it would without monitoring."""
        while self._pending:
            packed = self._pending[0][3]
            if (not wait and isinstance(packed, tuple) and len(self._pending) < MAX_IN_FLIGHT
                    and not packed[1].query()):
                return
            self._log_result(*self._pending.popleft())

    def _log_result(self, step: int, present: list[int], layout: dict[str, Any], packed: Any, lr: Any,
                    held: bool = True) -> None:
        if isinstance(packed, tuple):
            host, event = packed
            event.synchronize()  # already complete unless the device is MAX_IN_FLIGHT steps behind
            values: list[float] = host.tolist()
            self._slots.append(packed)
        else:
            values = packed
        fields: dict[str, Any] = {}
        k = layout["grad"]
        if k == len(self.names):
            fields["grad_norms"] = dict(zip(self.names, values[:k], strict=True))
        elif k:
            fields["grad_norms"] = {self.names[i]: v for i, v in zip(present, values[:k], strict=True)}
        pos = k
        if layout["total"]:
            fields["grad_norm"] = values[pos]
            pos += 1
        n = layout.get("weight", 0)
        if n:
            fields["weight_norms"] = dict(zip(self.names, values[pos:pos + n], strict=True))
            pos += n
        n = layout.get("update", 0)
        if n:
            fields["update_norms"] = dict(zip(self.names, values[pos:pos + n], strict=True))
            fields["update_norm"] = values[pos + n]
        if lr is not None:
            fields["lr"] = lr
        self.run.log_measured(step, fields)
        if held:
            self.run.release(step)

    # -- AMP ---------------------------------------------------------------------------------------------
    @_guarded
    def _skipped(self) -> None:
        self.collect(wait=False)
        self._clip = None
        self._grad = None
        self._snapshot = None
        self._sample_parts = []
        self.run.log_measured(self.step, {"skipped": True})
        self.step += 1

    def _wrap_scaler(self, scaler: Any) -> None:
        """GradScaler.step skips optimizer.step when it found inf/NaN gradients; record that as `skipped`."""
        original = scaler.step
        self._scaler_step = original

        def step(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            before = self.step
            result = original(optimizer, *args, **kwargs)
            if optimizer is self.optimizer and self.step == before:
                self._skipped()
            return result

        scaler.step = step


def watch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, run: StepSink, *, scaler: Any = None,
          start_step: int = 0, weight_every: int | None = None, update_every: int | None = None,
          dense_steps: int = DENSE_STEPS) -> Watch:
    """Log per-layer gradient norms (before clipping), weight norms and update norms for every step.

    scaler: the `torch.amp.GradScaler` in use, so that steps it skips are recorded as skipped.
    start_step: the number of the next optimizer step (to line up with the steps you `log`).
    weight_every / update_every: measure weight / update norms every N steps (0: never). Each is a pass over
    the weights, and an update norm also needs a copy of the weights from before the step (on CPU a buffer the
    size of the model, kept): together 10-15 % of a CPU step when done on every step (docs/client.md). The
    default (None) samples both together, at least 20 steps apart and further where one sample would cost
    more than 0.25 % of the training time (`Cadence`: measured, at most 500 steps apart), so the
    update-to-weight ratio is still judged many times an epoch. Gradient norms, the explosion signal, are
    measured on every step.
    dense_steps: measure weight and update norms (where their `*_every` is not 0) on every one of the first N
    steps watched (default 20). A run that blows up in its first updates shows it only there, and the
    detectors' first-update rules and update-ratio band need consecutive samples (docs/detection.md)."""
    return Watch(model, optimizer, run, scaler=scaler, start_step=start_step, weight_every=weight_every,
                 update_every=update_every, dense_steps=dense_steps)
