"""The shipped alert rules and dashboard: valid for real Prometheus tooling, and naming only
metrics smtp-guard actually exports (a renamed metric must not silently blind an alert)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from smtp_guard.metrics import Metrics

CONFIG = Path(__file__).resolve().parent.parent / "config"
RULES = CONFIG / "prometheus" / "smtp-guard-rules.yml"
RULE_TESTS = CONFIG / "prometheus" / "smtp-guard-rules.test.yml"
DASHBOARD = CONFIG / "grafana-dashboard.json"
_METRIC = re.compile(r"\bsmtp_guard_[a-z_]+")


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing; .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


def _exported() -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {family.name + suffix for family in Metrics().registry.collect()
            for suffix in suffixes.get(family.type, ("",))}


@pytest.mark.parametrize("command", [["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]])
def test_promtool_accepts_and_unit_tests_the_rules(command: list[str]) -> None:
    result = subprocess.run([_promtool(), *command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_and_dashboard_name_only_exported_metrics() -> None:
    exported = _exported()
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set(_METRIC.findall(RULES.read_text())) | {m for e in expressions for m in _METRIC.findall(e)}
    assert used, "no smtp_guard_ metric referenced"
    assert sorted(used - exported) == []


def test_every_exported_metric_is_on_the_dashboard_or_in_an_alert() -> None:
    dashboard_text = DASHBOARD.read_text() + RULES.read_text()
    families = {family.name for family in Metrics().registry.collect()}
    missing = sorted(name for name in families if not re.search(rf"\b{name}(_total|_bucket)?\b", dashboard_text))
    assert missing == []
