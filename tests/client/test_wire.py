"""gradwatch.wire's binary step batches, encoded and decoded in process (the HTTP side: test_api_binary.py)."""

from __future__ import annotations

import struct

import pytest

from gradwatch.wire import (
    BINARY_MAGIC,
    MISSING_BITS,
    BinaryBodyError,
    decode_binary_batch,
    encode_binary_batch,
    split_binary_batch,
)


def test_a_batch_survives_encoding_with_every_kind_of_value() -> None:
    body = {"batch_id": "b", "layers": ["a", "b"], "steps": [
        {"step": 0, "time": 1.5, "loss": "NaN", "grad_norm": "Infinity", "lr": "-Infinity", "update_norm": -0.0,
         "layer_grad_norms": [None, 5e-324], "scalars": {"acc": "NaN"}, "skipped": True},
        {"step": 2**62, "time": 2.5, "layer_weight_norms": ["NaN", 1.0]},
    ]}
    assert decode_binary_batch(encode_binary_batch(body)) == {
        "batch_id": "b", "layers": ["a", "b"], "steps": [
            {**body["steps"][0]},
            {**body["steps"][1], "skipped": False},
        ]}


def test_only_the_columns_some_step_carries_are_sent() -> None:
    header, sections = split_binary_batch(encode_binary_batch({"steps": [{"step": 1, "loss": 0.5}, {"step": 2}]}))
    assert header == {"n": 2, "fields": ["step", "loss"]}
    assert struct.unpack("<2Q", sections["loss"])[1] == MISSING_BITS


def test_rows_must_match_the_layers() -> None:
    with pytest.raises(ValueError, match="one value per layer"):
        encode_binary_batch({"layers": ["a"], "steps": [{"step": 0, "layer_grad_norms": [1.0, 2.0]}]})


@pytest.mark.parametrize("raw", [b"", BINARY_MAGIC, BINARY_MAGIC + struct.pack("<I", 99) + b"{}",
                                 encode_binary_batch({"steps": [{"step": 0}]})[:-1],
                                 encode_binary_batch({"steps": [{"step": 0}]}) + b"\0"])
def test_framing_errors_are_binary_body_errors(raw: bytes) -> None:
    with pytest.raises(BinaryBodyError):
        split_binary_batch(raw)
