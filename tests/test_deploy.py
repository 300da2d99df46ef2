"""deploy/: the alert rules, their unit tests, the Prometheus and Alertmanager configs, checked by Prometheus'
own tools; every alert's runbook_url points at a section of docs/runbook.md that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from .support.prometheus import REPO, require_binary

PROMETHEUS = REPO / "deploy" / "prometheus"


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


def test_prometheus_config_is_valid() -> None:
    _tool("promtool", "check", "config", PROMETHEUS / "prometheus.yml")


def test_alertmanager_config_is_valid() -> None:
    _tool("amtool", "check-config", REPO / "deploy" / "alertmanager" / "alertmanager.yml")


@pytest.mark.parametrize("anchor", sorted(set(re.findall(r"runbook_url: \"docs/runbook\.md#([\w-]+)\"",
                                                          (PROMETHEUS / "rules.yml").read_text()))))
def test_runbook_has_a_section_for_each_alert(anchor: str) -> None:
    headings = re.findall(r"^## (\w+)$", (REPO / "docs" / "runbook.md").read_text(), re.M)
    assert anchor in {h.lower() for h in headings}
