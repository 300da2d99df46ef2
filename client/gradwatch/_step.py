"""One optimizer step as the client accumulates it, and its wire form.

`log` and `log_layers` for the same step merge into one record; the record is sealed (handed to the sender,
never touched again) once a later step is logged or it has aged. A step must never be split across batches:
the service rejects a resend of a stored step with different values (409).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from time import monotonic
from time import time as unix_time
from typing import TYPE_CHECKING, Any

from .wire import LAYER_FIELDS, SCALAR_FIELDS, encode_value, to_float

if TYPE_CHECKING:
    from .detect import StepInput

__all__ = ["LAYER_ATTRIBUTES", "DeviceScalar", "StepRecord", "encode_step", "host_value", "resolve"]

_NO_VALUES: dict[str, float | None] = {}
"""The empty mapping every record starts with (never written to: `merge` gives a record its own dict on first
use). A record sealed but not yet sent lives until the sender takes it, a batch of them at a time; four dicts
of its own each would be 2,000 objects a batch for the garbage collector to count, and a young-generation
collection in one `log()` of every hundred or so (its p99)."""

LAYER_ATTRIBUTES = dict(zip(LAYER_FIELDS, ("grad_norms", "weight_norms", "update_norms"), strict=True))
"""wire field -> the StepRecord attribute holding its {layer: value}"""


@dataclass
class StepRecord:
    step: int
    time: float = field(default_factory=unix_time)
    touched: float = field(default_factory=monotonic)
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    update_norm: float | None = None
    skipped: bool | None = None
    grad_norms: dict[str, float | None] = field(default_factory=lambda: _NO_VALUES)
    weight_norms: dict[str, float | None] = field(default_factory=lambda: _NO_VALUES)
    update_norms: dict[str, float | None] = field(default_factory=lambda: _NO_VALUES)
    scalars: dict[str, float | None] = field(default_factory=lambda: _NO_VALUES)
    logged: bool = False
    """The user logged to this step (not only instrumentation): what local detection waits for."""
    judged: bool = False
    """The local detectors have seen this step (each step is judged once, in step order)."""

    def merge(self, values: Mapping[str, Any], overwrite: bool = True) -> None:
        """Fold already-converted values in; `overwrite=False` fills only what is still missing."""
        for key, value in values.items():
            if value is None:
                continue
            if key in ("grad_norms", "weight_norms", "update_norms", "scalars"):
                target: dict[str, float | None] = getattr(self, key)
                if target is _NO_VALUES:
                    setattr(self, key, dict(value))
                elif overwrite or not target:
                    target.update(value)
                else:
                    for name, v in value.items():
                        target.setdefault(name, v)
            elif overwrite or getattr(self, key) is None:
                setattr(self, key, value)
        self.touched = monotonic()

    def materialize(self) -> None:
        """Replace values still on their way from the device by floats (sender thread; idempotent)."""
        for name in SCALAR_FIELDS:
            value = getattr(self, name)
            if value is not None and type(value) is not float:
                setattr(self, name, resolve(value))
        for values in (self.scalars, self.grad_norms, self.weight_norms, self.update_norms):
            for key, value in values.items():
                if type(value) is not float:
                    values[key] = resolve(value)

    def on_host(self) -> bool:
        """Whether every value can be read without waiting for a device (a non-blocking check)."""
        for name in SCALAR_FIELDS:
            value: Any = getattr(self, name)
            if isinstance(value, DeviceScalar) and not value.event.query():
                return False
        return all(not isinstance(v, DeviceScalar) or v.event.query()
                   for values in (self.scalars, self.grad_norms, self.weight_norms, self.update_norms)
                   for v in values.values())

    def layer_names(self) -> list[str]:
        names: dict[str, None] = {}
        for attr in LAYER_ATTRIBUTES.values():
            names.update(dict.fromkeys(getattr(self, attr)))
        return list(names)

    def as_detector_input(self) -> StepInput:
        """The step as `gradwatch.detect.advance` takes it (imported here: `import gradwatch` stays cheap)."""
        from .detect import StepInput

        return StepInput(self.step, resolve(self.loss), resolve(self.grad_norm), resolve(self.lr),
                         resolve(self.update_norm), bool(self.skipped), None, dict(self.grad_norms),
                         dict(self.weight_norms), dict(self.update_norms))


class DeviceScalar:
    """A 0-d tensor logged from a CUDA device: a copy to pinned host memory, queued behind the work that
    computes it, and an event marking its completion. The sender thread waits on the event (the wait releases
    the GIL), so neither thread holds up the training loop while the device catches up. Host buffers and
    events are recycled once read: allocating pinned memory on every `log()` would cost more than the log."""

    __slots__ = ("event", "host", "key")
    _free: list[DeviceScalar] = []

    def __init__(self, key: tuple[Any, Any]) -> None:
        import torch

        self.key = key
        self.host = torch.empty((), dtype=key[0], pin_memory=True)
        self.event = torch.cuda.Event()

    @classmethod
    def of(cls, tensor: Any) -> DeviceScalar:
        import torch

        key = (tensor.dtype, tensor.device)
        try:
            slot = cls._free.pop()  # atomic under the GIL
        except IndexError:
            slot = None
        if slot is None or slot.key != key:
            slot = cls(key)
        slot.host.copy_(tensor.detach(), non_blocking=True)
        slot.event.record(torch.cuda.current_stream(tensor.device))
        return slot

    def value(self) -> float:
        """Wait for the copy and read it; the slot is recycled, so call this once (see StepRecord.materialize)."""
        self.event.synchronize()
        value = float(self.host)
        if len(self._free) < 64:
            self._free.append(self)
        return value


def host_value(x: Any) -> Any:
    """A logged value as a float, except a 0-d tensor on an accelerator: that is read later (see `resolve`),
    because reading it here would make the training loop wait for the device. A tensor is detached first: a
    loss still attached to its graph makes torch warn on every read ("Converting a tensor with
    requires_grad=True to a scalar ...")."""
    if type(x) is float:
        return x
    detach = getattr(x, "detach", None)
    if detach is not None and getattr(x, "ndim", None) == 0:
        x = detach()
        kind = x.device.type
        if kind == "cuda":
            return DeviceScalar.of(x)
        if kind != "cpu":
            return x
    value = to_float(x)
    if value is None:
        raise TypeError("None is not a value")
    return value


def resolve(value: Any) -> float | None:
    """A stored value as a float. Accelerator tensors are kept as they were logged and read here, in the
    sender thread, so that `run.log(step, loss=loss)` never makes the training thread wait for the device."""
    if value is None or type(value) is float:
        return value
    if type(value) is DeviceScalar:
        return value.value()
    return to_float(value)


def encode_step(record: StepRecord, layers: list[str]) -> dict[str, Any]:
    """The wire form of a record, per-layer values aligned with `layers` (the batch's layer list)."""
    out: dict[str, Any] = {"step": record.step, "time": record.time}
    for name in SCALAR_FIELDS:
        value = getattr(record, name)
        if value is not None:
            out[name] = encode_value(resolve(value))
    for wire_name, attr in LAYER_ATTRIBUTES.items():
        values: dict[str, float | None] = getattr(record, attr)
        if values:
            # The sender's hottest loop (layers x steps): finite floats (x - x == 0) pass through untouched.
            row = [values.get(layer) for layer in layers]
            out[wire_name] = [v if v is None or v - v == 0 else encode_value(v) for v in row]
    if record.scalars:
        out["scalars"] = {k: encode_value(resolve(v)) for k, v in record.scalars.items()}
    if record.skipped is not None:
        out["skipped"] = record.skipped
    return out
