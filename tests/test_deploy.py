"""deploy/: the alert rules, their unit tests, the Prometheus and Alertmanager configs, checked by Prometheus'
own tools; every alert's runbook_url points at a section of docs/runbook.md that exists. Then the compose stack
and the image, without a Docker engine: the compose spec's schema, every mounted file, published ports, the
variables .env.example must name, the configs as the containers see them, Grafana's provisioning, the Dockerfile."""

from __future__ import annotations

import importlib.util
import json
import re
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InternalError, ProgrammingError

from gradwatch_service.storage import migrate
from gradwatch_service.storage.db import make_engine
from gradwatch_service.storage.models import metadata

from .support.databases import POSTGRES_ADMIN_URL, PostgresSchema, new_database_url, require_postgres
from .support.deploy_files import compose_variables, dockerfile_instructions, interpolate
from .support.prometheus import REPO, get_json, prometheus_server, require_binary
from .support.requirements import unavailable
from .support.serverproc import ServerProcess

PROMETHEUS = REPO / "deploy" / "prometheus"
COMPOSE_METRICS_TOKEN = "/run/secrets/gradwatch_metrics_token"
COMPOSE_ADMIN_TOKEN = "/run/secrets/gradwatch_admin_token"


def _tool(name: str, *args: str | Path) -> str:
    done = subprocess.run([require_binary(name), *map(str, args)], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_rules_are_valid() -> None:
    _tool("promtool", "check", "rules", PROMETHEUS / "rules.yml")


def test_rule_unit_tests_pass_and_cover_every_rule() -> None:
    tests = sorted((PROMETHEUS / "tests").glob("*.yml"))
    _tool("promtool", "test", "rules", *tests)
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", (PROMETHEUS / "rules.yml").read_text(), re.M))
    tested = "".join(t.read_text() for t in tests)
    for alert in alerts:  # each fires somewhere (exp_labels) and is asserted silent somewhere (exp_alerts: [])
        assert re.search(rf"alertname: {alert}\n\s+exp_alerts:(?! \[\])", tested), f"{alert} never fires in a test"
        assert re.search(rf"alertname: {alert}\n\s+exp_alerts: \[\]", tested), f"{alert} never stays silent"


def test_prometheus_config_is_valid(tmp_path: Path) -> None:
    """As shipped, beside its rules; promtool also reads the metrics token's file, which only the compose stack
    mounts (a secret at /run/secrets/), so the check reads a stand-in file at that one path."""
    shipped = (PROMETHEUS / "prometheus.yml").read_text()
    checked = shipped.replace(COMPOSE_METRICS_TOKEN, str(tmp_path / "metrics-token"))
    assert checked != shipped
    (tmp_path / "metrics-token").write_text("stand-in\n")
    (tmp_path / "prometheus.yml").write_text(checked)
    shutil.copy(PROMETHEUS / "rules.yml", tmp_path / "rules.yml")
    _tool("promtool", "check", "config", tmp_path / "prometheus.yml")


def test_alertmanager_config_is_valid(tmp_path: Path) -> None:
    """As shipped with amtool 0.26 or later. Debian bookworm's amtool 0.25 predates webhook `url_file` (the compose
    image is 0.28): there the file is checked with each `url_file` read as a `url`, everything else as shipped."""
    config = REPO / "deploy" / "alertmanager" / "alertmanager.yml"
    if _amtool_version() < (0, 26):
        older = tmp_path / "alertmanager.yml"
        older.write_text(re.sub(r"\burl_file: \S+", "url: http://alertmanager-webhook.invalid/", config.read_text()))
        assert older.read_text() != config.read_text()
        config = older
    _tool("amtool", "check-config", config)


def _amtool_version() -> tuple[int, ...]:
    out = _tool("amtool", "--version")
    found = re.search(r"version (\d+)\.(\d+)", out)
    assert found, out
    return tuple(int(x) for x in found.groups())


@pytest.mark.parametrize("anchor", sorted(set(re.findall(r"runbook_url: \"docs/runbook\.md#([\w-]+)\"",
                                                          (PROMETHEUS / "rules.yml").read_text()))))
def test_runbook_has_a_section_for_each_alert(anchor: str) -> None:
    headings = re.findall(r"^## (\w+)$", (REPO / "docs" / "runbook.md").read_text(), re.M)
    assert anchor in {h.lower() for h in headings}


# --- the compose stack: checked without a Docker engine ------------------------------------------------------------

COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
GRAFANA = REPO / "deploy" / "grafana"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _compose() -> dict[str, Any]:
    doc = _yaml(COMPOSE_FILE)
    assert isinstance(doc, dict)
    return doc


def _env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def _check_jsonschema(*args: str | Path) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("check_jsonschema") is None:
        unavailable("check-jsonschema", "not installed (it is in the dev extra: make venv)")
    return subprocess.run([sys.executable, "-m", "check_jsonschema", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_the_compose_file_passes_the_compose_spec_schema(tmp_path: Path) -> None:
    done = _check_jsonschema("--builtin-schema", "vendor.compose-spec", COMPOSE_FILE)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = _compose()  # the same check refuses what compose would: a misspelt key
    broken["services"]["gradwatch"]["depend_on"] = broken["services"]["gradwatch"].pop("depends_on")
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken))
    refused = _check_jsonschema("--builtin-schema", "vendor.compose-spec", tmp_path / "docker-compose.yml")
    assert refused.returncode == 1 and "depend_on" in refused.stdout + refused.stderr


def _bind_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(host path, container path) of each bind mount, short or long syntax; named volumes are left out."""
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                yield source, target
        elif volume.get("type") == "bind":
            yield volume["source"], volume["target"]


def test_every_file_the_compose_file_builds_from_or_mounts_exists() -> None:
    doc = _compose()
    checked = 0
    for name, service in doc["services"].items():
        build = service.get("build")
        if build is not None:
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file(), f"{name}: no {dockerfile} in {context}"
            checked += 1
        for source, _ in _bind_mounts(service):
            assert (REPO / source).exists(), f"{name} mounts {source}, which does not exist"
            checked += 1
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/")):
                assert volume.split(":")[0] in doc["volumes"], f"{name}: volume {volume} is not declared"
        for secret in service.get("secrets", []):
            source = doc["secrets"][secret if isinstance(secret, str) else secret["source"]]
            assert "file" not in source or (REPO / source["file"]).exists()
    assert checked >= 8


def test_every_published_port_binds_to_loopback_unless_told_otherwise() -> None:
    doc = _compose()
    published = {name: [interpolate(p, {}) for p in service.get("ports", [])]
                 for name, service in doc["services"].items()}
    assert published["postgres"] == [] and published["migrate"] == []
    for name, ports in published.items():
        for port in ports:
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
    assert interpolate(doc["services"]["grafana"]["ports"][0], {"PUBLISH_ADDRESS": "10.0.0.5"}) == "10.0.0.5:3000:3000"
    assert {p.split(":")[1] for ports in published.values() for p in ports} == {"8000", "3000", "9090", "9093"}


def test_the_migration_runs_first_and_gradwatch_waits_for_it() -> None:
    services = _compose()["services"]
    check = services["postgres"]["healthcheck"]["test"]
    assert check[:2] == ["CMD", "pg_isready"]
    # not the socket: during the first start's init scripts only a temporary, socket-only server runs
    assert check[check.index("--host") + 1] == "127.0.0.1"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["image"] == services["gradwatch"]["image"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["gradwatch"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("migrate", "gradwatch"):  # one database URL, to the compose service
        url = interpolate(services[name]["environment"]["GRADWATCH_DATABASE_URL"], _env_example())
        assert url.startswith("postgresql+psycopg://gradwatch:") and url.endswith("@postgres:5432/gradwatch")


def _secret_paths(service: dict[str, Any]) -> set[str]:
    """Where a compose service sees its secrets."""
    return {f"/run/secrets/{s if isinstance(s, str) else s.get('target', s['source'])}"
            for s in service.get("secrets", [])}


def test_the_admin_token_is_stored_before_gradwatch_starts_and_the_metrics_token_is_shared() -> None:
    services = _compose()["services"]
    bootstrap = services["admin-token"]
    assert bootstrap["image"] == services["gradwatch"]["image"]
    assert bootstrap["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["gradwatch"]["depends_on"]["admin-token"]["condition"] == "service_completed_successfully"
    command = bootstrap["command"]
    assert command[:2] == ["token", "create"] and command[command.index("--scope") + 1] == "admin"
    assert command[command.index("--token-file") + 1] == COMPOSE_ADMIN_TOKEN
    assert _secret_paths(bootstrap) == {COMPOSE_ADMIN_TOKEN}
    # gradwatch checks /metrics against the same secret Prometheus sends, and no other service sees either token
    assert services["gradwatch"]["environment"]["GRADWATCH_METRICS_TOKEN_FILE"] == COMPOSE_METRICS_TOKEN
    assert COMPOSE_METRICS_TOKEN in _secret_paths(services["gradwatch"])
    scrape = _yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"][0]
    assert scrape["authorization"]["credentials_file"] == COMPOSE_METRICS_TOKEN
    assert COMPOSE_METRICS_TOKEN in _secret_paths(services["prometheus"])
    for name, service in services.items():
        if name not in ("gradwatch", "prometheus", "admin-token"):
            assert not _secret_paths(service) & {COMPOSE_METRICS_TOKEN, COMPOSE_ADMIN_TOKEN}, name
    assert COMPOSE_ADMIN_TOKEN not in _secret_paths(services["gradwatch"])  # stored as a hash, not served from


@pytest.mark.postgres
@pytest.mark.slow
def test_the_compose_start_up_needs_tokens_and_prometheus_scrapes_with_its_secret(tmp_path: Path) -> None:
    """The stack's start-up, without Docker: the migrate and admin-token one-shots' commands on a real
    PostgreSQL, gradwatch serving all interfaces with the metrics token file, and a real Prometheus scraping it
    with the shipped scrape job (its credentials_file pointed at the same token)."""
    require_postgres()
    url, schema = new_database_url("postgres", tmp_path)
    assert schema is not None
    admin = f"gwt_{secrets.token_hex(6)}_{secrets.token_hex(32)}"  # as .env.example says to make it
    metrics = secrets.token_hex(20)
    (tmp_path / "admin-token").write_text(admin + "\n")
    (tmp_path / "metrics-token").write_text(metrics + "\n")
    services = _compose()["services"]
    command = [str(tmp_path / "admin-token") if arg == COMPOSE_ADMIN_TOKEN else arg
               for arg in services["admin-token"]["command"]]
    server = ServerProcess(url, env={"GRADWATCH_METRICS_TOKEN_FILE": str(tmp_path / "metrics-token")},
                           args=["--host", "0.0.0.0"], log_path=tmp_path / "gradwatch.log")
    prometheus = None
    try:
        server.migrate()  # `db upgrade`, the migrate one-shot
        first = subprocess.run([*server.gradwatch, *command], env=server.env, capture_output=True, text=True,
                               timeout=60)
        again = subprocess.run([*server.gradwatch, *command], env=server.env, capture_output=True, text=True,
                               timeout=60)  # every `docker compose up` runs it again
        assert first.returncode == 0 and "stored" in first.stderr, first.stderr
        assert again.returncode == 0 and "already stored" in again.stderr, again.stderr
        assert admin not in first.stdout + first.stderr + again.stdout + again.stderr
        server.start(migrate=False)
        with httpx.Client(base_url=server.url, timeout=10) as http:
            assert http.get("/readyz").status_code == 200  # the HEALTHCHECK needs no token
            assert http.get("/v1/runs").status_code == 401
            assert http.get("/metrics").status_code == 401
            bearer = {"Authorization": f"Bearer {admin}"}
            assert http.get("/v1/runs", headers=bearer).status_code == 200
            assert http.get("/metrics", headers={"Authorization": f"Bearer {metrics}"}).status_code == 200
            assert http.get("/v1/runs", headers={"Authorization": f"Bearer {metrics}"}).status_code == 401

        job = _yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"][0]
        job["authorization"]["credentials_file"] = str(tmp_path / "metrics-token")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": [job]}))
        prometheus = prometheus_server(config, tmp_path).start()
        deadline = time.monotonic() + 30
        while True:
            targets = get_json(f"{prometheus.url}/api/v1/targets")["data"]["activeTargets"]
            if targets and targets[0]["health"] == "up":
                break
            assert time.monotonic() < deadline, f"Prometheus never scraped gradwatch: {targets}"
            time.sleep(0.5)
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()
        schema.drop()


def test_env_example_names_every_variable_the_compose_file_reads() -> None:
    doc, example = _compose(), _env_example()
    assert compose_variables(doc) == set(example)  # none missing, none left over
    for source in (COMPOSE_FILE.read_text(), yaml.safe_dump(doc)):
        interpolate(source, example)  # every required variable is set by the example
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD: set POSTGRES_PASSWORD in .env"):
        interpolate(COMPOSE_FILE.read_text(), {})


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|WEBHOOK_URL")


def test_no_secret_is_committed() -> None:
    example = _env_example()
    secrets = {k for k in example if SECRET_NAME.search(k)}
    assert {"POSTGRES_PASSWORD", "GRAFANA_DB_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "GRADWATCH_ADMIN_TOKEN",
            "GRADWATCH_METRICS_TOKEN"} <= secrets
    for name in secrets - {"ALERTMANAGER_WEBHOOK_URL"}:
        assert example[name].startswith("CHANGE-ME"), f".env.example gives {name} a value that looks real"
    # the compose file and the provisioning take every secret from the environment, never a literal
    for name, service in _compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if key.endswith("_FILE"):  # a secret's file: a compose secret, mounted from .env
                assert str(value).startswith("/run/secrets/"), f"{name}: {key} is not a compose secret"
            elif SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+(:?\?[^}]*)?\}", str(value)), f"{name}: {key} is not from .env"
    for path in (GRAFANA / "provisioning").rglob("*.yml"):
        for source in _yaml(path).get("datasources", []):
            for key, value in (source.get("secureJsonData") or {}).items():
                assert re.fullmatch(r"\$__env\{\w+\}", value), f"{path.name}: {key} is written out"
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO, timeout=30)
    assert ignored.returncode == 0, ".env is not git-ignored"
    tracked = subprocess.run(["git", "ls-files", "--", ".env", "**/.env"], cwd=REPO, capture_output=True,
                             text=True, timeout=30)
    assert tracked.stdout == ""
    assert ".env" in (REPO / ".dockerignore").read_text().split()  # nor baked into the image


def _mounted_at(service: dict[str, Any], container_path: str) -> Path:
    """The repository file a service sees at `container_path`, through a bind mount of it or of a folder above it."""
    for source, target in _bind_mounts(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return REPO / source / container_path[len(target):].lstrip("/")
    raise AssertionError(f"nothing is mounted at {container_path}")


def _flag(service: dict[str, Any], flag: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in service["command"] if arg.startswith(f"--{flag}=")]
    return str(value)


def _container_port(service_name: str) -> int:
    """The port a compose service listens on inside its container: what it publishes, or its image's default."""
    defaults = {"alertmanager": 9093, "prometheus": 9090}
    ports = _compose()["services"][service_name].get("ports", [])
    return int(ports[0].rsplit(":", 1)[1]) if ports else defaults[service_name]


def test_prometheus_scrapes_the_compose_services_and_loads_the_mounted_rules() -> None:
    prometheus = _compose()["services"]["prometheus"]
    config_path = _mounted_at(prometheus, _flag(prometheus, "config.file"))
    assert config_path == PROMETHEUS / "prometheus.yml"  # the file test_prometheus_config_is_valid checks
    config = _yaml(config_path)
    services = _compose()["services"]
    targets = [t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]]
    targets += [t for am in config["alerting"]["alertmanagers"] for s in am["static_configs"] for t in s["targets"]]
    assert targets == ["gradwatch:8000", "alertmanager:9093"]
    for target in targets:
        host, port = target.split(":")
        assert host in services and int(port) == _container_port(host), target
    for rule_file in config["rule_files"]:  # relative to the config file, in the container
        container_path = str(Path(_flag(prometheus, "config.file")).parent / rule_file)
        assert _mounted_at(prometheus, container_path) == PROMETHEUS / rule_file


def test_alertmanager_reads_the_webhook_url_from_the_compose_secret() -> None:
    alertmanager = _compose()["services"]["alertmanager"]
    config_path = _mounted_at(alertmanager, _flag(alertmanager, "config.file"))
    assert config_path == REPO / "deploy" / "alertmanager" / "alertmanager.yml"
    hooks = [hook for r in _yaml(config_path)["receivers"] for hook in r.get("webhook_configs", [])]
    assert hooks and all("url" not in hook for hook in hooks)  # no URL written into the file
    secrets = {f"/run/secrets/{s if isinstance(s, str) else s.get('target', s['source'])}"
               for s in alertmanager["secrets"]}
    assert {hook["url_file"] for hook in hooks} <= secrets


def _datasources() -> list[dict[str, Any]]:
    return [s for p in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yml"))
            for s in _yaml(p)["datasources"]]


def test_grafana_data_sources_reach_the_compose_services() -> None:
    grafana = _compose()["services"]["grafana"]
    sources = {s["uid"]: s for s in _datasources()}
    assert set(sources) == {"prometheus", "gradwatch-postgres"}  # the uids dashboards use: keep them
    assert sources["prometheus"]["url"] == f"http://prometheus:{_container_port('prometheus')}"
    pg = sources["gradwatch-postgres"]
    assert pg["type"] == "grafana-postgresql-datasource" and pg["url"] == "postgres:5432"
    assert pg["jsonData"]["database"] == _compose()["services"]["postgres"]["environment"]["POSTGRES_DB"]
    for value in (pg["user"], *pg["secureJsonData"].values()):
        (variable,) = re.findall(r"\$__env\{(\w+)\}", value)
        assert variable in grafana["environment"], f"grafana's container has no {variable}"
    assert grafana["environment"]["GRAFANA_DB_USER"] == \
        _compose()["services"]["postgres"]["environment"]["GRAFANA_DB_USER"]
    assert _mounted_at(grafana, "/etc/grafana/provisioning/datasources") == GRAFANA / "provisioning" / "datasources"


def _datasource_refs(node: Any) -> Iterator[tuple[str, str | None]]:
    """(uid, type or None) of every data source a dashboard's panels, targets and variables name."""
    if isinstance(node, dict):
        source = node.get("datasource")
        if isinstance(source, dict) and isinstance(source.get("uid"), str):
            yield source["uid"], source.get("type")
        for value in node.values():
            yield from _datasource_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _datasource_refs(value)


GRAFANA_OWN_UIDS = {"grafana", "-- Grafana --", "-- Dashboard --", "-- Mixed --"}


def test_grafana_loads_the_dashboards_folder_and_its_dashboards_use_provisioned_sources() -> None:
    grafana = _compose()["services"]["grafana"]
    providers = [p for path in sorted((GRAFANA / "provisioning" / "dashboards").glob("*.yml"))
                 for p in _yaml(path)["providers"]]
    assert providers and all(p["type"] == "file" for p in providers)
    for provider in providers:
        assert _mounted_at(grafana, provider["options"]["path"]) == GRAFANA / "dashboards"
    known = {s["uid"]: s["type"] for s in _datasources()}
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        used = set(_datasource_refs(json.loads(path.read_text())))
        unknown = {uid for uid, _ in used if uid not in known and uid not in GRAFANA_OWN_UIDS and uid[:1] != "$"}
        assert not unknown, f"{path.name} uses data sources no provisioning file defines: {sorted(unknown)}"
        wrong = {(uid, kind) for uid, kind in used if uid in known and kind is not None and kind != known[uid]}
        assert not wrong, f"{path.name} names provisioned data sources with another type: {sorted(wrong)}"


# --- the image ---------------------------------------------------------------------------------------------------

DOCKERFILE = REPO / "Dockerfile"


def test_the_image_is_multi_stage_slim_non_root_and_checks_readyz() -> None:
    instructions = dockerfile_instructions(DOCKERFILE)
    stages = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    assert len(stages) == 2
    assert all(re.match(r"python:\$\{PYTHON_VERSION\}-slim\b", instructions[i].args) for i in stages)
    final = instructions[stages[-1]:]
    assert not [i for i in final if i.keyword in ("COPY", "ADD") and not i.args.startswith("--from=")], \
        "the final stage must install the wheel, not copy the source tree"
    users = [i.args for i in final if i.keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [i.keyword for i in final].index("USER") < [i.keyword for i in final].index("ENTRYPOINT")
    (health,) = [i.args for i in final if i.keyword == "HEALTHCHECK"]
    assert "/readyz" in health and "${GRADWATCH_PORT}" in health
    assert [i.args for i in final if i.keyword == "ENTRYPOINT"] == ['["gradwatch"]']
    assert [i.args for i in final if i.keyword == "CMD"] == ['["serve"]']
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    assert "GRADWATCH_HOST=0.0.0.0" in env  # all interfaces, inside the container only
    assert "GRADWATCH_WORKERS=" in env
    assert f"GRADWATCH_PORT={_container_port('gradwatch')}" in env  # what compose publishes and Prometheus scrapes


# --- Grafana's PostgreSQL login, against the real local PostgreSQL -------------------------------------------------

LOGIN_SCRIPT = REPO / "deploy" / "postgres" / "grafana-login.sh"


def _run_login_script(login: str, password: str, reader: str | None = None) -> None:
    """The init script as the postgres image runs it (POSTGRES_USER, POSTGRES_DB), pointed at the test server."""
    url = make_url(POSTGRES_ADMIN_URL)
    env = {"PATH": "/usr/bin:/bin", "PGHOST": url.host or "127.0.0.1", "PGPORT": str(url.port or 5432),
           "POSTGRES_USER": url.username or "postgres", "POSTGRES_DB": url.database or "postgres",
           "GRAFANA_DB_USER": login, "GRAFANA_DB_PASSWORD": password, **({"GRADWATCH_READER_ROLE": reader}
                                                                          if reader else {})}
    require_binary("psql")
    done = subprocess.run([str(LOGIN_SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert password not in done.stdout + done.stderr


def test_the_compose_stack_runs_the_login_script_on_first_start() -> None:
    postgres = _compose()["services"]["postgres"]
    (target,) = [t for s, t in _bind_mounts(postgres) if REPO / s == LOGIN_SCRIPT]
    assert target.startswith("/docker-entrypoint-initdb.d/") and target.endswith(".sh")
    mode = subprocess.run(["git", "ls-files", "-s", str(LOGIN_SCRIPT.relative_to(REPO))], cwd=REPO,
                          capture_output=True, text=True, timeout=30).stdout
    assert mode.startswith("100755"), "the script must be committed executable (the image runs it, not sources it)"
    assert {"GRAFANA_DB_USER", "GRAFANA_DB_PASSWORD"} <= set(postgres["environment"])


def test_grafana_login_reads_every_migrated_table_and_changes_nothing() -> None:
    """In compose's order: the init script first (the group role does not need the migration), then `gradwatch db
    upgrade`, then Grafana's login reads every table of the schema but the token hashes and is refused every
    write, twice over: its sessions are read-only, and with a read-write transaction it still has no privilege
    to write."""
    require_postgres()
    schema = PostgresSchema()
    login = f"gw_test_login_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL)
    engine = reader = None
    try:
        _run_login_script(login, "first-password")
        engine = make_engine(schema.url)
        migrate.upgrade(engine)
        reader = create_engine(make_url(schema.url).set(username=login))
        with reader.connect() as conn:
            for table in sorted(set(metadata.tables) - {"api_tokens"}):
                conn.execute(text(f'SELECT count(*) FROM "{table}"')).scalar_one()
            with pytest.raises(ProgrammingError, match="permission denied"):  # token hashes: not for dashboards
                conn.execute(text("SELECT count(*) FROM api_tokens"))
            conn.rollback()
            with pytest.raises(InternalError, match="read-only transaction"):
                conn.execute(text("INSERT INTO projects (name) VALUES ('not-allowed')"))
            conn.rollback()
            conn.execute(text("SET TRANSACTION READ WRITE"))
            with pytest.raises(ProgrammingError, match="permission denied"):
                conn.execute(text("DELETE FROM runs"))
            conn.rollback()
            conn.execute(text("SET TRANSACTION READ WRITE"))
            with pytest.raises(ProgrammingError, match="permission denied"):
                conn.execute(text("CREATE TABLE grafana_was_here (x int)"))
            conn.rollback()
        with admin.connect() as conn:
            role = conn.execute(text("SELECT rolcanlogin, rolsuper, rolcreaterole, rolpassword FROM pg_authid "
                                     "WHERE rolname = :r"), {"r": login}).one()
            assert role[:3] == (True, False, False) and role.rolpassword
            _run_login_script(login, "second-password")  # again: the same roles, a new password
            again = conn.execute(text("SELECT rolpassword FROM pg_authid WHERE rolname = :r"), {"r": login})
            assert again.scalar_one() != role.rolpassword
    finally:
        for eng in (engine, reader):
            if eng is not None:
                eng.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP ROLE IF EXISTS "{login}"'))
        admin.dispose()
        schema.drop()


def test_the_login_script_creates_the_group_role_when_no_migration_has_yet() -> None:
    require_postgres()
    login, group = f"gw_test_login_{uuid.uuid4().hex[:12]}", f"gw_test_group_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL)
    try:
        _run_login_script(login, "a-password", reader=group)
        with admin.connect() as conn:
            can_login = conn.execute(text("SELECT rolcanlogin FROM pg_roles WHERE rolname = :g"), {"g": group})
            assert can_login.scalar_one() is False
            assert conn.execute(text("SELECT pg_has_role(:l, :g, 'USAGE')"), {"l": login, "g": group}).scalar_one()
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP ROLE IF EXISTS "{login}"'))
            conn.execute(text(f'DROP ROLE IF EXISTS "{group}"'))
        admin.dispose()
