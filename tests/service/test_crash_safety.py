"""Crash safety: real clients ingest without pause while the service is killed with SIGKILL and restarted, again and
again; afterwards nothing a client logged is missing or stored twice, each run's detector state and incidents are
a replay of its stored steps, and every incident change reached the webhook receiver.

Four runs, each a real `gradwatch.init()` client in a thread of its own: two healthy, two that explode every few
hundred steps (grad norm growing 2x a step, then NaN, then healthy again: incidents open, escalate and resolve all
the time). The kills land wherever the service happens to be: in a batch's transaction, between commit and answer,
in a webhook POST. The clients retry and spool, so every step is stored once (resends of a committed batch are
duplicates); the outbox rows commit with their incidents, so each change is delivered at least once (the receiver
de-duplicates on webhook-id, as receivers must). Bounded: KILLS kills about a second apart, then a bounded drain.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

import gradwatch
from gradwatch_service.queries import get_run_row, read_steps
from gradwatch_service.storage.db import make_engine, read_connection

from ..support.receiver import Receiver
from ..support.replay_check import assert_matches_replay, incident_events
from ..support.serverproc import ServerProcess

KILLS = 5
LAYERS = ("embed", "block0", "block1", "head")
CYCLE = 300  # an exploding run's period: healthy, 16 steps of growth, a NaN, healthy again
SERVER_ENV = {"GRADWATCH_WEBHOOK_ALLOW_PRIVATE_TARGETS": "true", "GRADWATCH_WEBHOOK_RETRY_BASE_S": "0.05",
              "GRADWATCH_WEBHOOK_RETRY_MAX_DELAY_S": "0.5", "GRADWATCH_WEBHOOK_POLL_S": "0.2",
              "GRADWATCH_WEBHOOK_TIMEOUT_S": "1"}  # a POST cut by a kill is due again after its 3 s lease
CLIENT = {"batch_size": 50, "batch_age": 0.05, "min_backoff": 0.05, "max_backoff": 0.5, "timeout": 5.0,
          "on_critical": "stop"}  # criticals are heard (should_stop), not warned about: warnings are errors here


def values(step: int, exploding: bool) -> dict[str, Any]:
    """One step's values, a pure function of the step, so the stored ones can be checked exactly."""
    g = 1.0 + 0.1 * math.sin(step)
    phase = step % CYCLE
    if exploding and CYCLE - 40 <= phase < CYCLE - 24:
        g *= 2.0 ** (phase - (CYCLE - 41))
    grads = {name: g / (k + 2) for k, name in enumerate(LAYERS)}
    if exploding and phase == CYCLE - 24:
        g, grads["block1"] = math.nan, math.inf
    return {"loss": 2.0 + 0.05 * math.sin(step / 7), "grad_norm": g, "lr": 0.01, "grads": grads,
            "weights": {name: 3.0 + k for k, name in enumerate(LAYERS)}}


class Trainer:
    """A training loop's worth of `run.log` calls, as fast as a small model would make them, until told to stop."""

    def __init__(self, url: str, spool: Path, exploding: bool, token: str | None) -> None:
        self.exploding = exploding
        self.run = gradwatch.init(project="crash", name="exploding" if exploding else "healthy", url=url,
                                  token=token, spool_dir=spool, **CLIENT)
        self.stop = threading.Event()
        self.steps = 0
        self.report: gradwatch.DeliveryReport | None = None

    def run_loop(self) -> None:
        while not self.stop.is_set():
            v = values(self.steps, self.exploding)
            self.run.log(self.steps, loss=v["loss"], grad_norm=v["grad_norm"], lr=v["lr"])
            self.run.log_layers(self.steps, grad_norms=v["grads"], weight_norms=v["weights"])
            self.steps += 1
            time.sleep(0.002)


@pytest.fixture
def crash_server(database_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(database_url, env=SERVER_ENV, log_path=tmp_path / "server.log")
    proc.start()
    yield proc
    proc.stop()


def _stored_steps(engine: Engine, run_id: str) -> list[Any]:
    with read_connection(engine) as conn:
        run = get_run_row(conn, run_id)
        assert run is not None
        assert list(run.layer_names) == list(LAYERS)
        return read_steps(conn, run.id, start=None, end=None, limit=10**9)


def _same(stored: float | None, logged: float) -> bool:
    return stored is not None and (stored == logged or (math.isnan(stored) and math.isnan(logged)))


@pytest.mark.slow
def test_sigkill_and_restart_under_ingest_loses_nothing_and_duplicates_nothing(crash_server: ServerProcess,
                                                                               tmp_path: Path) -> None:
    server = crash_server
    headers = dict(getattr(server, "headers", {}))
    token = headers.get("Authorization", "").removeprefix("Bearer ") or None
    rng = random.Random(13)
    with Receiver() as receiver:
        r = httpx.post(f"{server.url}/v1/webhooks", json={"url": receiver.url, "min_severity": "warning"},
                       headers=headers)
        assert r.status_code == 201, r.text
        trainers = [Trainer(server.url, tmp_path / "spool", exploding=k % 2 == 1, token=token) for k in range(4)]
        threads = [threading.Thread(target=t.run_loop, daemon=True) for t in trainers]
        for thread in threads:
            thread.start()
        try:
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.5, 1.5))
                server.kill()
                time.sleep(rng.uniform(0.0, 0.3))
                server.start(migrate=False)
            time.sleep(1.0)
        finally:
            for t in trainers:
                t.stop.set()
            for thread in threads:
                thread.join(10)
        reports = [t.run.finish(timeout=60) for t in trainers]

        engine = make_engine(server.database_url)
        try:
            expected: Counter[tuple[str, str, str]] = Counter()
            for trainer, report in zip(trainers, reports, strict=True):
                run_id = trainer.run.run_id
                assert report.lost == {} and report.spooled == 0, report
                assert report.steps == report.delivered == trainer.steps, report
                stored = _stored_steps(engine, run_id)
                assert [s.step for s in stored] == list(range(trainer.steps)), run_id  # each once, none missing
                for s in stored:
                    v = values(s.step, trainer.exploding)
                    assert _same(s.loss, v["loss"]) and _same(s.grad_norm, v["grad_norm"]), (run_id, s.step)
                    assert s.layer_grad_norms is not None
                    assert all(_same(x, v["grads"][name]) for x, name in zip(s.layer_grad_norms, LAYERS,
                                                                             strict=True)), (run_id, s.step)
                assert not any(s.late for s in stored)  # one sender per run, in order even through its spool
                replay = assert_matches_replay(engine, run_id)
                assert replay.steps == trainer.steps
                if trainer.exploding:
                    assert replay.signatures >= {"nonfinite", "grad_growth"}
                    assert any(i["status"] == "resolved" for i in replay.incidents)
                else:
                    assert replay.incidents == []
                expected += incident_events(run_id, replay)
            assert expected  # the exploding runs raised and resolved incidents throughout

            def received(rs: list[Any]) -> Counter[tuple[str, str, str]]:
                firsts = {r.msg_id: r for r in rs if 200 <= r.status < 300}
                out: Counter[tuple[str, str, str]] = Counter()
                for r in firsts.values():
                    body = r.json()
                    incident = body["gradwatch"]["incident"]
                    out[(incident["id"], body["status"], incident["severity"])] += 1
                return out

            receiver.wait_for(lambda rs: received(rs) == expected, timeout=60)
        finally:
            engine.dispose()
