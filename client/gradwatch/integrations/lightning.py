"""gradwatch for PyTorch Lightning: `Trainer(callbacks=[GradwatchCallback(project="gpt")])`.

Per optimizer step it records what `watch()` records for a plain loop (per-layer gradient norms, weight and
update norms on a cadence, the learning rate), the loss of the training step and the learning rates of the
other parameter groups; the run's config is the module's (and datamodule's) hyper-parameters. On a critical
incident the trainer stops at the step that raised it (`trainer.should_stop`), after saving a checkpoint with
`on_critical="checkpoint"`.

Where the norms are taken: in `on_before_optimizer_step`, which Lightning calls once per optimizer step, after
the backward pass of the step's last micro-batch (so under gradient accumulation the norms are those of the
accumulated gradient), after AMP's unscaling and before gradient clipping. The optimizer's own step hooks
cannot: Lightning runs the backward pass as the step's closure, inside `optimizer.step`. A step that AMP's
GradScaler skipped (inf/NaN gradients, routine under fp16) is recorded as skipped, with no norms, so the
detectors do not take the scaler's overflow for an explosion.

Works with `lightning.pytorch` and `pytorch_lightning` alike: the callback is an instance of the `Callback` of
each one installed.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Unpack

from .._options import DENSE_STEPS, CallbackOptions
from .._run import Run
from ._common import CriticalAction, Instrumented, WatchSettings, call_quietly, first_lr_groups, hyper_parameters

__all__ = ["GradwatchCallback"]


def _callback_base() -> type:
    """The `Callback` class of every Lightning installed (both where both are), so that either Trainer takes
    the callback."""
    bases: list[type] = []
    for module in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(module).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError("gradwatch.integrations.lightning needs PyTorch Lightning: "
                          "pip install 'gradwatch[lightning]' (or lightning)")
    return bases[0] if len(bases) == 1 else type("LightningCallbacks", tuple(bases), {})


if TYPE_CHECKING:
    _Callback = object
else:
    _Callback = _callback_base()


class GradwatchCallback(_Callback):
    """Send a Lightning training's per-layer gradient norms, loss and learning rates to gradwatch, and stop the
    trainer on a critical incident.

    run: a run to log to (its `on_critical` decides whether it asks to stop); else the callback opens one at
    `fit` with project, name, config, run_id, meta and the options of `gradwatch.init` (url, token, spool_dir,
    on_alert, transport, ...), and finishes it when training ends.
    on_critical: "stop" (the default: `trainer.should_stop` in the step that raised the critical), "checkpoint"
    (`trainer.save_checkpoint` to `checkpoint_dir`, default the trainer's `default_root_dir`, then stop) or
    "warn" (warn once, train on).
    weight_every, update_every, dense_steps: as for `gradwatch.watch`."""

    def __init__(self, run: Run | None = None, *, project: str | None = None, name: str | None = None,
                 config: Mapping[str, Any] | None = None, run_id: str | None = None,
                 meta: Mapping[str, Any] | None = None, on_critical: CriticalAction = "stop",
                 checkpoint_dir: str | None = None, weight_every: int | None = None,
                 update_every: int | None = None, dense_steps: int = DENSE_STEPS,
                 **options: Unpack[CallbackOptions]) -> None:
        super().__init__()
        self.gradwatch = Instrumented(run, on_critical, project, name, config, run_id, meta, options)
        self.checkpoint_dir = checkpoint_dir
        self.settings = WatchSettings(weight_every, update_every, dense_steps)
        self.watch: Any = None
        self._optimizer: Any = None
        self._logged_step = -1

    @property
    def run(self) -> Run | None:
        return self.gradwatch.run

    # -- fit -----------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        from .._torch import Watch

        datamodule = getattr(trainer, "datamodule", None)
        run = self.gradwatch.open(hyper_parameters(datamodule, pl_module), _trainer_meta(trainer))
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        if not optimizers or not run.enabled:
            return
        if len(optimizers) > 1:
            warnings.warn(f"gradwatch watches the first of {len(optimizers)} optimizers", RuntimeWarning,
                          stacklevel=2)
        self._optimizer = _unwrap(optimizers[0])
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        self.watch = Watch(pl_module, self._optimizer, run, scaler=scaler, start_step=int(trainer.global_step),
                           weight_every=self.settings.weight_every, update_every=self.settings.update_every,
                           dense_steps=self.settings.dense_steps, gradients_at_step=False)
        self._logged_step = self.watch.step - 1

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.watch is not None and _unwrap(optimizer) is self._optimizer:
            self.watch.measure_gradients()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.watch is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None and hasattr(loss, "detach"):
            self.gradwatch.add_loss(loss.detach())  # already divided by accumulate_grad_batches: a sum is the mean
        step = self.watch.step - 1
        if step == self._logged_step:
            return  # a micro-batch whose gradients accumulate into the next optimizer step
        self._logged_step = step
        run = self.gradwatch.run
        assert run is not None
        run.log(step, loss=self.gradwatch.take_loss(), **first_lr_groups(self._optimizer))
        stop = self.gradwatch.should_stop() and self.gradwatch.stopped_at is None
        if getattr(trainer, "world_size", 1) > 1:  # rank 0 holds the run; every rank must stop
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        if stop:
            self._stop(trainer, step)

    def _stop(self, trainer: Any, step: int) -> None:
        self.gradwatch.stopped_at = step
        if self.gradwatch.on_critical == "checkpoint":
            directory = self.checkpoint_dir or trainer.default_root_dir
            path = os.path.join(directory, f"gradwatch-critical-step{step}.ckpt")
            if call_quietly("saving the checkpoint", lambda: trainer.save_checkpoint(path)):
                self.gradwatch.checkpoint_path = path
        trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._end("finished")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._end("stopped" if isinstance(exception, KeyboardInterrupt) else "failed")

    def _end(self, status: Any) -> None:
        if self.watch is not None:
            call_quietly("removing the watch", self.watch.remove)
            self.watch = None
        self.gradwatch.finish(status)


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer under a LightningOptimizer."""
    return getattr(optimizer, "_optimizer", optimizer)


def _trainer_meta(trainer: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"framework": "lightning"}
    for key in ("precision", "accumulate_grad_batches", "gradient_clip_val", "max_epochs", "max_steps",
                "world_size"):
        value = getattr(trainer, key, None)
        if value is None:
            value = getattr(getattr(trainer, "precision_plugin", None), key, None) if key == "precision" else None
        if isinstance(value, (str, int, float, bool)):
            meta[key] = value
    return meta
