"""gradwatch for the Hugging Face `Trainer`: `Trainer(..., callbacks=[GradwatchCallback(project="gpt")])`.

Per optimizer step it records what `watch()` records for a plain loop (per-layer gradient norms, weight and
update norms on a cadence, the learning rate), the step's loss and the learning rates of the other parameter
groups; the run's config is the `TrainingArguments` and the model's config. On a critical incident training
stops at the step that raised it (`control.should_training_stop`), after the Trainer saves a checkpoint with
`on_critical="checkpoint"` (`control.should_save`).

Where the values come from. The Trainer clips the gradients before any callback event of the step, so the
gradient norms are taken at the end of the backward pass of the step's last micro-batch (an autograd callback
queued from the model's loss; the Trainer's `sync_gradients` says which micro-batch is the last): the
accumulated gradient, before clipping, divided by AMP's loss scale where a GradScaler is in use (a tensor
division: no sync). A step the scaler skipped is recorded as skipped. The loss is the model's own output,
read by a forward hook: the Trainer replaces a NaN or infinite loss by an average in its logs
(`logging_nan_inf_filter`, on by default), and gradwatch must see it as it is. A model whose output carries no
loss (a `compute_loss` of your own) still gets its gradient norms, taken at `on_pre_optimizer_step` (after
clipping, then), and no loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Unpack

import torch
from transformers import TrainerCallback

from .._options import DENSE_STEPS, CallbackOptions
from .._run import Run
from ._common import CriticalAction, Instrumented, WatchSettings, call_quietly, first_lr_groups, hyper_parameters

__all__ = ["GradwatchCallback"]


class GradwatchCallback(TrainerCallback):
    """Send a Hugging Face Trainer's per-layer gradient norms, loss and learning rates to gradwatch, and stop
    training on a critical incident.

    run: a run to log to (its `on_critical` decides whether it asks to stop); else the callback opens one when
    training begins, with project, name, config, run_id, meta and the options of `gradwatch.init` (url, token,
    spool_dir, on_alert, transport, ...), and finishes it when training ends.
    on_critical: "stop" (the default: `control.should_training_stop` in the step that raised the critical),
    "checkpoint" (`control.should_save` too: the Trainer saves a checkpoint, then stops) or "warn".
    weight_every, update_every, dense_steps: as for `gradwatch.watch`."""

    def __init__(self, run: Run | None = None, *, project: str | None = None, name: str | None = None,
                 config: Mapping[str, Any] | None = None, run_id: str | None = None,
                 meta: Mapping[str, Any] | None = None, on_critical: CriticalAction = "stop",
                 weight_every: int | None = None, update_every: int | None = None,
                 dense_steps: int = DENSE_STEPS, **options: Unpack[CallbackOptions]) -> None:
        self.gradwatch = Instrumented(run, on_critical, project, name, config, run_id, meta, options)
        self.settings = WatchSettings(weight_every, update_every, dense_steps)
        self.watch: Any = None
        self._optimizer: Any = None
        self._scaler: Any = None
        self._handle: Any = None
        self._measured = False
        self._logged_step = -1
        self._warned_no_loss = False

    @property
    def run(self) -> Run | None:
        return self.gradwatch.run

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        from .._torch import Watch

        model_config = getattr(model, "config", None)
        config = hyper_parameters(args.to_sanitized_dict() if hasattr(args, "to_sanitized_dict") else None)
        if model_config is not None and callable(getattr(model_config, "to_dict", None)):
            config["model_config"] = model_config.to_dict()
        run = self.gradwatch.open(config, {"framework": "transformers",
                                           "gradient_accumulation_steps": args.gradient_accumulation_steps,
                                           "max_grad_norm": args.max_grad_norm})
        if model is None or optimizer is None or not run.enabled:
            return
        self._optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer
        self._scaler = getattr(optimizer, "scaler", None)
        self.watch = Watch(model, self._optimizer, run, scaler=self._scaler, start_step=int(state.global_step),
                           weight_every=self.settings.weight_every, update_every=self.settings.update_every,
                           dense_steps=self.settings.dense_steps, gradients_at_step=False)
        self._logged_step = self.watch.step - 1
        self._handle = model.register_forward_hook(self._forward, with_kwargs=True)

    # -- a micro-batch -------------------------------------------------------------------------------------
    def _forward(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if self.watch is None or not module.training or not torch.is_grad_enabled():
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return
        # with num_items_in_batch the model divides by the whole step's token count: micro-batch losses add up
        self.gradwatch.add_loss(loss.detach(), mean=kwargs.get("num_items_in_batch") is None)
        loss.register_hook(self._backward_started)

    def _backward_started(self, grad: torch.Tensor) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _backward_done(self) -> None:
        """The micro-batch's gradients are all accumulated; on the step's last one, before clipping, measure."""
        from accelerate.state import GradientState

        if self.watch is not None and GradientState().sync_gradients:
            scaler = self._scaler
            scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
            self.watch.measure_gradients(scale)
            self._measured = True

    # -- an optimizer step ---------------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is not None and not self._measured:
            if not self._warned_no_loss:
                self._warned_no_loss = True
                warnings.warn("gradwatch: the model's output has no loss, so gradient norms are taken after "
                              "clipping and no loss is recorded", RuntimeWarning, stacklevel=2)
            self.watch.measure_gradients()
        self._measured = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is None:
            return
        step = self.watch.step - 1
        if step == self._logged_step:
            return
        self._logged_step = step
        run = self.gradwatch.run
        assert run is not None
        run.log(step, loss=self.gradwatch.take_loss(), **first_lr_groups(self._optimizer))
        if self.gradwatch.should_stop() and self.gradwatch.stopped_at is None:
            self.gradwatch.stopped_at = step
            control.should_training_stop = True
            if self.gradwatch.on_critical == "checkpoint":
                control.should_save = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.watch is not None:
            call_quietly("removing the watch", self.watch.remove)
            self.watch = None
        self.gradwatch.finish("finished")
