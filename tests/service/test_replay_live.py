"""Detection through a live server is detection offline: large-model shapes (tools/large_model_shapes.py) ingested
batch by batch through a real server on each backend raise exactly the pages `gradwatch replay` computes
(tools/replay_live.py; docs/detection.md has the same check on the real large-model logs)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from ..support.serverproc import ServerProcess

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def test_shapes_through_a_live_server_raise_the_pages_replay_computes(server: ServerProcess, tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(TOOLS / "large_model_shapes.py"), "--out", str(tmp_path), "--seeds", "1"],
                   check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("replay_live", TOOLS / "replay_live.py")
    assert spec is not None and spec.loader is not None
    replay_live = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay_live)
    token = server.headers.get("Authorization", "").removeprefix("Bearer ") or None
    pages = 0
    for path in sorted(tmp_path.glob("*.jsonl")):
        run_id, offline, served, _ = replay_live.replay_live(server.url, str(path), 64, token)
        assert served == offline, run_id
        pages += len(served)
    assert pages >= 5  # the climb (warning, critical), the jump, the NaN, and the healthy run's spike warnings
