"""The distribution: the wheel carries the migrations, and `make demo`'s script works end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .support.serverproc import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_the_migrations_and_db_upgrade_runs_from_it(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("gradwatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"gradwatch_service/migrations/env.py", "gradwatch_service/migrations/script.py.mako",
            "gradwatch_service/migrations/versions/0001_initial.py", "gradwatch/py.typed"} <= names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    db = tmp_path / "from-wheel.db"
    done = subprocess.run([sys.executable, "-c", "import gradwatch_service, gradwatch.cli, sys; "
                           "print(gradwatch_service.__file__); sys.exit(gradwatch.cli.main(sys.argv[1:]))",
                           "db", "upgrade", "--database-url", f"sqlite:///{db}"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(site))  # the wheel's copy ran, not the checkout's
    assert "at revision" in done.stdout and db.exists()


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
