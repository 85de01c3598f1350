"""The Prometheus config, alert rules and Grafana dashboard are valid and use only real metric names."""

from __future__ import annotations

import re
import subprocess
from collections import defaultdict

import pytest

from streamer.metrics import Metrics
from tests.ops.conftest import (
    ALERTS, ALERTS_TEST, DASHBOARD, PROMETHEUS_CONFIG, RUNBOOK, binary, dashboard_exprs,
    dashboard_panels, exported_names, exported_samples, load_dashboard, pinned_datasource_uid,
    referenced_names,
)


def promtool(*args: str) -> None:
    result = subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


def test_prometheus_config_is_valid():
    promtool("check", "config", str(PROMETHEUS_CONFIG))


def test_alert_rules_are_valid():
    promtool("check", "rules", str(ALERTS))


def test_alert_rule_unit_tests_pass():
    promtool("test", "rules", str(ALERTS_TEST))


def alert_test_cases(text: str) -> dict[str, set[bool]]:
    """alertname -> {True if some case expects it firing, False if some case expects none}."""
    cases: dict[str, set[bool]] = defaultdict(set)
    alertname = None
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "alertname":
            alertname = value.strip()
        elif key == "exp_alerts":
            cases[alertname].add(value.strip() != "[]")
    return cases


def heading_anchor(heading: str) -> str:
    """The anchor a Markdown renderer gives ``## Some Heading`` (GitHub style)."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^a-z0-9 _-]", "", text).replace(" ", "-")


def test_every_alert_is_documented_and_tested_firing_and_not_firing(make_prometheus):
    # A real Prometheus loads the rules; its API lists each alert with labels and annotations.
    prometheus = make_prometheus([], rule_files=[ALERTS])
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    alerts = {rule["name"]: rule for rule in rules if rule["type"] == "alerting"}
    runbook_anchors = {heading_anchor(line) for line in RUNBOOK.read_text().splitlines()
                       if line.startswith("#")}
    assert len(alerts) == len(rules) >= 10, sorted(alerts)
    for name, rule in alerts.items():
        assert rule["labels"].get("severity") in ("critical", "warning", "info"), name
        for annotation in ("summary", "description", "runbook"):
            assert rule["annotations"].get(annotation), f"{name} has no {annotation} annotation"
        anchor = rule["annotations"]["runbook"].partition("ops/RUNBOOK.md#")[2]
        assert anchor in runbook_anchors, f"{name}: runbook anchor {anchor!r} not in ops/RUNBOOK.md"
    cases = alert_test_cases(ALERTS_TEST.read_text())
    for name in alerts:
        assert cases[name] == {True, False}, f"{name}: alerts_test.yml needs a firing and a not-firing case"
    assert set(cases) <= set(alerts), f"alerts_test.yml tests unknown alerts {set(cases) - set(alerts)}"


def test_alert_rules_and_their_tests_use_only_exported_metric_names():
    names = exported_names(Metrics())
    for path in (ALERTS, ALERTS_TEST):
        unknown = referenced_names(path.read_text()) - names
        assert not unknown, f"{path.name} uses metrics that streamer/metrics.py does not define: {unknown}"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()  # fails here if the file is not valid JSON


def test_dashboard_queries_only_the_pinned_datasource(dashboard):
    uid = pinned_datasource_uid()
    assert uid == "foldstream-prometheus"
    pinned = {"type": "prometheus", "uid": uid}
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 39
    panels = [p for p in dashboard_panels(dashboard) if p["type"] != "row"]
    assert len({p["id"] for p in dashboard_panels(dashboard)}) == len(dashboard_panels(dashboard))
    for panel in panels:
        assert panel["datasource"] == pinned, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == pinned, panel["title"]
            assert target["expr"].strip(), panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == pinned, variable["name"]


def test_dashboard_uses_only_exported_metric_names(dashboard):
    names = exported_names(Metrics())
    queries = [expr for _, expr in dashboard_exprs(dashboard)]
    queries += [v.get("definition", "") for v in dashboard["templating"]["list"]]
    for expr in queries:
        assert referenced_names(expr), f"query uses no foldstream metric: {expr}"
        unknown = referenced_names(expr) - names
        assert not unknown, f"{expr}\nuses metrics that streamer/metrics.py does not define: {unknown}"


def test_dashboard_shows_every_metric(dashboard):
    used = referenced_names(DASHBOARD.read_text())
    missing = [name for name, samples in exported_samples(Metrics()).items() if not samples & used]
    assert not missing, f"metrics with no dashboard panel: {sorted(missing)}"
