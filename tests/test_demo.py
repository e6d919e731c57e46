"""The newcomer's demo (`scripts/demo.sh`) runs end to end on this machine and cleans up."""

from __future__ import annotations

import subprocess
import sys

import libvirt
import pytest

from tests.testbed.agent_process import REPO
from tests.testbed.domains import NAME_PREFIX

pytestmark = pytest.mark.libvirt


def _demo_domains() -> set[str]:
    conn = libvirt.open("qemu:///system")
    try:
        return {d.name() for d in conn.listAllDomains() if d.name().startswith(NAME_PREFIX)}
    finally:
        conn.close()


def test_demo_backs_up_restores_verifies_and_cleans_up() -> None:
    before = _demo_domains()
    done = subprocess.run(
        [sys.executable, "-m", "demo.run"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "full (first-backup)" in out
    assert "vda incremental" in out
    # Both restored while a writer was busy: each is the disk at one instant.
    assert out.count(": one point in time") == 2
    assert "verify: 0 problems" in out
    assert "backup_agent_backups_total{" in out
    assert "exit status 0" in out
    assert _demo_domains() == before, "the demo left its domain behind"
