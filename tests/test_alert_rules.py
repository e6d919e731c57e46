"""Tests of the Prometheus alert rules (``config/prometheus/alerts.yml``) and their runbooks.

``promtool`` (Prometheus 2.42's, ``/usr/bin/promtool`` from the Debian package) checks the
rule file and runs its unit tests, ``tests/prometheus/alerts_test.yml``; it is required: a
missing promtool fails these tests, never skips them. Beside that: every rule carries a
severity and its annotations, each has a firing and a silent unit test case, each runbook
anchor is in README.md's "Monitoring" section, and every metric a rule reads is one the
agent's own code exposes (rendered from :class:`~agent.control.metrics.Metrics`).

The rule and test files are read with a small reader of the block YAML they are written in
(no YAML library is a dependency); its count of rules is checked against promtool's.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.exposed_metrics import exposed_names, promtool, rendered

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "config" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO / "tests" / "prometheus" / "alerts_test.yml"
README = REPO / "README.md"

GROUP = "backup-agent"
SEVERITIES = frozenset({"critical", "warning", "info"})
ANNOTATIONS = ("summary", "description", "runbook")
# Series Prometheus makes itself, not the agent: up{job, instance} per scrape target.
PROMETHEUS_SERIES = frozenset({"up"})

_KEY = re.compile(r"^(?P<indent> *)(?:- )?(?P<key>[A-Za-z_]+):(?: (?P<value>.*))?$")
_BLOCK = frozenset({"|", "|-", ">", ">-"})


@dataclass(frozen=True)
class Rule:
    """One alerting rule: ``fields`` by path (``expr``, ``for``, ``labels.severity``,
    ``annotations.summary``, ...), scalars as YAML gives them."""

    name: str
    fields: dict[str, str]


def _scalar(raw: str) -> str:
    value = raw.strip()
    if value.startswith('"'):
        return str(json.loads(value))  # (the files' double-quoted strings are JSON-like)
    if value.startswith("'"):
        return value[1:-1].replace("''", "'")
    return value


def read_rules(text: str) -> list[Rule]:
    """The rules of a rule file written in block style: each starts with ``- alert: NAME``;
    ``labels:``/``annotations:`` nest one level; ``|`` and ``>`` block scalars."""
    rules: list[Rule] = []
    lines = text.splitlines()
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        match = _KEY.match(line)
        if line.lstrip().startswith("#") or match is None:
            continue
        indent, key, value = len(match["indent"]), match["key"], match["value"] or ""
        if key == "alert":
            rules.append(Rule(_scalar(value), {}))
            section = ""
            continue
        if not rules:
            continue
        if key in ("labels", "annotations") and not value:
            section = key
            continue
        if value in _BLOCK:  # the more indented (or blank) lines that follow
            block: list[str] = []
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
            ):
                block.append(lines[i].strip())
                i += 1
            while block and not block[-1]:
                block.pop()
            joined = "\n".join(block) if value.startswith("|") else " ".join(block)
            scalar = joined.strip()
        else:
            scalar = _scalar(value)
        if key in ("expr", "for", "record"):
            section = ""
        path = f"{section}.{key}" if section else key
        rules[-1].fields[path] = scalar
    return rules


def _run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def _rules() -> list[Rule]:
    return read_rules(RULES.read_text())


def test_promtool_checks_the_rules() -> None:
    """``promtool check rules`` accepts the file, and finds as many rules as the reader here."""
    proc = _run_promtool("check", "rules", str(RULES.relative_to(REPO)))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool check rules failed:\n{output}"
    found = re.search(r"SUCCESS: (\d+) rules found", output)
    assert found is not None, output
    assert int(found[1]) == len(_rules()), output


def test_promtool_unit_tests_pass() -> None:
    """``promtool test rules tests/prometheus/alerts_test.yml`` passes: each rule fires
    with the expected labels and annotations, and its near misses stay silent."""
    proc = _run_promtool("test", "rules", str(RULE_TESTS.relative_to(REPO)))
    assert proc.returncode == 0, f"promtool test rules failed:\n{proc.stdout}{proc.stderr}"
    assert "SUCCESS" in proc.stdout, proc.stdout


def test_one_group_of_named_rules() -> None:
    """One group, ``backup-agent``; rule names unique, CamelCase, prefixed ``BackupAgent``."""
    groups = re.findall(r"^\s*- name: (.+)$", RULES.read_text(), re.MULTILINE)
    assert groups == [GROUP]
    names = [rule.name for rule in _rules()]
    assert len(names) == len(set(names)), names
    for name in names:
        assert re.fullmatch(r"BackupAgent(?:[A-Z][a-z0-9]+)+", name), name


def test_every_rule_has_severity_and_annotations() -> None:
    """Each rule has a ``severity`` label of a known value, non-empty ``summary``,
    ``description`` and ``runbook`` annotations, the runbook pointing at
    ``README.md#alert-<rule name in lowercase>``."""
    rules = _rules()
    assert rules
    for rule in rules:
        assert rule.fields.get("expr"), rule.name
        assert rule.fields.get("labels.severity") in SEVERITIES, (rule.name, rule.fields)
        for annotation in ANNOTATIONS:
            assert rule.fields.get(f"annotations.{annotation}"), (rule.name, annotation)
        assert rule.fields["annotations.runbook"] == f"README.md#alert-{rule.name.lower()}"


def test_runbook_anchors_are_in_the_readme() -> None:
    """README.md holds ``<a id="alert-<name>"></a>`` for every rule's runbook anchor (the
    "Monitoring" section)."""
    readme = README.read_text()
    anchors = [rule.fields["annotations.runbook"].partition("#")[2] for rule in _rules()]
    missing = [anchor for anchor in anchors if f'<a id="{anchor}"></a>' not in readme]
    assert not missing, f"README.md lacks the runbook anchors {missing}"


def test_every_rule_has_a_firing_and_a_silent_case() -> None:
    """``alerts_test.yml`` has, for every rule, a case expecting alerts and one expecting
    none (``exp_alerts: []``), and names no rule the file does not have."""
    firing: set[str] = set()
    silent: set[str] = set()
    alertname = None
    for line in RULE_TESTS.read_text().splitlines():
        if (match := re.match(r"^\s*alertname: (\S+)\s*$", line)) is not None:
            alertname = match[1]
        elif (match := re.match(r"^\s*exp_alerts:(.*)$", line)) is not None:
            assert alertname is not None, line
            (silent if match[1].strip() == "[]" else firing).add(alertname)
            alertname = None
    names = {rule.name for rule in _rules()}
    assert firing | silent <= names, (firing | silent) - names
    assert names - firing == set(), "no firing case"
    assert names - silent == set(), "no silent case"


def test_rules_use_only_exposed_metrics() -> None:
    """Every metric name a rule's expression reads (``backup_agent_*``, and ``up``) is one
    the agent exposes, as its metrics code renders them, or Prometheus's own ``up``."""
    exposed = exposed_names(rendered())
    assert "backup_agent_event_loop_lag_seconds_bucket" in exposed  # (the reading works)
    for rule in _rules():
        expr = rule.fields["expr"]
        used = set(re.findall(r"\b(backup_agent_[a-z_]+)\b", expr))
        used |= {name for name in PROMETHEUS_SERIES if re.search(rf"\b{name}\b", expr)}
        assert used, rule.name
        unknown = used - exposed - PROMETHEUS_SERIES
        assert not unknown, f"{rule.name} reads metrics the agent does not expose: {unknown}"
