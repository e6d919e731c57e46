"""The alert rules in a real Prometheus, scraping a real agent (#21).

A Prometheus server on loopback (``tests/testbed/prometheus.py``) scrapes the agent's
``/metrics`` every second as the job ``backup-agent`` and evaluates
``config/prometheus/alerts.yml`` every second. Of two domains, one's backups fail (its
only disk is a CD-ROM: nothing to back up, each job fails ``no-disks``) and one's
succeed. Within the test's deadline, Prometheus's own alerts API shows
``BackupAgentBackupsFailing`` firing for the first, and no alert at all, firing or
pending, for the healthy one.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.testbed.agent_process import AgentProcess, agent_process
from tests.testbed.domains import DiskSpec, DomainFactory
from tests.testbed.prometheus import JOB, prometheus_server

pytestmark = pytest.mark.libvirt

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "config" / "prometheus" / "alerts.yml"
DEADLINE = 60.0  # seconds for the alert to fire once the third backup has failed


def _backup(agent: AgentProcess, job_id: str, domain: str) -> dict[str, Any]:
    status, job = agent.call("POST", "/v1/jobs", {"id": job_id, "kind": "backup", "domain": domain})
    assert status == 201, job
    return agent.wait_job(job_id, {"succeeded", "failed", "cancelled"})


def _alerts_for(alerts: list[dict[str, Any]], domain: str) -> list[dict[str, Any]]:
    return [a for a in alerts if a["labels"].get("domain") == domain]


async def test_backups_failing_fires_in_prometheus_and_a_healthy_domain_fires_nothing(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    failing = await asyncio.to_thread(
        domain_factory, persistent=True, disks=[DiskSpec("sda", bus="sata", device="cdrom")]
    )
    healthy = await asyncio.to_thread(domain_factory, persistent=True, disks=[DiskSpec("vda")])
    await asyncio.to_thread(healthy.write_pattern, "vda", 0, 1 << 20, 0x61)
    with agent_process(tmp_path, {}) as agent:
        await asyncio.to_thread(agent.start)
        target = agent.url.removeprefix("http://")
        with prometheus_server(tmp_path / "prometheus", [target], [RULES]) as prometheus:
            done = await asyncio.to_thread(_backup, agent, "ok-1", healthy.name)
            assert done["state"] == "succeeded", done
            for number in range(3):
                ended = await asyncio.to_thread(_backup, agent, f"bad-{number}", failing.name)
                assert ended["state"] == "failed", ended
                assert ended["error"]["code"] == "no-disks", ended
            deadline = time.monotonic() + DEADLINE
            while True:
                alerts = await asyncio.to_thread(prometheus.alerts)
                firing = [
                    a
                    for a in _alerts_for(alerts, failing.name)
                    if a["labels"]["alertname"] == "BackupAgentBackupsFailing"
                    and a["state"] == "firing"
                ]
                if firing:
                    break
                assert time.monotonic() < deadline, (
                    f"BackupAgentBackupsFailing did not fire for {failing.name} within "
                    f"{DEADLINE:g} s; alerts: {alerts}\n{prometheus.tail()}"
                )
                await asyncio.sleep(0.5)
            [alert] = firing
            assert alert["labels"]["job"] == JOB
            assert alert["annotations"]["runbook"].endswith("#alert-backupagentbackupsfailing")
            # The scrape saw the agent up, and the healthy domain raised nothing at all.
            up = await asyncio.to_thread(prometheus.get, "/api/v1/query?query=up")
            assert [r["value"][1] for r in up["result"]] == ["1"], up
            assert _alerts_for(alerts, healthy.name) == [], alerts
