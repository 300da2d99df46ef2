"""gradwatch.integrations.lightning on real Lightning training of a tiny MLP against a live gradwatch server:
the stored per-layer norms are those of the gradients the optimizer used (accumulated, unscaled, before
clipping), one record per optimizer step; a run whose learning rate explodes stops itself at the step of its
critical incident (after a checkpoint); a step AMP's scaler skipped is stored as skipped, not as an explosion."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("pytorch_lightning")

from pytorch_lightning.plugins.precision import MixedPrecision  # noqa: E402

from gradwatch.integrations.lightning import GradwatchCallback  # noqa: E402

from ..support.serverproc import ServerProcess  # noqa: E402
from ..support.stored import incidents, stored_steps  # noqa: E402

pytestmark = [
    pytest.mark.torch, pytest.mark.service,
    # Lightning's own warnings about this tiny set-up, and its use of an API torch deprecated
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*(smaller than the logging interval|GPU available|litlogger).*"),
]

FAST = {"batch_age": 0.05, "min_backoff": 0.05, "max_backoff": 0.25, "flush_timeout": 10.0}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One live server (SQLite) for the module's trainings."""
    tmp = tmp_path_factory.mktemp("lightning-server")
    proc = ServerProcess(f"sqlite:///{tmp / 'gw.db'}", log_path=tmp / "server.log")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Regression(pl.LightningModule):
    """An MLP regression that trains smoothly at lr 0.01 and diverges at 0.05 (SGD with momentum). It keeps a
    reference of what gradwatch should store: each micro-batch's loss, and in its own `on_before_optimizer_step`
    (which Lightning calls right after the callbacks', before clipping) each layer's gradient norm."""

    def __init__(self, lr: float, inf_grad_at: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                       torch.nn.ReLU(), torch.nn.Linear(64, 1))
        self.losses: list[float] = []
        self.grad_norms: dict[int, dict[str, float]] = {}
        self.scaler_skipped: list[int] = []
        self._scale: float | None = None

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def on_after_backward(self) -> None:
        if self.hparams.inf_grad_at == self.trainer.global_step:  # an fp16 overflow, as the scaler sees one
            self.net[0].weight.grad[0, 0] = math.inf

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.grad_norms[self.trainer.global_step] = {
            n: torch.linalg.vector_norm(p.grad).item() for n, p in self.named_parameters() if p.grad is not None}
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        self._scale = scaler.get_scale() if scaler is not None else None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and self._scale is not None and scaler.get_scale() < self._scale:
            self.scaler_skipped.append(self.trainer.global_step - 1)  # the scaler backs off after a skipped step

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def loader() -> Any:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 32, generator=g)
    y = x @ torch.randn(32, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)


def fit(module: Regression, callback: GradwatchCallback, tmp_path: Path, **trainer: Any) -> Any:
    t = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                   callbacks=[callback], **trainer)
    t.fit(module, loader())
    return t


def test_a_healthy_run_stores_the_accumulated_gradient_before_clipping(service: ServerProcess, tmp_path: Path
                                                                         ) -> None:
    module = Regression(lr=0.01)
    alerts: list[dict] = []
    callback = GradwatchCallback(project="lightning", name="healthy", url=service.url, spool_dir=tmp_path,
                                 on_alert=alerts.append, **FAST)
    trainer = fit(module, callback, tmp_path, max_steps=30, accumulate_grad_batches=2, gradient_clip_val=0.5)
    assert trainer.global_step == 30 and callback.run is not None and callback.run.finished
    assert not trainer.should_stop and callback.gradwatch.stopped_at is None
    steps = stored_steps(service.url, callback.run.run_id)
    assert [s["step"] for s in steps] == list(range(30))  # one record per optimizer step, not per micro-batch
    clipped = 0
    for s in steps:
        reference = module.grad_norms[s["step"]]
        assert s["layer_grad_norms"].keys() == reference.keys() and len(reference) == 6
        for name, norm in reference.items():
            assert math.isclose(s["layer_grad_norms"][name], norm, rel_tol=1e-5), (s["step"], name)
        total = math.sqrt(sum(v * v for v in reference.values()))
        assert math.isclose(s["grad_norm"], total, rel_tol=1e-5)
        clipped += total > 0.5  # these are the norms before clipping (the optimizer got at most 0.5)
        # the step's loss is the mean of its two micro-batches'
        mean = (module.losses[2 * s["step"]] + module.losses[2 * s["step"] + 1]) / 2
        assert math.isclose(s["loss"], mean, rel_tol=1e-5)
        assert s["lr"] == 0.01 and not s["skipped"]
    assert clipped > 0
    run = callback.run
    assert service_run(service, run.run_id)["config"]["lr"] == 0.01  # the module's hyper-parameters
    assert [a for a in alerts if a["severity"] == "critical"] == []


def test_an_exploding_run_stops_at_the_step_of_its_critical_after_a_checkpoint(service: ServerProcess,
                                                                              tmp_path: Path) -> None:
    module = Regression(lr=0.05)
    callback = GradwatchCallback(project="lightning", name="exploding", url=service.url, spool_dir=tmp_path,
                                 on_critical="checkpoint", **FAST)
    trainer = fit(module, callback, tmp_path, max_steps=200)
    critical = callback.gradwatch.critical
    assert critical is not None and critical["source"] == "local"
    stopped = callback.gradwatch.stopped_at
    assert stopped == critical["opened_at"] and trainer.global_step == stopped + 1  # no step trained after it
    assert stopped < 100 and math.isfinite(module.losses[-1])
    assert callback.gradwatch.checkpoint_path is not None and os.path.exists(callback.gradwatch.checkpoint_path)
    steps = stored_steps(service.url, callback.run.run_id)
    assert [s["step"] for s in steps] == list(range(stopped + 1))
    for s in steps:
        for name, norm in module.grad_norms[s["step"]].items():
            assert math.isclose(s["layer_grad_norms"][name], norm, rel_tol=1e-5)
        assert math.isclose(s["loss"], module.losses[s["step"]], rel_tol=1e-6)
    # The service, judging the same steps, opened its first critical at that same step.
    first = min((i for i in incidents(service.url, callback.run.run_id) if i["severity"] == "critical"),
                key=lambda i: i["opened_step"])
    assert first["opened_step"] == stopped
    assert service_run(service, callback.run.run_id)["status"] == "stopped"


def test_a_step_the_amp_scaler_skipped_is_stored_as_skipped(service: ServerProcess, tmp_path: Path) -> None:
    module = Regression(lr=0.01, inf_grad_at=6)
    alerts: list[dict] = []
    callback = GradwatchCallback(project="lightning", name="amp", url=service.url, spool_dir=tmp_path,
                                 on_alert=alerts.append, **FAST)
    # fp16 with a GradScaler, on the CPU (Lightning's precision="16-mixed" turns into bf16 there, with no scaler)
    amp = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = fit(module, callback, tmp_path, max_steps=12, plugins=[amp])
    assert trainer.global_step == 12 and trainer.precision_plugin.scaler is not None
    steps = {s["step"]: s for s in stored_steps(service.url, callback.run.run_id)}
    assert sorted(steps) == list(range(12))
    skipped = module.scaler_skipped  # the scaler's own first steps overflow too (its scale starts at 2^16)
    assert 6 in skipped and len(skipped) < 12
    assert [n for n, s in steps.items() if s["skipped"]] == skipped
    for n, s in steps.items():
        if n in skipped:
            assert s["layer_grad_norms"] == {} and s["grad_norm"] is None and math.isfinite(s["loss"])
        else:
            for name, norm in module.grad_norms[n].items():  # unscaled: what the optimizer used
                assert math.isclose(s["layer_grad_norms"][name], norm, rel_tol=1e-5), (n, name)
    assert [a for a in alerts if a["severity"] == "critical"] == []
    assert incidents(service.url, callback.run.run_id) == []


def service_run(service: ServerProcess, run_id: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{service.url}/v1/runs/{run_id}", timeout=10) as r:
        return json.loads(r.read())


def test_the_callback_is_a_callback_of_lightning_pytorch_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where `lightning` is installed beside `pytorch_lightning`, either Trainer takes the callback: it is an
    instance of both Callback classes (a stand-in `lightning.pytorch` here: only one is installed)."""
    import importlib
    import sys
    import types

    import gradwatch.integrations.lightning as integration

    class OtherCallback:
        pass

    fake = types.ModuleType("lightning.pytorch")
    fake.Callback = OtherCallback  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lightning", types.ModuleType("lightning"))
    monkeypatch.setitem(sys.modules, "lightning.pytorch", fake)
    try:
        reloaded = importlib.reload(integration)
        callback = reloaded.GradwatchCallback(transport=None)
        assert isinstance(callback, OtherCallback) and isinstance(callback, pl.Callback)
    finally:
        monkeypatch.undo()
        importlib.reload(integration)
    assert not issubclass(integration.GradwatchCallback, OtherCallback)
