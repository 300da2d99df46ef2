"""The sender on its own, through an in-memory transport: what it does with the service's answers, without
sockets (socket behaviour, keep-alive, refused and hung connections: test_delivery.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gradwatch._batch import StepBatch, encode_records
from gradwatch._options import Options
from gradwatch._spool import Spool
from gradwatch._step import StepRecord, encode_step
from gradwatch._worker import DeliveryStats, Worker
from gradwatch.wire import encode_binary_batch

from ..support.fakes import FakeService, MemoryTransport


def worker(service: FakeService, tmp_path: Path, **options: object) -> tuple[Worker, MemoryTransport]:
    opts = Options(spool_dir=tmp_path, **{"batch_age": 0.01, "min_backoff": 0.01, "max_backoff": 0.02,
                                          **options})
    transport = service  # the fake service is the in-memory transport (gradwatch.testing)
    return Worker("r1", {"project": "p"}, opts, Spool(tmp_path / "r1", 1 << 20), DeliveryStats(), transport), \
        transport


def record(step: int, **values: object) -> StepRecord:
    r = StepRecord(step, time=1000.0 + step)
    r.merge(values)
    return r


def test_a_run_the_service_lost_is_put_again(tmp_path: Path) -> None:
    service = FakeService()
    w, _ = worker(service, tmp_path)
    w.submit(record(0, loss=1.0))
    assert w.flush(5)
    service.runs.clear()  # a wiped database: the next batch gets 404
    w.submit(record(1, loss=1.0))
    assert w.flush(5)
    w.stop()
    assert [(r["method"], r["path"]) for r in service.requests] == [
        ("PUT", "/v1/runs/r1"), ("POST", "/v1/runs/r1/steps"),
        ("POST", "/v1/runs/r1/steps"), ("PUT", "/v1/runs/r1"), ("POST", "/v1/runs/r1/steps")]
    assert sorted(service.stored("r1")) == [0, 1]


def test_a_batch_too_large_is_halved_until_it_fits(tmp_path: Path) -> None:
    service = FakeService()

    def at_most_two(method: str, path: str, body: object) -> tuple[int, object, dict[str, str]] | None:
        if method == "POST" and isinstance(body, dict) and len(body["steps"]) > 2:
            return 413, {"detail": "too large"}, {}
        return None

    service.hook = at_most_two
    w, _ = worker(service, tmp_path, batch_size=8)
    for step in range(8):
        w.submit(record(step, loss=float(step)))
    assert w.flush(5)
    w.stop()
    posted = [len(r["body"]["steps"]) for r in service.requests if r["method"] == "POST"]
    assert posted == [8, 4, 2, 2, 4, 2, 2]
    assert sorted(service.stored("r1")) == list(range(8)) and w.stats.lost == {}
    batch_ids = [r["body"]["batch_id"] for r in service.requests if r["method"] == "POST"]
    assert batch_ids[1] == batch_ids[0] + ".0" and batch_ids[4] == batch_ids[0] + ".1"


def test_steps_wait_in_the_spool_while_the_service_is_unreachable(tmp_path: Path) -> None:
    service = FakeService()
    w, transport = worker(service, tmp_path)
    transport.down = True
    for step in range(5):
        w.submit(record(step, loss=float(step)))
    assert not w.flush(0.3)
    assert w.stats.spooled == 5 and service.stored("r1") == {}
    transport.down = False
    assert w.flush(5)
    w.stop()
    assert sorted(service.stored("r1")) == list(range(5)) and w.stats.spooled == 0


@pytest.mark.parametrize("layers", [[], ["a", "b"]])
def test_columns_from_records_are_what_wire_makes_of_their_json(layers: list[str]) -> None:
    """Built straight from floats (NaN stays a float), byte for byte the body of the JSON-shaped path."""
    records = [record(0, loss=math.nan, grad_norm=math.inf, lr=-math.inf, update_norm=-0.0),
               record(1, scalars={"acc": math.nan, "n": 3.0}, skipped=True),
               record(2, loss=0.5)]
    if layers:
        records[0].merge({"grad_norms": {"a": 1.0, "b": math.nan}, "weight_norms": {"b": 2.0}})
        records[2].merge({"update_norms": {"a": 5e-324}})
    body = {"batch_id": "x", "layers": layers, "steps": [encode_step(r, layers) for r in records]}
    assert encode_records(records, layers, "x") == encode_binary_batch(body)
    assert StepBatch("x", layers, records).binary() == encode_binary_batch(body)
