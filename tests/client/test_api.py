"""The public surface of `gradwatch`, and what importing it costs."""

from __future__ import annotations

import json
import subprocess
import sys

import gradwatch


def test_public_surface_is_exactly_this() -> None:
    assert sorted(gradwatch.__all__) == [
        "CriticalIncident", "DENSE_STEPS", "DeliveryReport", "GradwatchError", "Options", "Run",
        "clip_grad_norm_", "init", "tensor_norms", "watch",
    ]
    for name in gradwatch.__all__:
        assert getattr(gradwatch, name) is not None
    leaked = {n for n, v in vars(gradwatch).items()
              if not n.startswith("_") and not isinstance(v, type(sys)) and n != "annotations"}
    assert leaked == set(gradwatch.__all__)


def test_import_loads_only_the_standard_library_and_not_torch() -> None:
    code = (
        "import sys, json; before = set(sys.modules); import gradwatch; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    assert "torch" not in loaded and "numpy" not in loaded
    foreign = [m for m in loaded if m.split(".")[0] not in sys.stdlib_module_names
               and m.split(".")[0] != "gradwatch"]
    assert foreign == []


def test_init_validates_its_options(tmp_path) -> None:
    import pytest

    with pytest.raises(ValueError, match="on_critical"):
        gradwatch.init(on_critical="explode", spool_dir=tmp_path)
    with pytest.raises(ValueError, match="run_id"):
        gradwatch.init(run_id="bad id!", spool_dir=tmp_path)
    with pytest.raises(TypeError):
        gradwatch.init(no_such_option=1, spool_dir=tmp_path)


def test_only_rank_zero_sends_by_default(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not gradwatch.init(spool_dir=tmp_path).enabled
    run = gradwatch.init(spool_dir=tmp_path, all_ranks=True, run_id="r", name="n", url="http://127.0.0.1:9")
    assert run.enabled and run.run_id == "r-rank1" and run.name == "n [rank 1]"
    run.finish(timeout=0.2)
