"""The distribution: the built wheel, installed where nothing of the checkout can be imported, migrates, serves and
stores a batch; and `make demo`'s script works end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from .support.serverproc import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
# what a clean clone does not have: builds from the copy must not see them (a stale build/ re-ships deleted modules)
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
                                    ".gradwatch")


def _build_wheel(tmp_path: Path) -> Path:
    """Build the wheel the way a fresh checkout would: from a copy of the sources, with an isolated build
    environment that has only what `build-system.requires` asks for."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                           str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("gradwatch-*.whl")
    return wheel


def _source_packages() -> set[str]:
    """Every package the checkout has, under the name it is imported by."""
    roots = {"gradwatch": ROOT / "client" / "gradwatch", "gradwatch_service": ROOT / "service" / "gradwatch_service",
             "gradwatch_service.migrations": ROOT / "migrations"}
    return {".".join([name, *init.parent.relative_to(folder).parts])
            for name, folder in roots.items() for init in folder.rglob("__init__.py")}


def _clean_venv(tmp_path: Path, wheel: Path) -> Path:
    """A virtualenv with the wheel and its `server` extra, and nothing else: no editable hook, no checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # this venv's pip installs into the new one (no ensurepip); --no-compile halves the install, imports compile
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile",
                           f"gradwatch[server] @ {wheel.as_uri()}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return python


@pytest.mark.slow
def test_the_wheel_installed_alone_migrates_serves_and_stores_a_batch(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert shipped == _source_packages()
    assert {"gradwatch/py.typed", "gradwatch_service/py.typed", "gradwatch_service/migrations/script.py.mako"} <= names
    assert not any(n.startswith(("tests/", "bench/", "tools/", "examples/")) for n in names)

    python = _clean_venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # -I: no PYTHONPATH, no user site, not even the script's folder on sys.path; run from outside the checkout
    gradwatch = [str(python), "-I", str(python.parent / "gradwatch")]
    where = subprocess.run([*gradwatch[:2], "-c", "import gradwatch, gradwatch_service; "
                            "print(gradwatch.__file__); print(gradwatch_service.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    site = python.parent.parent / "lib"
    assert all(Path(f).is_relative_to(site) for f in where.stdout.split()), where.stdout

    server = ServerProcess(f"sqlite:///{elsewhere / 'from-wheel.db'}", log_path=tmp_path / "server.log",
                           gradwatch=gradwatch, cwd=elsewhere)
    with server, httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/readyz").status_code == 200  # the schema the wheel's migrations made is current
        assert http.put("/v1/runs/wheel-1", json={"project": "packaging", "layers": ["fc"]}).status_code == 201
        steps = [{"step": i, "time": 1764000000.0 + i, "loss": 1.0 / (i + 1), "grad_norm": 2.0 ** i,
                  "layer_grad_norms": [0.5 * i]} for i in range(3)]
        steps.append({"step": 3, "time": 1764000003.0, "loss": "NaN", "layer_grad_norms": ["Infinity"]})
        r = http.post("/v1/runs/wheel-1/steps", json={"batch_id": "wheel-b1", "steps": steps})
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 4
        got = http.get("/v1/runs/wheel-1/steps").json()["steps"]
    assert [(s["step"], s["loss"], s["layer_grad_norms"]) for s in got] == [
        (0, 1.0, [0.0]), (1, 0.5, [0.5]), (2, 1 / 3, [1.0]), (3, "NaN", ["Infinity"])]


@pytest.mark.slow
@pytest.mark.torch
def test_demo_trains_against_the_service_and_reads_back_incidents(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    env = {**os.environ, "GRADWATCH_DEMO_DIR": str(tmp_path / "demo")}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--exit", "--steps", "250",
                           "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "GET /v1/runs?project=demo  ->  2 latest runs" in done.stdout
    assert "critical" in done.stdout  # the exploding run raised a critical incident
    assert (tmp_path / "demo" / "gradwatch.db").exists()
