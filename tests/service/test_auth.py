"""Access: every route × every kind of caller answers as docs/security.md's table says, on a real server on both
databases, and never with another project's data or anybody's token.

The routes come from the live server's /openapi.json (plus /metrics, which it leaves out), so a new route is in
the matrix the day it is added; a new route that writes must be classified in `_scope_of` first.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import gradwatch

from ..support.databases import BACKENDS, new_database_url, new_run_id
from ..support.serverproc import ServerProcess, free_port

P, Q = "alpha", "beta"  # the projects: the matrix's resources are P's; a token of Q must see none of them
METRICS_TOKEN = "metrics-scrape-credential-7b1e4f"
PUBLIC = {"/healthz", "/readyz"}


@dataclass
class Secured:
    """A server with tokens, P's and Q's runs, incidents and subscriptions, and the callers of the matrix."""

    server: ServerProcess
    http: httpx.Client
    callers: dict[str, str | None]  # name -> Authorization header value (None: none sent)
    secrets: list[str]
    run_p: str = ""
    run_q: str = ""
    sub_p: int = 0
    url_q: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def admin(self) -> dict[str, str]:
        value = self.callers["admin@*"]
        assert value is not None
        return {"Authorization": value}


def _bearer(token: str) -> str:
    return f"Bearer {token}"


def _secret_part(token: str) -> str:
    """What must never be seen of a token: the whole of it, and its secret alone (gwt_<id>_<secret>)."""
    return token[len("gwt_") + 13:] if token.startswith("gwt_") else token


def _steps(nan_at: int | None = None) -> dict[str, Any]:
    return {"steps": [{"step": i, "loss": "NaN" if i == nan_at else 1.0, "grad_norm": 1.0} for i in range(5)]}


@pytest.fixture(scope="module", params=BACKENDS)
def secured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    tmp = tmp_path_factory.mktemp(f"auth-{request.param}")
    url, schema = new_database_url(request.param, tmp)
    server = ServerProcess(url, args=["--access-log"], log_path=tmp / "server.log",
                           env={"GRADWATCH_METRICS_TOKEN": METRICS_TOKEN})
    server.migrate()
    callers: dict[str, str | None] = {"none": None, "garbage": "Bearer not-a-gradwatch-token",
                                      "metrics-token": _bearer(METRICS_TOKEN)}
    secrets = [METRICS_TOKEN]
    for scope in ("ingest", "read", "admin"):
        for project in (P, None):
            token = server.create_token(f"{scope}-{project or 'all'}", [scope], project)["token"]
            callers[f"{scope}@{project or '*'}"] = _bearer(token)
            secrets.append(token)
    wrong = server.create_token("admin-q", ["admin"], Q)["token"]
    callers["admin@Q"] = _bearer(wrong)
    revoked = server.create_token("gone", ["admin"])
    secrets += [wrong, revoked["token"]]
    callers["revoked"] = _bearer(revoked["token"])
    admin_token = callers["admin@*"]
    assert admin_token is not None
    callers["bad-secret"] = admin_token[:-6] + ("AAAAAA" if not admin_token.endswith("AAAAAA") else "BBBBBB")
    server.start(migrate=False)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            s = Secured(server, http, callers, secrets)
            admin = s.admin()
            assert http.delete(f"/v1/tokens/{revoked['id']}", headers=admin).status_code == 200
            s.run_p, s.run_q = new_run_id("p"), new_run_id("q")
            for run_id, project in ((s.run_p, P), (s.run_q, Q)):
                assert http.put(f"/v1/runs/{run_id}", json={"project": project}, headers=admin).status_code == 201
                r = http.post(f"/v1/runs/{run_id}/steps", json=_steps(nan_at=2), headers=admin)
                assert r.status_code == 200 and r.json()["open_incidents"], r.text  # each project has an incident
            s.url_q = "https://hooks.example.com/only-for-beta"
            r = http.post("/v1/webhooks", json={"url": "https://hooks.example.com/alpha", "project": P}, headers=admin)
            assert r.status_code == 201, r.text
            s.sub_p = r.json()["id"]
            assert http.post("/v1/webhooks", json={"url": s.url_q, "project": Q}, headers=admin).status_code == 201
            yield s
    finally:
        server.stop()
        if schema:
            schema.drop()


# ------------------------------------------------------------------------------------------- the table

def _scope_of(method: str, path: str) -> str:
    """The scope a route needs (docs/security.md, "Who may do what")."""
    if path.startswith(("/v1/webhooks", "/v1/tokens")):
        return "admin"
    if (method, path) in {("PUT", "/v1/runs/{run_id}"), ("POST", "/v1/runs/{run_id}/steps")}:
        return "ingest"
    if method == "GET" and path.startswith("/v1/"):
        return "read"
    raise AssertionError(f"{method} {path}: a new route that writes; say which scope it needs here and in "
                         "docs/security.md")


def _caller_scopes(caller: str) -> tuple[set[str], str | None] | None:
    """(scopes, project) of a caller holding a valid token; None for one without."""
    match = re.fullmatch(r"(ingest|read|admin)@(\*|alpha|Q)", caller)
    if match is None:
        return None
    scope, project = match.groups()
    return {scope} | ({"ingest", "read"} if scope == "admin" else set()), {"*": None, "alpha": P, "Q": Q}[project]


def expected(method: str, path: str, caller: str) -> str:
    """What the caller must get: a status as text ("401"), or "ok" (2xx, or a 404 the route gives everyone: a
    delivery that does not exist)."""
    if path in PUBLIC:
        return "ok"
    if path == "/metrics":
        if caller == "metrics-token":
            return "ok"
        held = _caller_scopes(caller)
        if held is None:
            return "401"
        return "ok" if "read" in held[0] and held[1] is None else "403"
    held = _caller_scopes(caller)
    if held is None:  # no token, garbage, a wrong secret, a revoked token, the metrics token
        return "401"
    scopes, project = held
    if _scope_of(method, path) not in scopes:
        return "403"
    if path.startswith("/v1/tokens") and project is not None:
        return "403"  # tokens are all-projects admin business
    if project == Q:  # the wrong project: P's things are not there for it; making P's things is forbidden
        if (method, path) in {("PUT", "/v1/runs/{run_id}"), ("POST", "/v1/webhooks")}:
            return "403"
        if "{run_id}" in path or "{sub_id}" in path:
            return "404"
    return "ok"


def _body(method: str, path: str) -> Any:
    return {
        ("PUT", "/v1/runs/{run_id}"): {"project": P, "layers": []},
        ("POST", "/v1/runs/{run_id}/steps"): _steps(nan_at=2),
        ("POST", "/v1/webhooks"): {"url": "https://hooks.example.com/alpha-2", "project": P},
        ("PATCH", "/v1/webhooks/{sub_id}"): {"enabled": True},
        ("POST", "/v1/tokens"): {"name": "from-the-matrix", "scopes": ["read"]},
    }.get((method, path))


def _routes(http: httpx.Client) -> list[tuple[str, str]]:
    schema = http.get("/openapi.json").json()
    routes = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops if m in {"get", "put", "post",
                                                                                         "patch", "delete"}]
    return sorted(routes) + [("GET", "/metrics")]


def _fill(s: Secured, method: str, path: str) -> tuple[str, bool]:
    """The concrete path, and whether its 404 is the route's own (a delivery that does not exist) for anyone."""
    values: dict[str, str] = {"run_id": s.run_p, "sub_id": str(s.sub_p), "delivery_id": "1"}
    if method == "DELETE" and "{sub_id}" in path:  # each caller deletes one of its own
        r = s.http.post("/v1/webhooks", json={"url": "https://hooks.example.com/doomed", "project": P},
                        headers=s.admin())
        values["sub_id"] = str(r.json()["id"])
    if "{token_id}" in path:
        values["token_id"] = s.http.post("/v1/tokens", json={"name": "doomed", "scopes": ["read"]},
                                         headers=s.admin()).json()["id"]
    missing = [name for name in re.findall(r"{(\w+)}", path) if name not in values]
    assert not missing, f"{method} {path}: give the matrix a value for {missing}"
    return re.sub(r"{(\w+)}", lambda m: values[m.group(1)], path), "{delivery_id}" in path


def test_every_route_answers_every_caller_as_documented(secured: Secured) -> None:
    s = secured
    routes = _routes(s.http)
    assert ("GET", "/v1/runs") in routes and ("DELETE", "/v1/tokens/{token_id}") in routes
    wrong: list[str] = []
    for method, template in routes:
        for caller, authorization in s.callers.items():
            path, own_404 = _fill(s, method, template)
            headers = {"Authorization": authorization} if authorization else {}
            r = s.http.request(method, path, json=_body(method, template), headers=headers)
            want = expected(method, template, caller)
            ok = (r.status_code == 404) if own_404 and want == "ok" else (200 <= r.status_code < 300)
            if (want == "ok" and not ok) or (want != "ok" and str(r.status_code) != want):
                wrong.append(f"{caller:>13} {method} {template}: {r.status_code}, expected {want}: {r.text[:120]}")
            if r.status_code == 401:
                assert r.headers.get("www-authenticate") == "Bearer"
            body = r.text
            leaked = [secret[:12] for secret in s.secrets if _secret_part(secret) in body]
            assert not leaked, f"{caller} {method} {path}: a token in the answer"
            held = _caller_scopes(caller)
            foreign = [s.run_q, s.url_q] if held is not None and held[1] == P else []
            if caller == "admin@Q":
                foreign = [s.run_p, "hooks.example.com/alpha"]
                if r.status_code == 404:  # it may hear back the id it asked for, nothing else
                    body = body.replace(s.run_p, "")
            seen = [marker for marker in foreign if marker in body]
            assert not seen, f"{caller} {method} {path}: another project's {seen} in the answer"
    assert not wrong, "\n".join(wrong)


def test_a_project_token_lists_and_counts_only_its_project(secured: Secured) -> None:
    s = secured
    read_p = {"Authorization": s.callers["read@alpha"] or ""}
    runs = s.http.get("/v1/runs", headers=read_p).json()
    assert {r["project"] for r in runs["runs"]} == {P} and runs["count"] == len(runs["runs"])
    assert s.http.get("/v1/runs", params={"project": Q}, headers=read_p).json() == {"runs": [], "count": 0}
    incidents = s.http.get("/v1/incidents", headers=read_p).json()["incidents"]
    assert incidents and {i["project"] for i in incidents} == {P}
    assert s.http.get("/v1/incidents", params={"run_id": s.run_q}, headers=read_p).json()["count"] == 0
    admin_p = {"Authorization": s.callers["admin@alpha"] or ""}
    subs = s.http.get("/v1/webhooks", headers=admin_p).json()["subscriptions"]
    assert subs and {sub["project"] for sub in subs} == {P}
    # a project's token makes things in its project; the all-projects kind is not its to make
    r = s.http.post("/v1/webhooks", json={"url": "https://hooks.example.com/defaulted"}, headers=admin_p)
    assert r.status_code == 201 and r.json()["project"] == P
    r = s.http.patch(f"/v1/webhooks/{r.json()['id']}", json={"project": None}, headers=admin_p)
    assert r.status_code == 403
    ingest_p = {"Authorization": s.callers["ingest@alpha"] or ""}
    new_run = new_run_id("defaulted")
    r = s.http.put(f"/v1/runs/{new_run}", json={}, headers=ingest_p)
    assert r.status_code == 201 and r.json()["project"] == P
    r = s.http.put(f"/v1/runs/{s.run_q}", json={}, headers=ingest_p)  # Q's run id: taken, and not P's to touch
    assert r.status_code == 403
    r = s.http.post(f"/v1/runs/{s.run_q}/steps", json=_steps(), headers=ingest_p)
    assert r.status_code == 404
    assert s.http.get(f"/v1/runs/{s.run_q}", headers=s.admin()).json()["n_steps"] == 5  # nothing was added


def test_tokens_are_listed_without_secrets_and_never_logged(secured: Secured) -> None:
    s = secured
    listed = s.http.get("/v1/tokens", headers=s.admin()).json()["tokens"]
    assert {"ingest-alpha", "admin-all", "gone"} <= {t["name"] for t in listed}
    assert next(t for t in listed if t["name"] == "gone")["revoked_at"] is not None
    text = str(listed)
    assert not [secret for secret in s.secrets if _secret_part(secret) in text]
    # the matrix and this module sent every token, valid or not, many times; the log has none of them
    log = s.server.log_path.read_text(errors="replace")
    assert "GET /v1/runs" in log  # the access log is on: requests were logged, their headers were not
    for secret in s.secrets:
        assert _secret_part(secret) not in log


# ---------------------------------------------------------------------------------- replicas, binding

@pytest.mark.parametrize("backend", BACKENDS)
def test_a_revocation_holds_on_another_replica_within_a_second(backend: str, tmp_path: Path) -> None:
    url, schema = new_database_url(backend, tmp_path)
    first = ServerProcess(url, log_path=tmp_path / "a.log", auth=True)
    second = ServerProcess(url, log_path=tmp_path / "b.log")
    try:
        first.start()
        second.start(migrate=False)
        token = first.create_token("short-lived", ["read"])
        headers = {"Authorization": _bearer(token["token"])}
        with httpx.Client(timeout=30) as http:
            assert http.get(second.url + "/v1/runs", headers=headers).status_code == 200  # cached by `second`
            r = http.delete(f"{first.url}/v1/tokens/{token['id']}", headers=first.headers)
            assert r.status_code == 200 and r.json()["revoked_at"]
            revoked_at = time.monotonic()
            assert http.get(first.url + "/v1/runs", headers=headers).status_code == 401  # at once where revoked
            while http.get(second.url + "/v1/runs", headers=headers).status_code == 200:
                assert time.monotonic() - revoked_at < 5, "the other replica still takes a revoked token"
                time.sleep(0.02)
            seen_after = time.monotonic() - revoked_at
    finally:
        first.stop()
        second.stop()
        if schema:
            schema.drop()
    # GRADWATCH_AUTH_CACHE_SECONDS is 1: the rest is polling and this loaded machine's request latency
    assert seen_after < 2.5, f"revocation seen after {seen_after:.2f} s"


def test_serve_beyond_loopback_needs_a_token_or_insecure(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'bind.db'}"
    port = free_port()
    refused = ServerProcess(db, port=port, args=["--host", "0.0.0.0"], log_path=tmp_path / "refused.log")
    with pytest.raises(RuntimeError, match="exited with 1") as exc:
        refused.start()
    refused.stop()
    assert "refusing to listen on 0.0.0.0: no API token exists" in str(exc.value)
    assert "--insecure" in str(exc.value) and "gradwatch token create" in str(exc.value)

    with ServerProcess(db, port=port, args=["--host", "0.0.0.0", "--insecure"], log_path=tmp_path / "i.log") as srv:
        assert httpx.get(srv.url + "/v1/runs", timeout=30).status_code == 200  # what --insecure asked for

    token = ServerProcess(db).create_token("admin", ["admin"])
    with ServerProcess(db, port=port, args=["--host", "0.0.0.0"], log_path=tmp_path / "t.log") as srv:
        assert httpx.get(srv.url + "/v1/runs", timeout=30).status_code == 401
        headers = {"Authorization": _bearer(token["token"])}
        assert httpx.delete(f"{srv.url}/v1/tokens/{token['id']}", headers=headers, timeout=30).status_code == 200
        # no token left, yet it listens beyond loopback: it stays shut rather than fall open
        time.sleep(1.1)
        assert httpx.get(srv.url + "/v1/runs", timeout=30).status_code == 401
        assert httpx.get(srv.url + "/healthz", timeout=30).status_code == 200


# --------------------------------------------------------------------------------------------- client

def test_the_client_ingests_with_its_token_and_reports_a_refused_one(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    with ServerProcess(f"sqlite:///{tmp_path / 'client.db'}", log_path=tmp_path / "server.log", auth=True,
                       args=["--access-log"]) as srv:
        ingest = srv.create_token("trainer", ["ingest"], P)["token"]
        good = gradwatch.init(project=P, run_id=new_run_id("good"), url=srv.url, token=ingest,
                              spool_dir=tmp_path / "spool")
        for step in range(20):
            good.log(step, loss=1.0, grad_norm=0.5)
        report = good.finish(timeout=30)
        assert report.delivered == 20 and not report.spooled and report.refused is None
        stored = httpx.get(f"{srv.url}/v1/runs/{good.run_id}", headers=srv.headers, timeout=30).json()
        assert stored["project"] == P and stored["n_steps"] == 20

        bad = gradwatch.init(project=P, run_id=new_run_id("bad"), url=srv.url, token=ingest[:-4] + "xxxx",
                             spool_dir=tmp_path / "spool")
        for step in range(20):
            bad.log(step, loss=1.0, grad_norm=0.5)
        time.sleep(1.5)  # batches are sent; each is refused
        started = time.monotonic()
        report = bad.finish(timeout=20)
        finish_s = time.monotonic() - started
        log = srv.log_path.read_text()
    # kept, not lost, not retried until the flush timeout; said plainly
    assert report.delivered == 0 and report.spooled == 20 and not report.lost
    assert report.refused is not None and report.refused.startswith("401") and "GRADWATCH_TOKEN" in str(report)
    assert finish_s < 10, f"finish() took {finish_s:.1f} s with a refused token"
    assert any("check GRADWATCH_TOKEN" in r.getMessage() for r in caplog.records)
    assert log.count(f"/v1/runs/{bad.run_id}") <= 6, "the client kept retrying a refused token"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_token_made_elsewhere_is_stored_once_and_a_malformed_or_clashing_one_is_refused(
        backend: str, tmp_path: Path) -> None:
    """`gradwatch token create --token-file` (the compose stack's admin token from .env): stored as its hash,
    idempotent, and then it opens the API; a file that is not a well-made token, or an id another token holds,
    or a revoked token is refused with a message and stores nothing."""
    url, schema = new_database_url(backend, tmp_path)
    server = ServerProcess(url, log_path=tmp_path / "server.log")
    token_id = secrets.token_hex(6)
    token = f"gwt_{token_id}_{secrets.token_hex(32)}"

    def create(text: str, *extra: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "token"
        path.write_text(text)
        return subprocess.run([*server.gradwatch, "token", "create", "--name", "ops", "--scope", "admin",
                               "--token-file", str(path), *extra], env=server.env, capture_output=True, text=True,
                              timeout=60)

    def listed() -> list[dict[str, Any]]:
        done = subprocess.run([*server.gradwatch, "token", "list", "--json"], env=server.env, capture_output=True,
                              text=True, timeout=60, check=True)
        out: list[dict[str, Any]] = json.loads(done.stdout)
        return out

    try:
        server.migrate()
        for bad in ("CHANGE-ME-gradwatch-admin-token", f"gwt_{token_id}_short", f"gwt_{token_id.upper()}_{'a' * 64}",
                    f"gwt_{token_id}_{'a' * 63}!", ""):
            done = create(bad + "\n")
            assert done.returncode == 1 and "not a token this service would make" in done.stderr, (bad, done.stderr)
        assert listed() == []
        first, again = create(token + "\n"), create(token)
        assert first.returncode == 0 and "stored" in first.stderr
        assert again.returncode == 0 and "already stored" in again.stderr
        assert token not in first.stdout + first.stderr + again.stdout + again.stderr
        (row,) = listed()
        assert (row["id"], row["scopes"], row["project"]) == (token_id, ["admin"], None)
        clash = create(f"gwt_{token_id}_{secrets.token_hex(32)}")
        assert clash.returncode == 1 and "another token's" in clash.stderr
        server.start(migrate=False)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/v1/runs").status_code == 401  # a token exists: the service is closed
            assert http.get("/v1/runs", headers={"Authorization": _bearer(token)}).status_code == 200
            r = http.delete(f"/v1/tokens/{token_id}", headers={"Authorization": _bearer(token)})
            assert r.status_code == 200
        revoked = create(token)
        assert revoked.returncode == 1 and "was revoked" in revoked.stderr
        assert len(listed()) == 1
    finally:
        server.stop()
        if schema:
            schema.drop()
