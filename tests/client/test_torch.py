"""watch() and clip_grad_norm_ on real tiny training: the numbers must equal a straightforward reference."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import gradwatch  # noqa: E402
from gradwatch._torch import Cadence  # noqa: E402
from gradwatch.wire import decode_value  # noqa: E402

from ..support.fakes import Recorder  # noqa: E402

pytestmark = pytest.mark.torch

FAST = {"batch_age": 0.05, "min_backoff": 0.05, "max_backoff": 0.2, "flush_timeout": 3.0}


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)


def layer(stored: dict, field: str, name: str) -> float | None:
    return decode_value(stored[field][name])


@pytest.fixture
def recorder() -> Recorder:
    with Recorder() as rec:
        yield rec


def test_norms_equal_a_reference_and_total_equals_torch_clip(recorder: Recorder, tmp_path: Path) -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run = gradwatch.init(url=recorder.url, spool_dir=tmp_path, **FAST)
    gradwatch.watch(model, opt, run, weight_every=1, update_every=1)
    reference = {}
    for step in range(6):
        x, y = batch(step)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: torch.linalg.vector_norm(p.grad).item() for n, p in model.named_parameters()}
        torch_total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        returned = gradwatch.clip_grad_norm_(model.parameters(), max_norm=0.1)
        assert returned.item() == torch_total.item()  # the same value torch's clip returns
        opt.step()
        updates = {n: torch.linalg.vector_norm(before[n] - p.detach()).item() for n, p in model.named_parameters()}
        weights = {n: torch.linalg.vector_norm(p.detach()).item() for n, p in model.named_parameters()}
        reference[step] = (grads, returned.item(), weights, updates)
        run.log(step, loss=loss)
    run.finish()
    stored = recorder.stored(run.run_id)
    assert sorted(stored) == list(range(6))
    for step, (grads, total, weights, updates) in reference.items():
        s = stored[step]
        assert s["grad_norm"] == total  # pre-clip total, exactly
        assert s["lr"] == 1e-2 and "loss" in s
        for name in grads:
            assert math.isclose(layer(s, "layer_grad_norms", name), grads[name], rel_tol=1e-6)
            assert math.isclose(layer(s, "layer_weight_norms", name), weights[name], rel_tol=1e-6)
            assert math.isclose(layer(s, "layer_update_norms", name), updates[name], rel_tol=1e-5, abs_tol=1e-9)
        total_update = math.sqrt(sum(v * v for v in updates.values()))
        assert math.isclose(s["update_norm"], total_update, rel_tol=1e-5)


def test_a_clip_in_another_order_or_without_a_layer_still_gives_each_layer_its_norm(
        recorder: Recorder, tmp_path: Path) -> None:
    """The clip's norms are reused by parameter, not by position: a clip over the parameters in reverse order,
    and steps where one layer got no gradient (grad None), log the same pre-clip norms as a reference."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 16), "b": torch.nn.Linear(16, 4),
                                 "unused": torch.nn.Linear(8, 4)})
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    run = gradwatch.init(url=recorder.url, spool_dir=tmp_path, **FAST)
    gradwatch.watch(model, opt, run, weight_every=0, update_every=0)
    reference = {}
    for step in range(4):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        out = model["b"](torch.tanh(model["a"](x)))
        if step % 2:
            out = out + model["unused"](x)  # its layer has a gradient on odd steps only
        loss = torch.nn.functional.mse_loss(out, y)
        loss.backward()
        with_grad = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        reference[step] = {n: torch.linalg.vector_norm(p.grad).item() for n, p in with_grad}
        total = gradwatch.clip_grad_norm_([p for _, p in with_grad][::-1], max_norm=0.05)
        reference[step]["total"] = total.item()
        opt.step()
        run.log(step, loss=loss)
    run.finish()
    stored = recorder.stored(run.run_id)
    for step, norms in reference.items():
        s = stored[step]
        assert math.isclose(s["grad_norm"], norms.pop("total"), rel_tol=1e-6)
        logged = {n: v for n, v in ((n, layer(s, "layer_grad_norms", n)) for n in s["layer_grad_norms"])
                  if v is not None}
        assert logged.keys() == norms.keys()
        for name, value in norms.items():
            assert math.isclose(logged[name], value, rel_tol=1e-6), (step, name)


@pytest.mark.parametrize("dense_steps", [20, 0])
def test_weights_and_updates_are_measured_on_every_first_step_then_every_n(
        recorder: Recorder, tmp_path: Path, dense_steps: int) -> None:
    """The detectors' first-update rules need consecutive weight and update samples at the start of a run."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = gradwatch.init(url=recorder.url, spool_dir=tmp_path, **FAST)
    gradwatch.watch(model, opt, run, start_step=5, dense_steps=dense_steps, weight_every=20, update_every=20)
    for step in range(5, 50):
        x, y = batch(step)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        run.log(step, loss=loss)
    run.finish()
    stored = recorder.stored(run.run_id)
    assert sorted(stored) == list(range(5, 50))
    with_weights = [t for t in sorted(stored) if "layer_weight_norms" in stored[t]]
    with_updates = [t for t in sorted(stored) if "update_norm" in stored[t]]
    expected = sorted({t for t in range(5, 50) if t < 5 + dense_steps or t % 20 == 0})
    assert with_weights == with_updates == expected
    assert all("layer_grad_norms" in stored[t] for t in stored)


@pytest.mark.parametrize("budget", [1.0, 1e-6])
def test_the_default_cadence_spaces_samples_by_their_measured_cost(
        recorder: Recorder, tmp_path: Path, budget: float) -> None:
    """Left to the watch, weight and update norms are sampled together, at least 20 steps apart, and further
    apart when a sample costs more than its budget of the training time (0.25 % by default)."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run = gradwatch.init(url=recorder.url, spool_dir=tmp_path, **FAST)
    w = gradwatch.watch(model, opt, run, dense_steps=3)
    w.cadence.budget = budget
    for step in range(120):
        x, y = batch(step % 7)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        run.log(step, loss=1.0)
    run.finish()
    stored = recorder.stored(run.run_id)
    with_weights = [t for t in sorted(stored) if "layer_weight_norms" in stored[t]]
    with_updates = [t for t in sorted(stored) if "update_norm" in stored[t]]
    assert with_weights == with_updates and with_weights[:3] == [0, 1, 2]
    gaps = [b - a for a, b in zip(with_weights[2:], with_weights[3:], strict=False)]
    if budget == 1.0:  # any sample fits a budget of the whole step time: as close as allowed, 20 steps
        assert gaps and all(g == 20 for g in gaps) and w.cadence.period == 20
    else:  # no sample of a tiny model costs a millionth of its step: as far apart as allowed, 500 steps
        assert gaps == [] and w.cadence.period == 500


def test_cadence_keeps_samples_within_their_budget() -> None:
    cadence = Cadence(shortest=20, longest=500, budget=0.0025)
    assert cadence.period == 20
    cadence.step_took(0.100)
    cadence.sample_took(0.010)  # a sample costs 10 % of a step: 40 steps apart keep it at 0.25 %
    assert cadence.period == 40
    cadence.sample_took(0.0001)
    assert 20 < cadence.period < 40  # running averages: one cheap sample does not undo an expensive one
    for _ in range(50):
        cadence.sample_took(0.0001)
    assert cadence.period == 20  # never closer than the shortest
    for _ in range(50):
        cadence.sample_took(10.0)
    assert cadence.period == 500  # nor further than the longest


def test_without_clipping_total_equals_get_total_norm(recorder: Recorder, tmp_path: Path) -> None:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = gradwatch.init(url=recorder.url, spool_dir=tmp_path, **FAST)
    gradwatch.watch(model, opt, run, weight_every=0, update_every=0)
    totals = []
    for step in range(3):
        x, y = batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        totals.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
        opt.step()
    run.finish()
    stored = recorder.stored(run.run_id)
    assert [stored[i]["grad_norm"] for i in range(3)] == totals
    assert "layer_weight_norms" not in stored[0] and "update_norm" not in stored[0]


def test_tensor_norms_are_torchs_norms_and_total_bit_for_bit() -> None:
    model = tiny_model()
    x, y = batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    grads[1] = grads[1].double()  # two dtypes: two groups, summed in torch's order
    for norm_type in (2.0, 1.0, math.inf):
        norms, total = gradwatch.tensor_norms(grads, norm_type)
        assert [n.item() for n in norms] == [torch.linalg.vector_norm(g, norm_type).item() for g in grads]
        assert total.item() == torch.nn.utils.get_total_norm(grads, norm_type).item()


def test_clip_matches_torch_exactly() -> None:
    a, b = tiny_model(), tiny_model()
    x, y = batch(0)
    for m in (a, b):
        torch.nn.functional.mse_loss(m(x), y).backward()
    ours = gradwatch.clip_grad_norm_(a.parameters(), 0.05)
    theirs = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
    assert ours.item() == theirs.item()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad)
    inf_norm = gradwatch.clip_grad_norm_(a.parameters(), 0.05, norm_type="inf")
    assert inf_norm.item() == torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05, norm_type="inf").item()


def test_nan_gradients_show_up_as_nan(recorder: Recorder, tmp_path: Path) -> None:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = gradwatch.init(url=recorder.url, spool_dir=tmp_path, **FAST)
    gradwatch.watch(model, opt, run, weight_every=1)
    x, y = batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    gradwatch.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    run.log(0, loss=float("nan"))
    run.finish()
    s = recorder.stored(run.run_id)[0]
    assert s["grad_norm"] == "NaN" and s["loss"] == "NaN"
    assert s["layer_grad_norms"]["0.weight"] == "NaN"
    assert isinstance(s["layer_grad_norms"]["2.weight"], float)
    assert s["layer_weight_norms"]["0.weight"] == "NaN"  # clipping by a NaN norm poisons the weights too


def test_amp_skipped_steps_are_recorded_as_skipped(recorder: Recorder, tmp_path: Path) -> None:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    run = gradwatch.init(url=recorder.url, spool_dir=tmp_path, **FAST)
    gradwatch.watch(model, opt, run, scaler=scaler)
    for step in range(4):
        x, y = batch(step)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if step == 2:
            model[2].bias.grad[0] = float("inf")  # an fp16-style overflow: the scaler skips this step
        scaler.step(opt)
        scaler.update()
        run.log(step, loss=1.0)
    run.finish()
    stored = recorder.stored(run.run_id)
    assert sorted(stored) == [0, 1, 2, 3]
    assert stored[2]["skipped"] is True and "grad_norm" not in stored[2]
    assert all(stored[i].get("skipped") is not True and "grad_norm" in stored[i] for i in (0, 1, 3))


def test_watch_on_a_disabled_run_costs_nothing(recorder: Recorder, tmp_path: Path) -> None:
    """Ranks other than 0 get a disabled run: no hooks on their optimizer, nothing sent, nothing spooled."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = gradwatch.Run("r", gradwatch.Options(url=recorder.url, spool_dir=tmp_path), {}, enabled=False)
    gradwatch.watch(model, opt, run)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    for step in range(3):
        x, y = batch(step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        gradwatch.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run.log(step, loss=1.0)
    assert run.finish().steps == 0
    assert recorder.requests == [] and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_watch_on_cuda_matches_reference_without_syncing(recorder: Recorder, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = gradwatch.init(url=recorder.url, spool_dir=tmp_path, **FAST)
    gradwatch.watch(model, opt, run, weight_every=1, update_every=1)
    expected = {}
    for step in range(5):
        x = torch.randn(32, 64, device="cuda")
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        if step == 4:
            model[2].bias.grad[0] = float("nan")
        expected[step] = {n: torch.linalg.vector_norm(p.grad).item() for n, p in model.named_parameters()}
        torch.cuda.synchronize()
        with warnings.catch_warnings():  # "a prototype feature" UserWarning
            warnings.simplefilter("ignore")
            torch.cuda.set_sync_debug_mode("error")  # any host-device sync in clip, hooks or log raises
        try:
            total = gradwatch.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            run.log(step, loss=loss)
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.cuda.set_sync_debug_mode("default")
        expected[step]["total"] = total.item()
    run.finish()
    stored = recorder.stored(run.run_id)
    assert sorted(stored) == list(range(5))
    for step, ref in expected.items():
        s = stored[step]
        if step == 4:
            assert s["grad_norm"] == "NaN" and s["layer_grad_norms"]["2.bias"] == "NaN"
            continue
        assert s["grad_norm"] == ref["total"]
        for name, value in ref.items():
            if name != "total":
                assert math.isclose(layer(s, "layer_grad_norms", name), value, rel_tol=1e-5)
        assert isinstance(s["update_norm"], float) and isinstance(s["loss"], float)


def test_a_failing_hook_never_breaks_the_step(recorder: Recorder, tmp_path: Path, monkeypatch) -> None:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = gradwatch.init(url=recorder.url, spool_dir=tmp_path, **FAST)
    w = gradwatch.watch(model, opt, run)

    def broken(parts: object) -> None:
        raise RuntimeError("bug in the instrumentation")

    monkeypatch.setattr(w, "_pack", broken)
    before = model[0].weight.detach().clone()
    x, y = batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()  # the hook fails; the step still happens
    assert not torch.equal(before, model[0].weight)
    run.log(0, loss=1.0)
    assert run.finish().lost == {"instrumentation_error": 1}

    strict = gradwatch.init(url=recorder.url, spool_dir=tmp_path, strict=True, **FAST)
    w = gradwatch.watch(model, opt, strict)
    monkeypatch.setattr(w, "_pack", broken)
    with pytest.raises(gradwatch.GradwatchError):
        opt.step()
    strict.finish()


def test_logging_a_loss_that_requires_grad_warns_nothing(recorder: Recorder, tmp_path: Path) -> None:
    """torch warns "Converting a tensor with requires_grad=True to a scalar" (a UserWarning, from
    `Tensor.__float__`) when such a tensor is read without `detach()`: the client must not print that into
    every job's log. Recorded from every thread, the sender's included."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = gradwatch.init(url=recorder.url, spool_dir=tmp_path, local_detection=True, **FAST)
    gradwatch.watch(model, opt, run)
    logged = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            x, y = batch(step)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            assert loss.requires_grad
            run.log(step, loss=loss, loss_again=loss.reshape(1))
            run.log_layers(step, update_norms={"0.weight": loss})
            logged.append(loss.item())
        run.finish()
    assert [str(w.message) for w in caught] == []
    stored = recorder.stored(run.run_id)
    assert [stored[s]["loss"] for s in range(4)] == logged
    assert [stored[s]["scalars"]["loss_again"] for s in range(4)] == logged
