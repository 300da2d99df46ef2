"""The run and its sender against a recording HTTP server: batching, merging, retries, spool, alerts."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import pytest

import gradwatch
from gradwatch._batch import StepBatch
from gradwatch._transport import HttpTransport
from gradwatch.sync import sync_run
from gradwatch.wire import BINARY_CONTENT_TYPE

from ..support.fakes import HungServer, Recorder, closed_port

FAST = {"batch_age": 0.05, "min_backoff": 0.05, "max_backoff": 0.2, "flush_timeout": 3.0}


@pytest.fixture
def recorder() -> Recorder:
    with Recorder() as rec:
        yield rec


def start(url: str, tmp_path: Path, **options: object) -> gradwatch.Run:
    return gradwatch.init(project="p", name="n", config={"lr": 0.1}, url=url, spool_dir=tmp_path / "spool",
                          **{**FAST, **options})


@pytest.mark.parametrize("wire", ["binary", "json"])
def test_steps_arrive_once_merged_with_nonfinite_values(recorder: Recorder, tmp_path: Path, wire: str) -> None:
    run = start(recorder.url, tmp_path, wire=wire)
    for step in range(20):
        run.log(step, loss=1.0 / (step + 1), lr=0.1, acc=0.5)
        run.log_layers(step, grad_norms={"fc1.weight": 2.0, "fc1.bias": float("nan")},
                       weight_norms={"fc1.weight": 3.0})
    run.log(20, loss=float("inf"), grad_norm=float("-inf"))
    report = run.finish()

    assert report.delivered == 21 and report.lost == {} and report.spooled == 0
    methods = [r["method"] for r in recorder.requests]
    assert methods[0] == "PUT" and methods[-1] == "PUT"
    assert recorder.requests[0]["body"]["config"] == {"lr": 0.1}
    assert recorder.requests[-1]["body"]["status"] == "finished"
    if wire == "binary":  # float64 columns, not gzipped
        assert all(r["headers"].get("Content-Type") == BINARY_CONTENT_TYPE for r in recorder.posts())
        assert all("Content-Encoding" not in r["headers"] for r in recorder.posts())
    else:
        assert all(r["headers"].get("Content-Encoding") == "gzip" for r in recorder.posts())
    stored = recorder.stored(run.run_id)
    assert sorted(stored) == list(range(21))
    assert stored[3]["loss"] == 0.25 and stored[3]["scalars"] == {"acc": 0.5}
    assert stored[3]["layer_grad_norms"] == {"fc1.weight": 2.0, "fc1.bias": "NaN"}
    assert stored[3]["layer_weight_norms"] == {"fc1.weight": 3.0, "fc1.bias": None}
    assert stored[20]["loss"] == "Infinity" and stored[20]["grad_norm"] == "-Infinity"
    # One keep-alive connection (one client port) for the whole run.
    assert len({r["headers"]["x-client-port"] for r in recorder.requests}) == 1


def test_a_service_refusing_binary_gets_json_from_then_on(recorder: Recorder, tmp_path: Path) -> None:
    recorder.script = [(415, {"detail": "Content-Type must be application/json"}, {})]
    run = start(recorder.url, tmp_path, batch_size=5)
    for step in range(12):
        run.log(step, loss=float("nan") if step == 7 else 1.0)
    report = run.finish()

    assert report.delivered == 12 and report.lost == {}
    types = [r["headers"].get("Content-Type") for r in recorder.posts()]
    assert types[0] == BINARY_CONTENT_TYPE and set(types[1:]) == {"application/json"}
    assert sorted(recorder.stored(run.run_id)) == list(range(12))
    assert recorder.stored(run.run_id)[7]["loss"] == "NaN"


def test_a_batch_the_binary_form_cannot_carry_goes_as_json(recorder: Recorder) -> None:
    transport = HttpTransport(recorder.url)
    for steps in ([{"step": 2**64}], [{"step": 1, "loss": "lots"}], [{"step": 1, "loss": 0.5}]):
        transport.post_steps("/v1/runs/r/steps", StepBatch.from_body({"batch_id": "b", "steps": steps}))
    transport.close()
    types = [r["headers"].get("Content-Type") for r in recorder.posts()]
    assert types == ["application/json", "application/json", BINARY_CONTENT_TYPE]  # and binary again after


def test_accepts_numpy_scalars_and_tensors(recorder: Recorder, tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    run = start(recorder.url, tmp_path)
    run.log(0, loss=np.float32(0.5), grad_norm=torch.tensor(float("nan")), lr=np.float64(1e-3), n=np.int64(3))
    run.finish()
    step = recorder.stored(run.run_id)[0]
    assert step["loss"] == 0.5 and step["grad_norm"] == "NaN" and step["lr"] == 1e-3
    assert step["scalars"] == {"n": 3.0}


def test_a_step_is_never_split_and_a_late_update_is_counted(recorder: Recorder, tmp_path: Path) -> None:
    run = start(recorder.url, tmp_path)
    run.log(0, loss=1.0)
    run.log(1, loss=1.0)
    run.log_layers(0, grad_norms={"a": 1.0})  # one step late, as watch() reads back: still merged
    run.log(2, loss=1.0)
    run.log(3, loss=1.0)  # seals 0 and 1
    run.log(0, grad_norm=5.0)  # too late: step 0 is on its way
    report = run.finish()
    assert report.lost == {"late_step": 1}
    assert recorder.stored(run.run_id)[0]["layer_grad_norms"] == {"a": 1.0}
    assert "grad_norm" not in recorder.stored(run.run_id)[0]


def test_retry_after_is_honoured(recorder: Recorder, tmp_path: Path) -> None:
    recorder.script = [(429, {"detail": "busy"}, {"Retry-After": "0.6"}), (503, {"detail": "x"}, {})]
    run = start(recorder.url, tmp_path)
    for step in range(7):
        run.log(step, loss=1.0)  # steps 0-4 are sealed and sent by age, without a flush
    deadline = time.monotonic() + 5
    while len(recorder.stored(run.run_id)) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    report = run.finish()
    posts = recorder.posts()
    assert posts[1]["t"] - posts[0]["t"] >= 0.55  # waited as long as the 429 asked
    assert report.delivered == 7 and sorted(recorder.stored(run.run_id)) == list(range(7))
    # The resends of that batch are the same body, batch_id included, so the service can de-duplicate them.
    assert posts[0]["body"] == posts[1]["body"] == posts[2]["body"]


def test_a_503_with_retry_after_is_retried_no_sooner(recorder: Recorder, tmp_path: Path) -> None:
    """What the service answers while its database is unavailable: the steps wait (spooled) and go later."""
    recorder.script = [(503, {"detail": "database unavailable"}, {"Retry-After": "0.6"})]
    run = start(recorder.url, tmp_path)
    for step in range(7):
        run.log(step, loss=1.0)
    deadline = time.monotonic() + 5
    while len(recorder.stored(run.run_id)) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    report = run.finish()
    posts = recorder.posts()
    assert posts[1]["t"] - posts[0]["t"] >= 0.55 and posts[0]["body"] == posts[1]["body"]
    assert report.delivered == 7 and report.lost == {} and report.spooled == 0
    assert sorted(recorder.stored(run.run_id)) == list(range(7))


def test_conflicting_steps_are_counted_and_the_rest_delivered(recorder: Recorder, tmp_path: Path) -> None:
    run = start(recorder.url, tmp_path)
    run.log(0, loss=1.0)
    run.flush()
    other = gradwatch.init(url=recorder.url, run_id=run.run_id, spool_dir=tmp_path / "s2", **FAST)
    other.log(0, loss=2.0)  # the same step with another value
    other.log(1, loss=2.0)
    report = other.finish()
    assert report.lost == {"conflict": 1}
    assert recorder.stored(run.run_id)[0]["loss"] == 1.0
    assert recorder.stored(run.run_id)[1]["loss"] == 2.0
    run.finish()


def test_service_down_spools_then_delivers_when_it_returns(tmp_path: Path) -> None:
    port = closed_port()
    run = start(f"http://127.0.0.1:{port}", tmp_path)
    for step in range(50):
        run.log(step, loss=float(step))
    run.flush(0.5)
    assert run.stats.spooled > 0
    with Recorder(port) as rec:
        deadline = time.monotonic() + 5
        while len(rec.stored(run.run_id)) < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        report = run.finish()
        assert sorted(rec.stored(run.run_id)) == list(range(50))
    assert report.delivered == 50 and report.spooled == 0 and report.lost == {}
    assert not (tmp_path / "spool" / run.run_id).exists()


def test_job_ending_while_down_leaves_a_spool_that_sync_delivers(tmp_path: Path) -> None:
    port = closed_port()
    run = start(f"http://127.0.0.1:{port}", tmp_path)
    for step in range(30):
        run.log(step, loss=float(step))
    report = run.finish("failed")
    assert report.spooled == 30 and report.lost == {}
    directory = tmp_path / "spool" / run.run_id
    meta = json.loads((directory / "run.json").read_text())
    assert meta["run"]["status"] == "failed" and "token" not in json.dumps(meta)
    with Recorder(port) as rec:
        result = sync_run(directory)
        assert result.ok and result.sent == 30
        assert sorted(rec.stored(run.run_id)) == list(range(30))
        assert rec.runs[run.run_id]["status"] == "failed"
        again = sync_run(directory)  # nothing left: the directory is gone
        assert again.sent == 0
    assert not directory.exists()


def test_spool_bound_counts_lost_steps(tmp_path: Path) -> None:
    port = closed_port()
    run = start(f"http://127.0.0.1:{port}", tmp_path, spool_max_bytes=2000, batch_size=10)
    for step in range(200):
        run.log(step, loss=float(step))
    report = run.finish()
    assert report.lost.get("spool_full", 0) > 0
    assert report.spooled + report.lost["spool_full"] == 200


def test_hung_service_does_not_slow_log_and_finish_is_bounded(tmp_path: Path) -> None:
    with HungServer() as hung:
        run = start(hung.url, tmp_path, flush_timeout=0.5, timeout=30.0)
        latencies = []
        for step in range(3000):
            t0 = time.perf_counter()
            run.log(step, loss=1.0, grad_norm=2.0)
            latencies.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        report = run.finish()
        elapsed = time.perf_counter() - t0
    latencies.sort()
    assert latencies[int(0.99 * len(latencies))] < 1e-3  # generous: a shared CI core; the bench measures
    assert elapsed < 1.5
    assert report.spooled == 3000 and report.lost == {}


def test_alerts_reach_the_callback_once_and_critical_raises(recorder: Recorder, tmp_path: Path) -> None:
    recorder.incidents = [{"id": 7, "signature": "nonfinite", "severity": "critical", "layer": "fc1.weight"}]
    seen = []
    run = start(recorder.url, tmp_path, on_alert=lambda inc: seen.append(inc["id"]), on_critical="raise")
    run.log(0, loss=1.0)
    run.log(1, loss=1.0)
    run.log(2, loss=1.0)
    run.flush()
    with pytest.raises(gradwatch.CriticalIncident, match="nonfinite in fc1.weight"):
        run.log(3, loss=1.0)
    run.log(4, loss=1.0)
    run.finish()
    assert seen == [7]
    assert sorted(recorder.stored(run.run_id)) == [0, 1, 2, 3, 4]  # the step that raised is kept


def test_critical_stop_and_warn(recorder: Recorder, tmp_path: Path) -> None:
    recorder.incidents = [{"id": 1, "signature": "grad_growth", "severity": "critical"}]

    def crashing_callback(incident: dict) -> None:
        raise RuntimeError("user bug")

    run = start(recorder.url, tmp_path, on_critical="stop", on_alert=crashing_callback)
    run.log(0, loss=1.0)
    run.log(2, loss=1.0)
    run.flush()
    run.log(3, loss=1.0)
    assert run.should_stop
    run.finish()

    recorder.incidents = [{"id": 2, "signature": "grad_growth", "severity": "critical"}]
    run = start(recorder.url, tmp_path, on_critical="warn")
    run.log(0, loss=1.0)
    run.flush()
    with pytest.warns(RuntimeWarning, match="grad_growth"):
        run.log(1, loss=1.0)
    run.finish()


def test_bad_values_never_raise_unless_strict(recorder: Recorder, tmp_path: Path) -> None:
    run = start(recorder.url, tmp_path)
    run.log(0, loss="not a number")
    run.log(1, loss=1.0)
    assert run.finish().lost == {"invalid_value": 1}
    strict = start(recorder.url, tmp_path, strict=True)
    with pytest.raises(gradwatch.GradwatchError):
        strict.log(0, loss="not a number")
    strict.finish()


def test_threads_log_concurrently(recorder: Recorder, tmp_path: Path) -> None:
    run = start(recorder.url, tmp_path)

    def worker(offset: int) -> None:
        for i in range(200):
            run.log(offset + i, loss=1.0)

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = run.finish()
    # Interleaved step numbers seal each other's steps early (counted as late_step); none vanish silently.
    assert report.delivered + sum(report.lost.values()) == 800
    assert set(report.lost) <= {"late_step"}
    assert len(recorder.stored(run.run_id)) == report.delivered


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_sends_nothing(recorder: Recorder, tmp_path: Path) -> None:
    run = start(recorder.url, tmp_path)
    run.log(0, loss=1.0)
    run.flush()
    pid = os.fork()
    if pid == 0:  # the child, like a DataLoader worker: must not send, nor hang on inherited state
        try:
            for step in range(100, 110):
                run.log(step, loss=9.0)
            run.flush()
            run.finish()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    run.log(1, loss=1.0)
    run.finish()
    assert sorted(recorder.stored(run.run_id)) == [0, 1]


def test_context_manager_marks_failure(recorder: Recorder, tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), start(recorder.url, tmp_path) as run:
        run.log(0, loss=1.0)
        1 / 0  # noqa: B018
    assert recorder.runs[run.run_id]["status"] == "failed"
    assert math.isclose(recorder.stored(run.run_id)[0]["loss"], 1.0)
