"""The distribution: the wheel the image builds, installed the way the image installs it (the Dockerfile's own
commands) where nothing of the checkout can be imported, migrates, serves and stores a batch on both databases; and
`make demo`'s script works end to end."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from .support.databases import BACKENDS, new_database_url
from .support.deploy_files import marked_run
from .support.serverproc import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _not_source(root: Path) -> Callable[[str, list[str]], set[str]]:
    """What a clean clone does not have, so builds from the copy of `root` must not see (a stale build/ re-ships
    deleted modules): the image's .dockerignore, read as Docker reads it (`**/` at any depth, else from the root)."""
    anywhere, from_root = [], []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if pattern and not pattern.startswith("#"):
            (anywhere if pattern.startswith("**/") else from_root).append(pattern.removeprefix("**/"))

    def ignored(folder: str, names: list[str]) -> set[str]:
        relative = Path(folder).relative_to(root)
        return {n for n in names if any(fnmatch.fnmatch(n, p) for p in anywhere)
                or any(fnmatch.fnmatch((relative / n).as_posix(), p) for p in from_root)}
    return ignored


def _image_command(marker: str, python: list[str], paths: dict[str, Path]) -> list[str]:
    """The Dockerfile's RUN command marked `marker`, for bash here: `python -m pip` is `python` (a list), and each
    image path (/src, /dist) is this test's."""
    command = marked_run(DOCKERFILE, marker)
    assert command.startswith("python -m pip "), command
    command = shlex.join(python) + command.removeprefix("python -m pip")
    for image_path, here in paths.items():
        command = re.sub(rf"(?<![\w/]){re.escape(image_path)}\b", str(here), command)
    return ["bash", "-c", command]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel as the image's build stage builds it: its `# wheel:` command, from a copy of the sources without
    what .dockerignore keeps out, with an isolated build environment that has only `build-system.requires`."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=_not_source(ROOT))
    command = _image_command("wheel:", [sys.executable, "-m", "pip"], {"/src": source, "/dist": tmp / "dist"})
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (built,) = (tmp / "dist").glob("gradwatch-*.whl")
    return built


@pytest.fixture(scope="module")
def image_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with nothing in it, then the image's `# install:` command run into it (the wheel with its
    server and postgres extras): no editable hook, no checkout."""
    tmp = tmp_path_factory.mktemp("image")
    shutil.copytree(wheel.parent, tmp / "dist")  # the command removes its /dist when it is done
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # this venv's pip installs into the new one (no ensurepip)
    done = subprocess.run(_image_command("install:", [sys.executable, "-m", "pip", "--python", str(python)],
                                         {"/dist": tmp / "dist"}), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return python


def _source_packages() -> set[str]:
    """Every package the checkout has, under the name it is imported by."""
    roots = {"gradwatch": ROOT / "client" / "gradwatch", "gradwatch_service": ROOT / "service" / "gradwatch_service",
             "gradwatch_service.migrations": ROOT / "migrations"}
    return {".".join([name, *init.parent.relative_to(folder).parts])
            for name, folder in roots.items() for init in folder.rglob("__init__.py")}


@pytest.mark.slow
def test_the_wheel_ships_every_package_and_nothing_else(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert shipped == _source_packages()
    assert {"gradwatch/py.typed", "gradwatch_service/py.typed", "gradwatch_service/migrations/script.py.mako",
            "gradwatch_service/pages/static/run.js", "gradwatch_service/pages/static/style.css"} <= names
    assert not any(n.startswith(("tests/", "bench/", "tools/", "examples/", "deploy/")) for n in names)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_image_install_alone_migrates_serves_and_stores_a_batch(image_python: Path, backend: str,
                                                                   tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # -I: no PYTHONPATH, no user site, not even the script's folder on sys.path; run from outside the checkout
    gradwatch = [str(image_python), "-I", str(image_python.parent / "gradwatch")]
    where = subprocess.run([*gradwatch[:2], "-c", "import gradwatch, gradwatch_service; "
                            "print(gradwatch.__file__); print(gradwatch_service.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    site = image_python.parent.parent / "lib"
    assert all(Path(f).is_relative_to(site) for f in where.stdout.split()), where.stdout

    url, schema = new_database_url(backend, elsewhere)
    workers = {"sqlite": 1, "postgres": 2}[backend]  # GRADWATCH_WORKERS, as the compose stack sets it
    server = ServerProcess(url, log_path=tmp_path / "server.log", gradwatch=gradwatch, cwd=elsewhere,
                           env={"GRADWATCH_WORKERS": str(workers)})
    try:
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
            assert "wheel-1" in http.get("/").text  # the run pages and their files ship in the wheel
            assert http.get("/ui/static/run.js").status_code == 200
    finally:
        if schema:
            schema.drop()
    assert [(s["step"], s["loss"], s["layer_grad_norms"]) for s in got] == [
        (0, 1.0, [0.0]), (1, 0.5, [0.5]), (2, 1 / 3, [1.0]), (3, "NaN", ["Infinity"])]
    assert server.log_path.read_text().count("Started server process") == workers


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
    last = done.stdout.strip().splitlines()[-1]  # it ends with the exploding run's page
    assert re.search(r"http://127\.0\.0\.1:\d+/runs/\S+$", last), last
