"""The disk spool on its own: order, bounds, resumption, torn writes, and no file per failed attempt."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradwatch._spool import Spool, SpoolFull


def body(i: int) -> dict:
    return {"batch_id": f"b{i}", "steps": [{"step": i, "loss": 1.0}]}


def test_drains_oldest_first_and_resumes_where_it_stopped(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "run", max_bytes=1 << 20)
    for i in range(5):
        spool.append(body(i))
    seen: list[str] = []

    def send_until_b2(b: dict) -> bool:
        if b["batch_id"] == "b2" and "fail" not in seen:
            seen.append("fail")
            return False
        seen.append(b["batch_id"])
        return True

    assert not spool.drain(send_until_b2)
    spool.append(body(5))
    assert spool.drain(send_until_b2)
    assert seen == ["b0", "b1", "fail", "b2", "b3", "b4", "b5"]
    assert not spool.has_pending()


def test_failed_attempts_do_not_multiply_segments(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "run", max_bytes=1 << 20)
    for attempt in range(10):
        spool.append(body(attempt))
        assert not spool.drain(lambda b: False)
    assert len(spool.segments()) == 1
    got: list[str] = []
    assert spool.drain(lambda b: got.append(b["batch_id"]) is None)
    assert got == [f"b{i}" for i in range(10)]


def test_bound_and_torn_lines(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "run", max_bytes=200)
    spool.append(body(0))
    with pytest.raises(SpoolFull):
        for i in range(1, 10):
            spool.append(body(i))
    segment = spool.segments()[0]
    with open(segment, "ab") as f:
        f.write(b'{"batch_id": "torn", "st')  # a crash in the middle of a write
    reopened = Spool(tmp_path / "run", max_bytes=200)
    got: list[str] = []
    assert reopened.drain(lambda b: got.append(b["batch_id"]) is None)
    assert got[0] == "b0" and "torn" not in got
    assert reopened.corrupt_lines == 1


def test_meta_is_written_atomically_and_only_where_asked(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "run", max_bytes=1 << 20)
    spool.write_meta({"run_id": "x"})
    assert spool.read_meta() is None  # no directory yet: a healthy run never touches the disk
    spool.write_meta({"run_id": "x"}, create=True)
    assert spool.read_meta() == {"run_id": "x"}
    spool.remove_if_empty()
    assert not (tmp_path / "run").exists()
