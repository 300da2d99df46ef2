"""`gradwatch runs`, `show`, `tail`, `export` and `import` against a real server on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from ..support.databases import new_run_id
from ..support.serverproc import ServerProcess, end_process
from ..support.trace_files import LAYERS, exploding_trace, write_trace

GRADWATCH = [sys.executable, "-m", "gradwatch.cli"]


def cli(server: ServerProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GRADWATCH_URL": server.url}
    env.pop("GRADWATCH_TOKEN", None)
    token = server.headers.get("Authorization", "").removeprefix("Bearer ")
    if token:
        env["GRADWATCH_TOKEN"] = token
    done = subprocess.run([*GRADWATCH, *args], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_time(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in line.items() if k != "time"} for line in lines]


def test_export_import_export_is_exact(server: ServerProcess, tmp_path: Path) -> None:
    run_id = new_run_id("trace")
    original = exploding_trace(run_id)
    trace = write_trace(tmp_path / "in.jsonl", original)
    done = cli(server, "import", str(trace), "--project", "cli", "--batch-size", "25")
    assert f"{run_id}: {len(original) - 1} steps stored" in done.stdout
    assert "critical" in done.stdout  # the detectors saw it arrive

    first = tmp_path / "first.jsonl"
    cli(server, "export", run_id, "--out", str(first), "--page-steps", "30")
    exported = read_lines(first)
    header = exported[0]
    assert header["kind"] == "run" and header["run_id"] == run_id and header["project"] == "cli"
    assert header["family"] == "test" and header["labels"] == original[0]["labels"]
    assert header["config"] == original[0]["config"] and header["meta"] == original[0]["meta"]
    assert header["status"] == "finished"
    assert without_time(exported[1:]) == original[1:]  # every value exactly, "NaN"/"Infinity"/"-Infinity" too
    assert exported[4]["loss"] == 0.1 + 0.2 and exported[4]["lr"] == 1e-310
    assert all(isinstance(line["time"], float) for line in exported[1:])

    copy_id = new_run_id("copy")
    cli(server, "import", str(first), "--run-id", copy_id)
    second = tmp_path / "second.jsonl"
    cli(server, "export", copy_id, "--out", str(second))
    again = read_lines(second)
    assert again[0] == {**header, "run_id": copy_id}
    assert again[1:] == exported[1:]  # times included: the import sent them

    as_csv = tmp_path / "run.csv"
    cli(server, "export", copy_id, "--format", "csv", "--out", str(as_csv))
    assert as_csv.read_text().splitlines()[1].startswith("step,time,loss,lr,grad_norm,update_norm")
    csv_id = new_run_id("csv")
    cli(server, "import", str(as_csv), "--run-id", csv_id)
    third = tmp_path / "third.jsonl"
    cli(server, "export", csv_id, "--out", str(third))
    assert read_lines(third)[1:] == exported[1:]

    again_done = cli(server, "import", str(first), "--run-id", copy_id)  # the same file twice stores nothing twice
    assert f"{copy_id}: 0 steps stored, {len(original) - 1} already there" in again_done.stdout


def test_exported_trace_replays(server: ServerProcess, tmp_path: Path) -> None:
    """What export writes is a trace `gradwatch replay` (and the scorer) reads."""
    run_id = new_run_id("replay")
    cli(server, "import", str(write_trace(tmp_path / "in.jsonl", exploding_trace(run_id))))
    out = tmp_path / "out.jsonl"
    cli(server, "export", run_id, "--out", str(out))
    done = subprocess.run([*GRADWATCH, "replay", str(out)], capture_output=True, text=True, check=True)
    alerts = [json.loads(line) for line in done.stdout.splitlines()]
    assert {a["run_id"] for a in alerts} == {run_id} and any(a["severity"] == "critical" for a in alerts)


def test_runs_and_show(server: ServerProcess, tmp_path: Path) -> None:
    run_id = new_run_id("show")
    cli(server, "import", str(write_trace(tmp_path / "in.jsonl", exploding_trace(run_id))), "--project", "cli-show")
    listed = json.loads(cli(server, "runs", "--project", "cli-show", "--json").stdout)
    (summary,) = [r for r in listed["runs"] if r["run_id"] == run_id]
    assert summary["status"] == "finished" and summary["last_step"] == 80
    assert summary["loss"] == "NaN" and summary["grad_norm"] == "Infinity"
    assert summary["open_criticals"] == 0  # the run finished: that closed its incident
    table = cli(server, "runs", "--project", "cli-show").stdout
    assert run_id in table and "Infinity" in table

    shown = cli(server, "show", run_id, "--width", "40").stdout
    loss_line = next(line for line in shown.splitlines() if line.startswith("loss"))
    grad_line = next(line for line in shown.splitlines() if line.startswith("grad norm"))
    spark = grad_line[len("grad norm "):][:41]
    assert set(spark.strip()) <= set("▁▂▃▄▅▆▇█×") and "█" in spark and spark.strip().endswith("×")
    assert "▁" in loss_line and "last NaN" in loss_line
    assert "open incidents: none" in shown and "recently resolved" in shown and "(run finished)" in shown
    assert "critical grad_growth" in shown and "nonfinite (critical)" in shown  # one episode, its timeline
    as_json = json.loads(cli(server, "show", run_id, "--json").stdout)
    assert as_json["run"]["run_id"] == run_id and as_json["recent_incidents"] and not as_json["open_incidents"]
    assert as_json["series"]["grad_norm"]["values"][-1] == "Infinity"

    missing = cli(server, "show", "no-such-run", check=False)
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr


def test_tail_follows_new_steps_and_incidents(server: ServerProcess, http: httpx.Client, tmp_path: Path) -> None:
    run_id = new_run_id("tail")
    lines = exploding_trace(run_id)
    head = [lines[0], *lines[1:11]]
    cli(server, "import", str(write_trace(tmp_path / "head.jsonl", head)))
    http.put(f"/v1/runs/{run_id}", json={"status": "running"}).raise_for_status()
    env = {**os.environ, "GRADWATCH_URL": server.url, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*GRADWATCH, "tail", run_id, "-n", "3", "--interval", "0.2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        seen: list[str] = []

        def wait_for(text: str, timeout: float = 15.0) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                line = proc.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    break
                seen.append(line)
                if text in line:
                    return
            raise AssertionError(f"{text!r} not seen; tail printed {seen!r}")

        wait_for("step 9 ")
        assert any("step 7 " in line for line in seen) and not any("step 6 " in line for line in seen)  # -n 3
        body = {"layers": LAYERS, "steps": [
            {"step": s["step"], "loss": s["loss"], "grad_norm": s["grad_norm"],
             "layer_grad_norms": [s["layer_grad_norms"][n] for n in LAYERS]} for s in lines[11:]]}
        started = time.monotonic()
        http.post(f"/v1/runs/{run_id}/steps", json=body).raise_for_status()
        wait_for("step 80 ")
        wait_for("INCIDENT opened")
        assert time.monotonic() - started < 10
        http.put(f"/v1/runs/{run_id}", json={"status": "failed"}).raise_for_status()
        assert proc.wait(15) == 0  # it stops once the run does
        assert any("INCIDENT" in line and "critical" in line for line in seen + proc.stdout.readlines())
    finally:
        end_process(proc)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_the_commands_take_the_token_as_the_client_does(tmp_path: Path) -> None:
    """GRADWATCH_TOKEN (or --token) is sent as the bearer; without one a guarded service's 401 says what to set."""
    server = ServerProcess(f"sqlite:///{tmp_path / 'auth.db'}", auth=True, log_path=tmp_path / "server.log")
    with server:
        run_id = new_run_id("auth")
        cli(server, "import", str(write_trace(tmp_path / "in.jsonl", exploding_trace(run_id)[:20])))
        env = {k: v for k, v in os.environ.items() if k != "GRADWATCH_TOKEN"}
        refused = subprocess.run([*GRADWATCH, "runs", "--url", server.url], env=env, capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode == 1 and "HTTP 401" in refused.stderr and "GRADWATCH_TOKEN" in refused.stderr
        read = server.create_token("reader", ["read"])["token"]
        listed = subprocess.run([*GRADWATCH, "runs", "--url", server.url, "--json"], capture_output=True, text=True,
                                env={**env, "GRADWATCH_TOKEN": read}, timeout=60, check=True)
        assert [r["run_id"] for r in json.loads(listed.stdout)["runs"]] == [run_id]
        shown = subprocess.run([*GRADWATCH, "show", run_id, "--url", server.url, "--token", read],
                               env=env, capture_output=True, text=True, timeout=60, check=True)
        assert run_id in shown.stdout
        no_ingest = subprocess.run([*GRADWATCH, "import", str(tmp_path / "in.jsonl"), "--run-id", "other",
                                    "--url", server.url], env={**env, "GRADWATCH_TOKEN": read},
                                   capture_output=True, text=True, timeout=60)
        assert no_ingest.returncode == 1 and "HTTP 403" in no_ingest.stderr
        assert read not in refused.stderr + listed.stderr + shown.stdout + no_ingest.stderr
