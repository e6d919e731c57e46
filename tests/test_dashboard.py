"""The Grafana dashboard (config/grafana/backup-agent.json): sound JSON, PromQL that
``promtool`` accepts, and only metric names the agent really exposes.

The exposed names come from the agent's own ``/metrics`` output (a :class:`Metrics` with a
:class:`StateCollector` that has something to show), so renaming a metric breaks this test.
Nothing here talks to libvirt; ``promtool`` must be installed (a missing one fails).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.exposed_metrics import exposed_names, promtool, rendered

DASHBOARD = Path(__file__).resolve().parent.parent / "config" / "grafana" / "backup-agent.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

METRIC_RE = re.compile(r"backup_agent_[a-z_]+")
# A selector of one of the agent's metrics: its name and its {matchers}, if any.
SELECTOR_RE = re.compile(r"(backup_agent_[a-z_]+)(\{[^}]*\})?")
SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ", re.M)
LABEL_VALUES_RE = re.compile(r"^\s*label_values\(\s*(?:(.*),\s*)?([a-zA-Z_]\w*)\s*\)\s*$", re.S)
# Grafana's built-in variables, by what they stand for in a test query.
BUILTINS = {
    "__rate_interval": "5m",
    "__interval": "5m",
    "__range": "5m",
    "__interval_ms": "300000",
    "__range_ms": "300000",
    "__range_s": "300",
}
VARIABLE_RE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")
INSTANCE_FILTER = 'instance=~"$instance"'
DOMAIN_FILTER = 'domain=~"$domain"'


# -- helpers ---------------------------------------------------------------------------------


def load() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those nested in (collapsed) rows too."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def panel_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every ``expr`` anywhere in the dashboard (panels, rows, targets, whatever nests)."""
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard.get("panels", []))
    return found


def template_exprs(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL in the query variables: of ``label_values(selector, label)`` the
    selector (a bare metric name is one), else the whole query."""
    found: list[str] = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable_query(variable)
        match = LABEL_VALUES_RE.match(query)
        if match is None:
            found.append(query)
        elif match.group(1) is not None:
            found.append(match.group(1))
    return found


def substitute(expr: str) -> str:
    """``expr`` with Grafana's variables replaced: intervals by ``5m``, others by ``.*``."""

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g is not None)
        return BUILTINS.get(name, ".*")

    return VARIABLE_RE.sub(value, expr)


def check_rules(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``promtool check rules`` on ``exprs`` as recording rules (JSON is YAML)."""
    rules = [{"record": f"dashboard:expr_{n}", "expr": e} for n, e in enumerate(exprs)]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}, indent=2))
    return subprocess.run(
        [promtool(), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def label_names(text: str) -> dict[str, set[str]]:
    """Per sample name, the label names its samples carry."""
    labels: dict[str, set[str]] = {}
    for name, body in SAMPLE_RE.findall(text):
        labels.setdefault(name, set()).update(re.findall(r'(\w+)="', body or ""))
    return labels


# -- tests -----------------------------------------------------------------------------------


def test_dashboard_is_valid_json_with_variables_and_unique_ids() -> None:
    """JSON with the ``instance`` and ``domain`` variables (multi, include all), unique
    panel ids, and every target with an ``expr`` and a ``refId`` on the one datasource."""
    dashboard = load()
    assert 36 <= dashboard["schemaVersion"] <= 40
    found = variables(dashboard)
    assert found["datasource"]["type"] == "datasource"
    assert found["datasource"]["query"] == "prometheus"
    for name in ("instance", "domain"):
        assert found[name]["type"] == "query"
        assert found[name]["multi"] is True
        assert found[name]["includeAll"] is True
        assert found[name]["datasource"] == DATASOURCE
    assert variable_query(found["instance"]) == (
        "label_values(backup_agent_libvirt_connected, instance)"
    )
    assert variable_query(found["domain"]) == (
        # (every domain libvirt has, backed up or not)
        'label_values(backup_agent_domain_without_backup{instance=~"$instance"}, domain)'
    )
    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    assert any(p.get("collapsed") for p in panels if p["type"] == "row")
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t["expr"].strip(), panel["title"]
            assert t["datasource"] == DATASOURCE, panel["title"]


def test_every_expression_passes_promtool(tmp_path: Path) -> None:
    """Every PromQL expression (panels, rows, variables), variables substituted, is a
    recording rule ``promtool check rules`` accepts."""
    dashboard = load()
    exprs = [substitute(e) for e in panel_exprs(dashboard) + template_exprs(dashboard)]
    assert len(exprs) >= 30
    assert not [e for e in exprs if "$" in e or "[[" in e], "a variable was left in"
    result = check_rules(exprs, tmp_path)
    assert result.returncode == 0, f"promtool failed:\n{result.stdout}\n{result.stderr}"
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout, result.stdout


def test_promtool_rejects_a_broken_expression(tmp_path: Path) -> None:
    """The check can fail: an unbalanced parenthesis (or a matcher-less selector) next to
    a sound expression makes promtool fail."""
    sound = substitute('sum(backup_agent_jobs{instance=~"$instance"})')
    assert check_rules([sound], tmp_path).returncode == 0
    for broken in (
        'sum(rate(backup_agent_backups_total{instance=~".*"}[5m])',
        '{instance=~".*"}',
    ):
        result = check_rules([sound, broken], tmp_path)
        assert result.returncode != 0, f"promtool accepted {broken!r}:\n{result.stdout}"


def test_every_metric_is_one_the_agent_exposes() -> None:
    """Each ``backup_agent_*`` name in the dashboard is a sample name of the agent's
    ``/metrics``; a name the agent does not expose would be caught."""
    exposed = exposed_names(rendered())
    assert {
        "backup_agent_backups_total",
        "backup_agent_backup_duration_seconds_bucket",
        "backup_agent_libvirt_connected",
        "backup_agent_repository_free_bytes",
        "backup_agent_chain_broken_since_timestamp_seconds",
        "backup_agent_nats_connected",
    } <= exposed
    assert "backup_agent_backups_total_total" not in exposed
    dashboard = load()
    used: set[str] = set()
    for expr in panel_exprs(dashboard) + template_exprs(dashboard):
        used.update(METRIC_RE.findall(substitute(expr)))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # (label_values' metric too, even a bare one)
            used.update(METRIC_RE.findall(variable_query(variable)))
    assert used, "no metric names found"
    assert not used - exposed, f"not exposed by the agent: {sorted(used - exposed)}"


def test_every_selector_filters_on_instance_and_domain() -> None:
    """Every selector of an agent metric in a panel filters on ``$instance``, and on
    ``$domain`` when the metric has a ``domain`` label."""
    labels = label_names(rendered())
    with_domain = {name for name, found in labels.items() if "domain" in found}
    assert "backup_agent_last_successful_backup_timestamp_seconds" in with_domain
    assert "backup_agent_chain_broken" in with_domain
    missing: list[str] = []
    for expr in panel_exprs(load()):
        for name, matchers in SELECTOR_RE.findall(expr):
            if INSTANCE_FILTER not in matchers:
                missing.append(f"{name} without {INSTANCE_FILTER} in {expr}")
            if name in with_domain and DOMAIN_FILTER not in matchers:
                missing.append(f"{name} without {DOMAIN_FILTER} in {expr}")
    assert not missing, "\n".join(missing)
