"""What the tests of the alert rules and the dashboard check their PromQL against: the
sample names the agent's ``/metrics`` can show (from its own rendering, with every
optional family present, so that a renamed metric fails them), and promtool."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from agent.backup.plan import DiskCoverage
from agent.chain.records import DiskChain
from agent.control.metrics import Metrics, StateCollector

TYPE_RE = re.compile(r"^# TYPE (\S+) (counter|gauge|histogram|summary|untyped)$", re.M)


def promtool() -> str:
    path = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(path).is_file():
        pytest.fail(
            "promtool is not installed (apt-get install prometheus): PromQL cannot be checked"
        )
    return path


def rendered() -> str:
    """The agent's ``/metrics`` body with every family present (chains, space, NATS...)."""
    m = Metrics()
    m.broken_chains = (DiskChain("vm", "vda", False, "disk-replaced", "replaced", 1.0),)
    m.repository_space = (100 << 30, 40 << 30)
    # Label the per-domain gauges that only get samples when backups end.
    for gauge in (m.last_success, m.last_failure, m.failures_in_a_row, m.chain_length):
        gauge.labels(domain="vm").set(1)
    coverage = {
        "vm": (
            DiskCoverage("vda", "incremental", None, size=10 << 30),
            DiskCoverage("vdb", "excluded", "shareable", silent=True, size=1 << 30),
        )
    }
    m.add_collector(
        StateCollector(
            connected=lambda: True,
            reconnects=lambda: 0,
            job_counts=dict,
            nats=lambda: True,
            recovering=lambda: ["vm"],
            coverage=lambda: coverage,
            metrics=m,
        )
    )
    return m.render().decode()


def exposed_names(text: str) -> set[str]:
    """Sample names from the ``# TYPE`` lines: counter → ``_total``, histogram →
    ``_bucket``/``_sum``/``_count``, gauge → the family."""
    names: set[str] = set()
    for family, kind in TYPE_RE.findall(text):
        if kind == "counter":
            names.add(family if family.endswith("_total") else f"{family}_total")
        elif kind == "histogram":
            names.update(f"{family}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family)
    return names
