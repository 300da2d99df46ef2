"""`gradwatch replay` end to end: trace files in, alert lines the trace scorer accepts out."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch import cli
from gradwatch.replay import read_trace

from ..support.traces import require_labelled_traces

# two real runs: one that blows up in its first update, one healthy run with warnings on the way
REAL_RUNS = ("dev-085-cnn", "dev-001-mlp")


def write_trace(path: Path, run_id: str, steps: list[dict[str, object]]) -> None:
    header = {"kind": "run", "run_id": run_id, "family": "synthetic",
              "labels": {"outcome": "diverged", "diverged_at": len(steps) - 1, "nonfinite_at": len(steps) - 1}}
    lines = [json.dumps(header)] + [json.dumps({"kind": "step", **s}) for s in steps]
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def synthetic_steps(n: int) -> list[dict[str, object]]:
    steps: list[dict[str, object]] = [
        {"step": t, "loss": 2.0, "lr": 0.1, "grad_norm": 1.0 + 0.1 * math.sin(t), "update_norm": 0.01,
         "layer_grad_norms": {"a.weight": 0.7, "b.weight": 0.7},
         "layer_weight_norms": {"a.weight": 5.0, "b.weight": 5.0}}
        for t in range(n)
    ]
    steps.append({"step": n, "loss": "NaN", "lr": 0.1, "grad_norm": "Infinity", "update_norm": "NaN",
                  "layer_grad_norms": {"a.weight": "Infinity", "b.weight": 0.7},
                  "layer_weight_norms": {"a.weight": 5.0, "b.weight": 5.0}})
    return steps


def replay(traces: Path, out: Path) -> list[dict[str, object]]:
    assert cli.main(["replay", str(traces), "--out", str(out)]) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_replay_reads_plain_and_gzip_traces_and_decodes_nonfinite_strings(tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    traces.mkdir()
    write_trace(traces / "syn-plain.jsonl", "syn-plain", synthetic_steps(30))
    write_trace(traces / "syn-gz.jsonl.gz", "syn-gz", synthetic_steps(40))
    (traces / "notes.txt").write_text("not a trace")

    alerts = replay(traces, tmp_path / "alerts.jsonl")

    assert [(a["run_id"], a["step"], a["severity"], a["signature"], a["layer"]) for a in alerts] == [
        ("syn-gz", 40, "critical", "nonfinite", "a.weight"),
        ("syn-plain", 30, "critical", "nonfinite", "a.weight"),
    ]
    assert alerts[0]["value"] in ("NaN", "Infinity")


def test_read_trace_without_header_names_the_run_after_the_file(tmp_path: Path) -> None:
    path = tmp_path / "my-run.jsonl"
    path.write_text(json.dumps({"step": 0, "loss": "Infinity", "grad_norm": 1.0}) + "\n")
    run_id, steps = read_trace(str(path))
    assert run_id == "my-run"
    assert steps[0]["loss"] == math.inf


def test_a_malformed_trace_is_an_error_naming_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n" + json.dumps({"step": 1, "loss": "lots"}) + "\n")
    assert cli.main(["replay", str(path), "--out", str(tmp_path / "a.jsonl")]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_replay_on_real_dev_traces_writes_lines_the_scorer_accepts(tmp_path: Path) -> None:
    labelled = require_labelled_traces()
    traces = tmp_path / "traces"
    traces.mkdir()
    for run_id in REAL_RUNS:
        shutil.copy(labelled.dev / f"{run_id}.jsonl", traces / f"{run_id}.jsonl")
    out = tmp_path / "alerts.jsonl"

    alerts = replay(traces, out)

    assert alerts, "the two runs should raise at least one alert"
    for a in alerts:
        assert a["run_id"] in REAL_RUNS
        assert isinstance(a["step"], int) and a["severity"] in ("critical", "warning")
    first = {a["run_id"]: a for a in reversed(alerts) if a["severity"] == "critical"}
    # dev-085-cnn blows up in its first update: only step 0 can warn, and it does
    assert first["dev-085-cnn"]["step"] == 0
    assert first["dev-085-cnn"]["signature"] == "update_ratio"
    assert "dev-001-mlp" not in first  # healthy: warnings at most

    result = subprocess.run([sys.executable, str(labelled.scorer), str(traces), str(out), "--json"],
                            capture_output=True, text=True, check=True, timeout=60)
    scored = json.loads(result.stdout)["results"][0]["all"]
    assert scored["early_detected"] == 1
    assert scored["false_alarms"] == 0


def test_set_overrides_one_setting_and_rejects_unknown_ones(tmp_path: Path) -> None:
    from gradwatch.replay import config_with

    assert config_with(["growth_steps=2", "loss_factor=2.5"]).growth_steps == 2
    assert config_with(["loss_factor=2.5"]).loss_factor == 2.5
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        config_with(["no_such_setting=1"])
    with pytest.raises(ValueError, match="takes a int"):
        config_with(["growth_steps=two"])
    trace = tmp_path / "t.jsonl"
    write_trace(trace, "t", synthetic_steps(5))
    assert cli.main(["replay", str(trace), "--set", "bogus=1"]) == 2


def test_every_event_writes_each_step_that_fires_not_only_openings(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    steps = synthetic_steps(30)[:-1]
    steps += [{"step": t, "loss": "Infinity", "grad_norm": 1.0} for t in (30, 31, 32)]
    write_trace(trace, "t", steps)
    openings = replay(trace, tmp_path / "a.jsonl")
    assert cli.main(["replay", str(trace), "--every-event", "--out", str(tmp_path / "e.jsonl")]) == 0
    events = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [(a["step"], a["signature"]) for a in openings] == [(30, "nonfinite")]
    assert [(e["step"], e["signature"]) for e in events] == [(30, "nonfinite"), (31, "nonfinite"), (32, "nonfinite")]
