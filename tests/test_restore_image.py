"""agent.repository.restore.restore_image when reading the result back fails: the error
is the repository's own (one line for the CLI, its code for a job), not a group, and
no ``.part`` is left."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from agent.core.errors import RepositoryError
from agent.repository.layers import QemuImg
from agent.repository.restore import restore_image


class _MapFails(QemuImg):
    async def layer_map(self, path: Path) -> list:  # type: ignore[override, type-arg]
        raise RepositoryError(f"qemu-img map {path}: exit status 1: simulated")


def test_a_failure_while_the_digest_is_read_back_is_raised_as_itself(tmp_path: Path) -> None:
    source = tmp_path / "point.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(source), "1M"], check=True)
    dest = tmp_path / "restored.qcow2"
    qemu = _MapFails(timeout=30, copy_timeout=60)
    with pytest.raises(RepositoryError, match="simulated"):
        asyncio.run(restore_image(qemu, source, dest, fmt="qcow2", expected="0" * 32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["point.qcow2"]
