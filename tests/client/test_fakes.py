"""The recording stand-in behaves like the service where the client can tell."""

from __future__ import annotations

import json
import urllib.request

from ..support.fakes import Recorder


def test_recorder_stores_idempotently() -> None:
    with Recorder() as rec:
        put = urllib.request.Request(rec.url + "/v1/runs/r1", data=b"{}", method="PUT")
        assert urllib.request.urlopen(put).status == 201
        body = json.dumps({"batch_id": "b", "steps": [{"step": 0, "loss": 1.0}]}).encode()
        for _ in range(2):
            post = urllib.request.Request(rec.url + "/v1/runs/r1/steps", data=body, method="POST")
            assert urllib.request.urlopen(post).status == 200
        assert list(rec.stored("r1")) == [0]
