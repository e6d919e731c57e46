"""A hung repository filesystem: a FUSE passthrough mount whose server is stopped.

A stopped FUSE server is what a hung NFS mount looks like to the agent: every call on
the mount waits, and no signal but SIGKILL ends the wait. The backup started on it must
fail after ``[repository] io_timeout`` with a clear error, the agent must keep
answering (``/readyz`` says what is wrong, and repeated probes do not take a thread
each), and once the server answers again the next backup succeeds and restores.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import libvirt
import pytest

from agent.core.errors import AgentError, BackupError, FilesystemHungError
from tests.guest_model import MiB, assert_restores, config, started_guest
from tests.harness import api_headers, running_agent
from tests.testbed.domains import DiskSpec, DomainFactory
from tests.testbed.fusefs import passthrough_mount

pytestmark = [pytest.mark.libvirt, pytest.mark.faults]

IO_TIMEOUT = 5.0
MARGIN = 5.0  # the job's other steps, before and after its first call on the mount


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


async def test_a_backup_on_a_hung_repository_fails_in_time_and_the_agent_keeps_answering(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    with passthrough_mount(tmp_path / "fuse-src", tmp_path / "mnt", tmp_path / "fuse.log") as fs:
        cfg = config(
            tmp_path, repository={"path": str(tmp_path / "mnt" / "repo"), "io_timeout": IO_TIMEOUT}
        )
        async with (
            running_agent(cfg) as run,
            aiohttp.ClientSession(headers=api_headers(run)) as http,
        ):
            guest = await started_guest(run, domain_factory, [DiskSpec("vda", "virtio")])
            backups, repo = run.agent.backups, run.agent.backups.repository
            url = run.agent.urls[0]
            await guest.write("vda", 0, 1 * MiB, 0x71)
            await backups.run(guest.td.uuid)  # the repository is made, on the mount
            checkpoints = await asyncio.to_thread(guest.td.dom().listAllCheckpoints)
            await guest.write("vda", 8 * MiB, 2 * MiB, 0x72)

            fs.hang()
            try:
                started = time.monotonic()
                with pytest.raises(AgentError) as failed:
                    await backups.run(guest.td.uuid)
                took = time.monotonic() - started
                print(f"backup on a hung repository failed after {took:.2f} s")
                assert IO_TIMEOUT <= took < IO_TIMEOUT + MARGIN, took
                message = str(failed.value)
                assert isinstance(failed.value, FilesystemHungError), message
                assert f"filesystem of {repo.root} has not answered" in message, message
                assert "is the mount hung?" in message, message
                # Nothing began in libvirt: no job, no new checkpoint.
                dom = guest.td.dom()
                assert dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
                assert len(await asyncio.to_thread(dom.listAllCheckpoints)) == len(checkpoints)

                # Once known hung, the next job fails at once instead of taking a thread.
                started = time.monotonic()
                with pytest.raises(FilesystemHungError, match="has not answered"):
                    await backups.run(guest.td.uuid)
                assert time.monotonic() - started < 1.0

                # The agent answers: /readyz says what is wrong, without a thread per probe.
                await _readyz_hung(http, url, repo.root, within=7)  # the one probe starts
                before = _threads()
                for _ in range(20):  # that probe still hangs: each answers at once
                    await _readyz_hung(http, url, repo.root, within=1)
                after = _threads()
                assert after <= before, f"{after - before} more threads after 20 probes"
                async with http.get(url + "/v1/jobs", timeout=aiohttp.ClientTimeout(5)) as r:
                    assert r.status == 200
                # ... and the rest of the agent's worker-thread calls are not starved.
                many = [asyncio.to_thread(threading.get_ident) for _ in range(64)]
                await asyncio.wait_for(asyncio.gather(*many), 5)
                assert await run.agent.chains.ledger.domains()
            finally:
                fs.resume()

            await _until_ready(http, url)
            expected = guest.snapshot()
            result = await backups.run(guest.td.uuid)
            await assert_restores(repo, guest.td.name, result.backup_id, expected, tmp_path)
            assert guest.td.dom().jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE


async def test_a_repository_hanging_before_publishing_fails_the_job_and_its_undo_in_time(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """The mount hangs once the copy is over and libvirt's job has ended: publishing
    fails after ``io_timeout``, the undo cannot even tell whether the backup was
    published and gives up at once (the mount is known hung), its intent stays; once
    the mount answers, the next backup first finishes that undo, then succeeds
    (incremental: the chain survived) and restores."""
    with passthrough_mount(tmp_path / "fuse-src", tmp_path / "mnt", tmp_path / "fuse.log") as fs:
        cfg = config(
            tmp_path, repository={"path": str(tmp_path / "mnt" / "repo"), "io_timeout": IO_TIMEOUT}
        )
        hung: list[float] = []

        def hang_after_the_copy(point: str, /) -> None:
            if point == "backup:ended" and armed:
                fs.hang()
                hung.append(time.monotonic())

        armed = False
        async with running_agent(cfg, faults=hang_after_the_copy) as run:
            guest = await started_guest(run, domain_factory, [DiskSpec("vda", "virtio")])
            backups, repo = run.agent.backups, run.agent.backups.repository
            await guest.write("vda", 0, 1 * MiB, 0x81)
            first = await backups.run(guest.td.uuid)
            await guest.write("vda", 16 * MiB, 2 * MiB, 0x82)
            try:
                armed = True
                with pytest.raises(BackupError) as failed:
                    await backups.run(guest.td.uuid)
                armed = False
                assert hung, "the fault point was not reached"
                took = time.monotonic() - hung[0]
                print(f"backup whose repository hung before publishing failed after {took:.2f} s")
                assert took < IO_TIMEOUT + MARGIN, took
                assert "is the mount hung?" in str(failed.value), str(failed.value)
                assert guest.td.dom().jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
                # Not undone (the repository could not be asked): the intent stays.
                assert [p.stem for p in await backups.leftovers()] == [guest.td.uuid]
            finally:
                fs.resume()

            await _until(lambda: repo.fs.stalled() is None, 10, "the stuck calls return")
            expected = guest.snapshot()
            result = await backups.run(guest.td.uuid)
            assert {(d.mode, d.reason) for d in result.disks} == {("incremental", None)}
            assert [m.backup_id for m in await repo.backups(guest.td.name)] == [
                first.backup_id,
                result.backup_id,
            ]
            await assert_restores(repo, guest.td.name, result.backup_id, expected, tmp_path)
            assert await backups.leftovers() == []
            backups_dir = repo.root / guest.td.name / "backups"
            assert not [p for p in backups_dir.iterdir() if p.name.startswith(".")]
            assert guest.td.dom().jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE


async def _readyz_hung(http: aiohttp.ClientSession, url: str, root: Path, within: float) -> None:
    started = time.monotonic()
    async with http.get(url + "/readyz", timeout=aiohttp.ClientTimeout(15)) as response:
        body = await response.json()
    assert response.status == 503, body
    assert "is the mount hung?" in body["checks"]["repository"], body
    assert str(root) in body["checks"]["repository"], body
    assert time.monotonic() - started < within  # the probe's own bound (5 s), not the mount's


async def _until_ready(http: aiohttp.ClientSession, url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(url + "/readyz") as response:
            body = await response.json()
        if response.status == 200:
            return
        assert time.monotonic() < deadline, f"not ready again within {timeout} s: {body}"
        await asyncio.sleep(0.2)


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.05)
