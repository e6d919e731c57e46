"""Space admission across jobs: a repository on a tmpfs that holds the worst case of one
job, not of two at once.

Each backup's worst case is its disks' whole size (64 MiB here). The tmpfs has room for
one of them at a time: the job started second is refused while the first runs, saying
how much it needed, how much was free and how much the running jobs hold, and succeeds
once the first is over. A retention merge reserves what it commits (the layers above
the bottom image: 1 MiB here), not the disk: it is admitted beside a running backup.
A bandwidth limit keeps the first job running long enough to be seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import libvirt
import pytest

from agent.backup.run import BackupResult, Backups
from agent.core.errors import RepositorySpaceError
from agent.core.space import SpaceBook
from tests.guest_model import SIZE, Guest, MiB, assert_restores, config, started_guest
from tests.harness import running_agent
from tests.testbed.domains import DiskSpec, DomainFactory

pytestmark = [pytest.mark.libvirt, pytest.mark.faults]

ONE_DISK = [DiskSpec("vda", "virtio")]
DATA = 4 * MiB  # written into each guest: 4 s of copying at the limit
LIMIT = 1 * MiB  # bytes per second per job


@contextlib.asynccontextmanager
async def tmpfs(path: Path, size: str) -> AsyncIterator[Path]:
    await asyncio.to_thread(path.mkdir)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)]
    await asyncio.to_thread(subprocess.run, mount, check=True)
    try:
        yield path
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(path)], check=True)


async def _holding(book: SpaceBook, device: int, timeout: float = 30) -> int:
    """Once a running job holds space on ``device``: how much."""
    deadline = time.monotonic() + timeout
    while not book.held(device):
        assert time.monotonic() < deadline, "the first job never reserved its space"
        await asyncio.sleep(0.01)
    return book.held(device)


def _assert_refused(refused: RepositorySpaceError, job: str, holder: str) -> None:
    message = str(refused)
    assert refused.needed == SIZE and refused.held == SIZE, message
    # It would have fitted alone: only what the running job holds is missing.
    assert refused.free is not None and refused.needed <= refused.free < refused.needed * 2
    assert f"has {refused.free} bytes free" in message, message
    assert f"running jobs hold {SIZE} ({holder}: {SIZE})" in message, message
    assert f"{job} may need {SIZE}; refusing to start" in message, message


async def test_jobs_are_admitted_against_the_space_the_running_ones_hold(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    async with tmpfs(tmp_path / "small", "120M") as small:
        cfg = config(
            tmp_path,
            repository={"path": str(small / "repo")},
            backup={"bandwidth_limit": LIMIT},
        )
        device = os.stat(small).st_dev
        async with running_agent(cfg) as run:
            first = await started_guest(run, domain_factory, ONE_DISK)
            second = await started_guest(run, domain_factory, ONE_DISK)
            backups, repo = run.agent.backups, run.agent.backups.repository
            await first.write("vda", 0, DATA, 0x31)
            await second.write("vda", 0, DATA, 0x32)

            # Two backups at once: the second is refused while the first runs.
            expected = first.snapshot()
            running = asyncio.create_task(backups.run(first.td.uuid))
            assert await _holding(repo.space, device) == SIZE
            with pytest.raises(RepositorySpaceError) as refused:
                await backups.run(second.td.uuid)
            _assert_refused(
                refused.value, f"a backup of {second.td.name}", f"a backup of {first.td.name}"
            )
            assert await asyncio.to_thread(second.td.dom().listAllCheckpoints) == []
            result = await running
            assert not running.cancelled() and repo.space.held(device) == 0
            await assert_restores(repo, first.td.name, result.backup_id, expected, tmp_path)
            await _backs_up(run.agent.backups, second, tmp_path)

            # A retention merge while a backup runs: it needs what it commits (1 MiB), not
            # the disk, and fits beside the running backup's 64 MiB.
            await first.write("vda", 8 * MiB, 1 * MiB, 0x33)
            kept = first.snapshot()
            newest = await backups.run(first.td.uuid)
            await second.write("vda", 16 * MiB, DATA, 0x34)
            running = asyncio.create_task(backups.run(second.td.uuid))
            await _holding(repo.space, device)
            assert await repo.apply_retention(first.td.name, 1) == [result.backup_id]
            assert not running.done()  # (beside it, not after it)
            await running
            (merged,) = await repo.backups(first.td.name)
            assert merged.backup_id == newest.backup_id and merged.parent is None
            await assert_restores(repo, first.td.name, newest.backup_id, kept, tmp_path)
            # A backup's own retention is not held back by that backup's reservation
            # (released once it is published: what it wrote is in the free space then).
            await first.write("vda", 24 * MiB, 1 * MiB, 0x35)
            last = await _backs_up(run.agent.backups, first, tmp_path, keep_last=1)
            assert [m.backup_id for m in await repo.backups(first.td.name)] == [last.backup_id]
            for guest in (first, second):
                assert guest.td.dom().jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE


async def _backs_up(
    backups: Backups, guest: Guest, tmp_path: Path, keep_last: int | None = None
) -> BackupResult:
    expected = guest.snapshot()
    result = await backups.run(guest.td.uuid, keep_last=keep_last)
    await assert_restores(backups.repository, guest.td.name, result.backup_id, expected, tmp_path)
    return result
