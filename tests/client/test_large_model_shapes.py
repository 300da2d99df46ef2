"""What real large-model trouble looks like (tools/large_model_shapes.py), through the detectors as replay runs
them: a BLOOM-style grad-norm climb pages by its third step, single-step spikes of up to 15x stay warnings, a
loss-only resume jump pages within two steps, NaN from the first step pages at that step."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gradwatch.detect import DetectorConfig
from gradwatch.replay import decode_step, replay_run

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _shapes() -> ModuleType:
    spec = importlib.util.spec_from_file_location("large_model_shapes", TOOLS / "large_model_shapes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


shapes = _shapes()


def _alerts(trace: tuple[dict[str, Any], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    header, steps = trace
    return list(replay_run(header["run_id"], (decode_step(s) for s in steps), DetectorConfig()))


def _first_critical(alerts: list[dict[str, Any]]) -> dict[str, Any]:
    return next(a for a in alerts if a["severity"] == "critical")


@pytest.mark.parametrize("seed", range(5))
def test_a_grad_norm_climb_is_critical_by_its_third_step(seed: int) -> None:
    header, steps = shapes.grad_climb(seed)
    assert max(s["loss"] for s in steps[: shapes.CLIMB_AT + 3]) < 2.6  # the loss has not moved yet
    first = _first_critical(_alerts((header, steps)))
    assert first["signature"] == "grad_growth"
    assert shapes.CLIMB_AT <= first["step"] <= shapes.CLIMB_CRITICAL_BY


@pytest.mark.parametrize("seed", range(5))
def test_single_step_spikes_of_up_to_15x_are_warnings_at_most(seed: int) -> None:
    header, steps = shapes.spiky_healthy(seed)
    alerts = _alerts((header, steps))
    spikes = [a for a in alerts if a["signature"] == "grad_spike"]
    assert len(spikes) >= 20  # they are seen ...
    assert all(a["severity"] == "warning" for a in alerts)  # ... and page no one


@pytest.mark.parametrize("seed", range(3))
def test_a_loss_only_jump_that_persists_is_critical_within_two_steps(seed: int) -> None:
    header, steps = shapes.resume_jump(seed)
    assert all(s["grad_norm"] is None for s in steps)
    alerts = _alerts((header, steps))
    first = _first_critical(alerts)
    assert first["signature"] == "loss_divergence"
    assert shapes.JUMP_AT <= first["step"] <= shapes.JUMP_AT + 2
    assert all(a["step"] >= shapes.JUMP_AT for a in alerts)  # and nothing in the 2,000 quiet steps before


def test_nan_from_the_first_step_is_critical_at_that_step() -> None:
    first = _first_critical(_alerts(shapes.nan_from_start()))
    assert (first["step"], first["signature"], first["value"]) == (0, "nonfinite", "NaN")
