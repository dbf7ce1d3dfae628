"""deploy/monitoring against the real tool and the real service: promtool checks and unit-tests the
alert rules, every PromQL query of the rules and dashboards names only metrics a live /metrics
exposes (or recording rules of alerts.yml), and promtool lints that live exposition."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import skip_unless_real
from tests.integration.serving_fixtures import make_service, make_tiny_model, run, running

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
RULES = MONITORING / "alerts.yml"
DASHBOARDS = sorted((MONITORING / "dashboards").glob("*.json"))
RUNBOOKS = MONITORING.parents[1] / "docs" / "runbooks"
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# PromQL words that look like metric names (operators, modifiers, special floats)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        skip_unless_real("promtool is not installed (Debian package prometheus)")
    return path


def metric_names(expr: str) -> set[str]:
    """The metric (and recording rule) names a PromQL expression selects: identifiers that are not
    functions, keywords, label names, grouping labels, durations or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery windows ($__rate_interval)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    found = re.findall(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr)
    return {n for n in found if n.lower() not in _KEYWORDS}


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def queries() -> list[tuple[str, str]]:
    """(where, expr) of every rule and every dashboard panel target."""
    out = [
        (rule.get("alert") or rule["record"], rule["expr"])
        for group in rule_groups()
        for rule in group["rules"]
    ]
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                out.append((f"{path.name}: {panel['title']}", target["expr"]))
    return out


def live_metrics(tmp_path: Path) -> str:
    """GET /metrics of an in-process service after one generation (so labelled series exist)."""

    async def scenario() -> str:
        service = make_service(make_tiny_model(tmp_path / "model"))
        async with running(service) as client:
            r = await client.post("/v1/generate", json={"labels": [3], "seed": 7})
            assert r.status_code == 200, r.text
            m = await client.get("/metrics")
            assert m.status_code == 200
            return m.text

    return run(scenario())


def test_the_name_extractor_sees_metrics_only():
    expr = (
        'histogram_quantile(0.95, sum by (le, version) (rate(a_seconds_bucket{role="x",'
        'le="1"}[$__rate_interval]))) * on (version) group_left (role) max(b_info) '
        "> 1.5 * sum(rate(c_total[5m])) by (instance) and d:ratio_rate5m offset 1h > bool 1e3"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_info", "c_total", "d:ratio_rate5m"}


def test_promtool_checks_and_unit_tests_the_alert_rules():
    tool = promtool()
    for args in (["check", "rules", RULES.name], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run([tool, *args], cwd=MONITORING, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_parses_every_dashboard_query(tmp_path):
    tool = promtool()
    rules = [
        {"record": f"dashboard:query:{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, (_, expr) in enumerate(queries())
    ]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    done = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_runbook_and_a_test():
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])}
    alerts = [r for g in rule_groups() for r in g["rules"] if "alert" in r]
    assert alerts
    for rule in alerts:
        url = rule["annotations"]["runbook_url"]
        assert re.fullmatch(r"docs/runbooks/[\w-]+\.md", url), url
        text = (RUNBOOKS / Path(url).name).read_text()
        assert rule["alert"] in text and "## Checks" in text and "## Actions" in text
        assert rule["alert"] in tested, f"{rule['alert']} has no promtool test"


def test_every_query_names_only_metrics_the_service_exports(tmp_path):
    assert len(DASHBOARDS) == 3, DASHBOARDS
    text = live_metrics(tmp_path)
    exposed = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    exposed |= {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][\w:]*)", text, re.M)}
    recorded = {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}
    unknown = []
    for where, expr in queries():
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        for name in names:
            base = next((name[: -len(s)] for s in _HISTOGRAM_SUFFIXES if name.endswith(s)), name)
            if name not in exposed and base not in exposed and name not in recorded:
                unknown.append(f"{where}: {name}")
    assert not unknown, unknown


def test_the_queue_size_in_the_rules_is_the_configured_default():
    """The queue size is not exported, so the saturation rule and the on-call board carry it."""
    from difforge.serving import ServiceConfig

    size = ServiceConfig().queue_size
    saturation = [
        r for g in rule_groups() for r in g["rules"] if r.get("alert") == "DifforgeQueueSaturated"
    ]
    assert f"/ {size} > 0.8" in saturation[0]["expr"]
    oncall = [e for w, e in queries() if w.startswith("oncall.json") and "queue_depth" in e]
    assert any(f"/ {size}" in e for e in oncall)


def test_promtool_lints_the_live_exposition(tmp_path):
    tool = promtool()
    text = live_metrics(tmp_path)
    done = subprocess.run(
        [tool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboards_are_grafana_json_with_queries(path):
    board = json.loads(path.read_text())
    assert board["title"] and board["uid"] and board["panels"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
