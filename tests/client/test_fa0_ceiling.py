"""tools/fa0_ceiling.py on a few dev traces: its statistics are the detector's own. The defaults rebuilt from them
page where the detector does; at the thresholds it reports no healthy run pages, even through the real detector;
and each threshold a hair lower makes the healthy run that set it page, at the step it names."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

from gradwatch.replay import read_trace

from ..support.traces import require_labelled_traces

TOOLS = Path(__file__).resolve().parents[2] / "tools"
# the healthy runs that set thresholds on all of dev (dev-039-rnn five of them), and three that diverge late
RUNS = ("dev-039-rnn", "dev-054-transformer", "dev-056-transformer", "dev-105-lstm", "dev-019-mlp", "dev-038-rnn",
        "dev-050-transformer")


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fa0_ceiling", TOOLS / "fa0_ceiling.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_thresholds_are_the_least_that_keep_every_healthy_run_silent(tmp_path: Path) -> None:
    labelled = require_labelled_traces()
    for run_id in RUNS:
        shutil.copy(labelled.dev / f"{run_id}.jsonl", tmp_path / f"{run_id}.jsonl")
    tool = _tool()
    out = tool.measure(str(tmp_path), str(labelled.scorer))
    assert out["defaults_mismatch"] == []
    assert out["defaults"]["defaults, the detector itself"]["healthy_paged"] == ["dev-039-rnn"]
    entry = out["sets"]["all healthy"]
    assert entry["one_threshold_each"]["false_alarm"] == 0.0
    assert entry["as_config_replayed"]["false_alarm"] == 0.0
    assert entry["as_config_mismatch"] == []
    assert entry["any_thresholds"]["false_alarm"] == 0.0
    assert entry["any_thresholds"]["by5"] >= entry["one_threshold_each"]["by5"]
    thresholds = entry["thresholds"]
    assert sum(th["set_by"] == "dev-039-rnn" for th in thresholds.values()) >= 4
    without = out["sets"]["without dev-039-rnn"]
    assert without["one_threshold_each"]["healthy_paged"] == ["dev-039-rnn"]

    ceiling = tool.ceiling_config(thresholds)
    steps = {run_id: read_trace(str(tmp_path / f"{run_id}.jsonl"))[1] for run_id in RUNS}
    for name, th in thresholds.items():
        run_id = th["set_by"]
        assert run_id is not None, name
        assert tool.detector_first_critical(steps[run_id], ceiling) is None, name
        hair = th["ceiling"] - abs(th["ceiling"]) * 1e-9
        lowered = dataclasses.replace(ceiling, **{th["field"]: hair})
        assert tool.detector_first_critical(steps[run_id], lowered) == th["at_step"], name
