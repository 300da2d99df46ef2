"""The public surface of `gradwatch`, and what importing it costs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gradwatch
from gradwatch._options import InitOptions, Options


def test_public_surface_is_exactly_this() -> None:
    assert sorted(gradwatch.__all__) == [
        "CriticalIncident", "DENSE_STEPS", "DeliveryReport", "GradwatchError", "InitOptions", "Options", "Run",
        "Transport", "clip_grad_norm_", "init", "tensor_norms", "watch",
    ]
    for name in gradwatch.__all__:
        assert getattr(gradwatch, name) is not None
    leaked = {n for n, v in vars(gradwatch).items()
              if not n.startswith("_") and not isinstance(v, type(sys)) and n != "annotations"}
    assert leaked == set(gradwatch.__all__)


def test_testing_and_integrations_surface() -> None:
    import gradwatch.integrations
    import gradwatch.testing

    assert sorted(gradwatch.testing.__all__) == ["MemoryTransport", "Reply", "Response", "TransportError"]
    assert gradwatch.integrations.__all__ == []  # the callbacks live in submodules that import their framework


@pytest.mark.parametrize("module", ["gradwatch", "gradwatch.testing", "gradwatch.integrations"])
def test_import_loads_only_the_standard_library_and_not_torch(module: str) -> None:
    code = (
        f"import sys, json; before = set(sys.modules); import {module}; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    assert "torch" not in loaded and "numpy" not in loaded
    foreign = [m for m in loaded if m.split(".")[0] not in sys.stdlib_module_names
               and m.split(".")[0] != "gradwatch"]
    assert foreign == []


def test_init_validates_its_options(tmp_path) -> None:
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


def test_init_options_are_the_fields_of_options() -> None:
    """`InitOptions` types init's keywords for mypy; it must name every field of `Options`, with its type (a
    spool directory may also be given as a string)."""
    fields = {f.name: f.type for f in dataclasses.fields(Options)}
    typed = {name: getattr(t, "__forward_arg__", t) for name, t in InitOptions.__annotations__.items()}
    assert set(typed) == set(fields)
    for name, annotation in typed.items():
        expected = "Path | str" if name == "spool_dir" else fields[name]
        assert annotation == expected, name


def test_a_misspelled_option_is_an_error_at_the_call_and_in_mypy(tmp_path) -> None:
    with pytest.raises(TypeError, match="flush_timout"):
        gradwatch.init(flush_timout=1.0, spool_dir=tmp_path)  # type: ignore[call-arg]
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    if mypy is None:
        pytest.skip("mypy is not installed (the dev extra)")
    script = tmp_path / "typo.py"
    script.write_text(
        "import gradwatch\n"
        "gradwatch.init(flush_timout=1.0)\n"
        "gradwatch.init(batch_size='many')\n"
        "gradwatch.watch(object(), object(), gradwatch.init(), weight_evry=5)\n"
        "gradwatch.init(url='http://127.0.0.1:9', on_critical='stop', spool_dir='/tmp/x', flush_timeout=2)\n"
    )
    client = Path(gradwatch.__file__).parent.parent
    cache = client.parent / ".mypy_cache" / "test_api"  # warm after the first run: seconds, not twenty
    done = subprocess.run([mypy, "--strict", "--cache-dir", str(cache), "--follow-imports=silent", str(script)],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "MYPYPATH": str(client)})
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert [int(line.split(":")[1]) for line in errors] == [2, 3, 4], done.stdout
