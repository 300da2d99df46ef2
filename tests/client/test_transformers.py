"""gradwatch.integrations.transformers on a real Hugging Face Trainer training a two-layer GPT-2 built from a
config (nothing is downloaded) against a live gradwatch server: per-layer norms of the accumulated gradient
before clipping, one record per optimizer step, the step's loss; a run whose learning rate explodes stops at
the step of its critical; a NaN loss the Trainer hides from its logs is stored as NaN."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gradwatch.integrations.transformers import GradwatchCallback  # noqa: E402

from ..support.serverproc import ServerProcess  # noqa: E402
from ..support.stored import incidents, stored_steps  # noqa: E402

pytestmark = [
    pytest.mark.torch, pytest.mark.service,
    pytest.mark.filterwarnings("ignore:.*(pin_memory|loss_type=None|max_steps is given).*"),
]

FAST = {"batch_age": 0.05, "min_backoff": 0.05, "max_backoff": 0.25, "flush_timeout": 10.0}
VOCAB, LENGTH = 64, 16


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("hf-server")
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


class Sequences(torch.utils.data.Dataset):
    """Token sequences that follow a simple rule (next = previous + 1 mod vocabulary), so the model learns."""

    def __len__(self) -> int:
        return 4096

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = (torch.arange(LENGTH) + i * 7) % VOCAB
        return {"input_ids": ids, "labels": ids.clone()}


class ReferenceTrainer(transformers.Trainer):
    """The Trainer as it is, noting what gradwatch should store: each micro-batch's loss as the Trainer adds it
    up, and each layer's gradient norm just before the Trainer clips (the accumulated gradient)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.micro_losses: list[tuple[int, float]] = []
        self.grad_norms: dict[int, dict[str, float]] = {}

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.micro_losses.append((self.state.global_step, loss.item()))
        return loss

    def _clip_grad_norm(self, model: Any) -> Any:
        self.grad_norms[self.state.global_step] = {
            n: torch.linalg.vector_norm(p.grad).item() for n, p in model.named_parameters() if p.grad is not None}
        return super()._clip_grad_norm(model)


def train(tmp_path: Path, callback: GradwatchCallback, lr: float, steps: int, accumulation: int = 1,
          optim: str = "adamw_torch", max_grad_norm: float = 1.0) -> ReferenceTrainer:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=8, learning_rate=lr,
        gradient_accumulation_steps=accumulation, max_grad_norm=max_grad_norm, optim=optim,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = ReferenceTrainer(model=model, args=args, train_dataset=Sequences(), callbacks=[callback])
    trainer.train()
    return trainer


def step_losses(trainer: ReferenceTrainer) -> dict[int, float]:
    """The loss of each optimizer step as the Trainer counts it: its micro-batches' losses added up."""
    out: dict[int, float] = {}
    for step, loss in trainer.micro_losses:
        out[step] = out.get(step, 0.0) + loss
    return out


def test_a_healthy_run_stores_the_accumulated_gradient_before_clipping(service: ServerProcess, tmp_path: Path
                                                                         ) -> None:
    alerts: list[dict] = []
    callback = GradwatchCallback(project="hf", name="healthy", url=service.url, spool_dir=tmp_path,
                                 on_alert=alerts.append, **FAST)
    trainer = train(tmp_path, callback, lr=1e-3, steps=30, accumulation=2, max_grad_norm=0.5)
    assert trainer.state.global_step == 30 and callback.run is not None and callback.run.finished
    steps = stored_steps(service.url, callback.run.run_id)
    assert [s["step"] for s in steps] == list(range(30))
    losses = step_losses(trainer)
    clipped = 0
    for s in steps:
        reference = trainer.grad_norms[s["step"]]
        assert s["layer_grad_norms"].keys() == reference.keys() and len(reference) > 10
        for name, norm in reference.items():
            assert math.isclose(s["layer_grad_norms"][name], norm, rel_tol=1e-4, abs_tol=1e-9), (s["step"], name)
        total = math.sqrt(sum(v * v for v in reference.values()))
        assert math.isclose(s["grad_norm"], total, rel_tol=1e-4)
        clipped += total > 0.5
        assert math.isclose(s["loss"], losses[s["step"]], rel_tol=1e-5)
        assert s["lr"] == 1e-3 and not s["skipped"]
    assert clipped > 0
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert [a for a in alerts if a["severity"] == "critical"] == []
    config = service_run(service, callback.run.run_id)["config"]  # the TrainingArguments and the model's config
    assert config["learning_rate"] == 1e-3 and config["gradient_accumulation_steps"] == 2
    assert config["model_config"]["n_layer"] == 2


def test_an_exploding_run_stops_at_the_step_of_its_critical(service: ServerProcess, tmp_path: Path) -> None:
    callback = GradwatchCallback(project="hf", name="exploding", url=service.url, spool_dir=tmp_path,
                                 on_critical="checkpoint", **FAST)
    trainer = train(tmp_path, callback, lr=30.0, steps=200, optim="sgd", max_grad_norm=0.0)
    critical = callback.gradwatch.critical
    assert critical is not None and critical["source"] == "local"
    stopped = callback.gradwatch.stopped_at
    assert stopped == critical["opened_at"] and trainer.state.global_step == stopped + 1
    assert stopped < 100
    assert (tmp_path / "out" / f"checkpoint-{stopped + 1}").is_dir()  # saved by the Trainer before it stopped
    steps = stored_steps(service.url, callback.run.run_id)
    assert [s["step"] for s in steps] == list(range(stopped + 1))
    losses = step_losses(trainer)
    for s in steps:
        assert s["loss"] == losses[s["step"]] or math.isclose(s["loss"], losses[s["step"]], rel_tol=1e-5)
    first = min((i for i in incidents(service.url, callback.run.run_id) if i["severity"] == "critical"),
                key=lambda i: i["opened_step"])
    assert first["opened_step"] == stopped


def test_a_nan_loss_the_trainer_hides_from_its_logs_is_stored_as_nan(service: ServerProcess, tmp_path: Path
                                                                      ) -> None:
    callback = GradwatchCallback(project="hf", name="nan", url=service.url, spool_dir=tmp_path,
                                 on_critical="warn", **FAST)
    with pytest.warns(RuntimeWarning, match="critical"):
        trainer = train(tmp_path, callback, lr=1e4, steps=12, optim="sgd", max_grad_norm=0.0)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = stored_steps(service.url, callback.run.run_id)
    nan_steps = [s["step"] for s in steps if math.isnan(s["loss"])]
    assert nan_steps, "the loss never turned NaN"
    assert all(math.isfinite(v) for v in logged)  # the Trainer's own logs show none of them
    assert callback.gradwatch.stopped_at is None and trainer.state.global_step == 12


def service_run(service: ServerProcess, run_id: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{service.url}/v1/runs/{run_id}", timeout=10) as r:
        return json.loads(r.read())
