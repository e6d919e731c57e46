"""Backups of real domains, restored and compared byte for byte with what the guest held.

Every test keeps a model of each guest disk (a bytearray): every write the test makes
through QEMU is applied to the model too, and a snapshot of the model is taken when a
backup starts. Restoring a backup must give exactly that snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent.backup.plan import BackupMode
from agent.backup.run import BackupResult, Backups
from agent.chain.records import CheckpointState
from agent.core.config import AgentConfig
from agent.core.errors import BackupError, RepositorySpaceError
from agent.core.faults import CRASH_ENV, SimulatedCrash
from agent.repository.store import Repository
from agent.virt.events import JobCompleted
from agent.virt.events import LifecycleKind as K
from tests.guest_model import (
    SIZE,
    Guest,
    KiB,
    MiB,
    agent_cli,
    assert_restores,
    config,
    config_file,
    started_guest,
)
from tests.harness import TWO_DISKS, lifecycle, running_agent
from tests.testbed.daemon import live_processes_mentioning
from tests.testbed.domains import DiskSpec, DomainFactory

pytestmark = pytest.mark.libvirt


async def test_full_and_two_incrementals_restore_bit_for_bit(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    async with running_agent(config(tmp_path)) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        backups, repo = run.agent.backups, run.agent.backups.repository
        await guest.write("vda", 0, 1 * MiB, 0xA1)
        await guest.write("vda", 10 * MiB, 64 * KiB, 0xA2)
        await guest.write("sda", 5 * MiB, 256 * KiB, 0xB1)
        points = [guest.snapshot()]
        first = await backups.run(guest.td.uuid, BackupMode.AUTO)
        assert {(d.target, d.mode, d.reason) for d in first.disks} == {
            ("vda", "full", "first-backup"),
            ("sda", "full", "first-backup"),
        }

        await guest.write("vda", 64 * KiB - 512, 1024, 0xC1)  # straddles a cluster boundary
        await guest.write("vda", 30 * MiB, 1 * MiB, 0xC2)
        await guest.discard("vda", 256 * KiB, 128 * KiB)
        # The discard took effect (whole clusters, now unallocated, read as zeroes): a
        # backup that missed it would restore the 0xA1 written there before.
        assert guest.disks["vda"][256 * KiB : 384 * KiB] == bytes(128 * KiB)
        await guest.zero("sda", 5 * MiB + 64 * KiB, 64 * KiB)
        points.append(guest.snapshot())
        second = await backups.run(guest.td.uuid, BackupMode.INCREMENTAL)
        assert {d.mode for d in second.disks} == {"incremental"}
        assert second.bytes_copied <= 2 * MiB  # the changed clusters, not the disks

        await guest.write("vda", 63 * MiB, 1 * MiB, 0xD1)  # the last MiB of the disk
        await guest.write("sda", 0, 4 * KiB, 0xD2)
        points.append(guest.snapshot())
        third = await backups.run(guest.td.uuid, BackupMode.AUTO)
        assert {d.mode for d in third.disks} == {"incremental"}

        manifests = await repo.backups(guest.td.name)
        assert [m.backup_id for m in manifests] == [
            first.backup_id,
            second.backup_id,
            third.backup_id,
        ]
        assert [m.parent for m in manifests] == [None, first.backup_id, second.backup_id]
        for manifest, expected in zip(manifests, points, strict=True):
            await assert_restores(repo, guest.td.name, manifest.backup_id, expected, tmp_path)
        assert await repo.verify(guest.td.name) == []
        # QEMU's backup exports listen in, and the intents are kept in, the agent's own.
        for private in (run.agent.config.socket_path, run.agent.config.run_path / "jobs"):
            assert stat.S_IMODE(private.stat().st_mode) == 0o700, private
        # Only the newest checkpoint stays in libvirt; the ledger knows all three.
        records = await run.agent.chains.ledger.checkpoints(guest.td.name)
        assert [r.state for r in records] == [CheckpointState.PRUNED] * 2 + [CheckpointState.ACTIVE]
        assert [r.name for r in records] == [m.checkpoint for m in manifests]
        # Each manifest carries what rebuilds the ledger elsewhere: the domain's UUID and
        # the checkpoint's full XML (its <domain> included), as libvirt gave it.
        for record, manifest in zip(records, manifests, strict=True):
            assert manifest.domain_uuid == record.domain_uuid
            assert manifest.checkpoint_xml == record.xml
            assert "<domain" in manifest.checkpoint_xml and guest.td.uuid == record.domain_uuid


async def test_new_disk_is_full_while_the_other_stays_incremental(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    async with running_agent(config(tmp_path)) as run:
        guest = await started_guest(run, domain_factory, [DiskSpec("vda", "virtio")])
        backups, repo = run.agent.backups, run.agent.backups.repository
        await guest.write("vda", 2 * MiB, 64 * KiB, 0x11)
        await backups.run(guest.td.uuid)
        image = await asyncio.to_thread(guest.td.create_image, "sdb")
        await asyncio.to_thread(guest.td.attach_scsi_disk, "sdb", image)
        guest.attach("sdb")
        await guest.write("sdb", 7 * MiB, 128 * KiB, 0x22)
        await guest.write("vda", 3 * MiB, 64 * KiB, 0x33)
        expected = guest.snapshot()
        second = await backups.run(guest.td.uuid)
        assert {(d.target, d.mode, d.reason) for d in second.disks} == {
            ("vda", "incremental", None),
            ("sdb", "full", "disk-added"),
        }
        await assert_restores(repo, guest.td.name, second.backup_id, expected, tmp_path)


async def test_inconsistent_bitmaps_make_the_next_backup_full(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    async with running_agent(config(tmp_path)) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        backups, repo = run.agent.backups, run.agent.backups.repository
        await guest.write("vda", 0, 64 * KiB, 0x44)
        await backups.run(guest.td.uuid)
        await guest.flush()
        await asyncio.to_thread(guest.td.crash)
        await run.recorder.wait_for(lifecycle(guest.td.uuid, K.STOPPED, "failed"))
        mark = run.recorder.mark()
        await asyncio.to_thread(guest.td.start)
        await run.recorder.wait_for(lifecycle(guest.td.uuid, K.STARTED, "booted"), since=mark)
        await guest.write("sda", 9 * MiB, 64 * KiB, 0x55)
        with pytest.raises(BackupError) as refused:
            await backups.run(guest.td.uuid, BackupMode.INCREMENTAL)
        assert refused.value.code == "chain-broken" and "bitmap-inconsistent" in str(refused.value)
        expected = guest.snapshot()
        result = await backups.run(guest.td.uuid, BackupMode.AUTO)
        assert {(d.target, d.mode, d.reason) for d in result.disks} == {
            ("vda", "full", "bitmap-inconsistent"),
            ("sda", "full", "bitmap-inconsistent"),
        }
        await assert_restores(repo, guest.td.name, result.backup_id, expected, tmp_path)
        # The full backup started a new chain: the next one is incremental again.
        await guest.write("vda", 1 * MiB, 64 * KiB, 0x66)
        await _next_backup_restores(backups, guest, tmp_path, BackupMode.INCREMENTAL)


async def _next_backup_restores(
    backups: Backups, guest: Guest, tmp_path: Path, mode: BackupMode = BackupMode.AUTO
) -> BackupResult:
    """The next backup, restored and compared with every byte the guest holds now."""
    expected = guest.snapshot()
    result = await backups.run(guest.td.uuid, mode)
    await assert_restores(backups.repository, guest.td.name, result.backup_id, expected, tmp_path)
    return result


async def _assert_undone(
    cfg: AgentConfig, repo: Repository, guest: Guest, checkpoints_before: set[str], backups: int
) -> None:
    """A failed backup left nothing: no intent, scratch or staging file, no qemu-nbd,
    no new checkpoint, and the repository still holds ``backups`` backups."""
    assert _leftovers(cfg) == []
    assert live_processes_mentioning(str(cfg.repository_path)) == []
    assert await asyncio.to_thread(_checkpoint_names, guest) == checkpoints_before
    assert len(await repo.backups(guest.td.name)) == backups


async def _backup_killed_at(point: str, guest: Guest, agent_toml: Path) -> None:
    """`backup --local` in an agent process of its own that kills itself (SIGKILL) at
    crash point ``point``."""
    killed = await asyncio.to_thread(
        agent_cli,
        agent_toml,
        "backup",
        guest.td.name,
        "--local",
        env={**os.environ, CRASH_ENV: point},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr


def _leftovers(cfg: AgentConfig) -> list[Path]:
    places = [cfg.run_path / "jobs", cfg.scratch_path, cfg.repository_path]
    found = []
    for place in places:
        if place.exists():
            found += [
                p
                for p in place.rglob("*")
                if p.is_file()
                and ("jobs" in p.parts or p.parent == cfg.scratch_path or ".staging" in p.parts)
            ]
    return found


async def test_full_mode_starts_a_new_chain_that_increments_continue(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """`full` in the middle of a chain: a standalone backup (no parent), the next `auto`
    one incremental on top of it; every point restores."""
    async with running_agent(config(tmp_path)) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        backups, repo = run.agent.backups, run.agent.backups.repository
        points = {}
        for i, mode in enumerate(
            [BackupMode.AUTO, BackupMode.AUTO, BackupMode.FULL, BackupMode.AUTO]
        ):
            await guest.write("vda", i * 2 * MiB, 64 * KiB, 0x50 + i)
            await guest.write("sda", i * 3 * MiB, 4 * KiB, 0x58 + i)
            result = await backups.run(guest.td.uuid, mode)
            points[result.backup_id] = (
                guest.snapshot(),
                {(d.mode, d.reason) for d in result.disks},
            )
        modes = [m for _, m in points.values()]
        assert modes == [
            {("full", "first-backup")},
            {("incremental", None)},
            {("full", "full-requested")},
            {("incremental", None)},
        ]
        manifests = await repo.backups(guest.td.name)
        ids = [m.backup_id for m in manifests]
        assert [m.parent for m in manifests] == [None, ids[0], None, ids[2]]
        for backup_id, (expected, _) in points.items():
            await assert_restores(repo, guest.td.name, backup_id, expected, tmp_path)


async def test_agent_killed_halfway_through_the_copy(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    cfg = config(tmp_path, backup={"bandwidth_limit": 32 * MiB})
    agent_toml = config_file(tmp_path, cfg, f"[backup]\nbandwidth_limit = {32 * MiB}\n")
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        await guest.write("vda", 0, 8 * MiB, 0x71)
        await guest.write("sda", 0, 8 * MiB, 0x72)
        await run.agent.backups.run(guest.td.uuid)
        await guest.write("vda", 16 * MiB, 8 * MiB, 0x73)
        await guest.write("sda", 16 * MiB, 8 * MiB, 0x74)
        expected = guest.snapshot()
        before = await asyncio.to_thread(_checkpoint_names, guest)
    # Another agent process runs the next backup and is killed (SIGKILL) half-way.
    await _backup_killed_at("copy:half", guest, agent_toml)
    assert _leftovers(cfg), "the killed job left nothing behind; it cannot have been mid-copy"
    # Its qemu-nbd died with it: no orphan keeps serving (and holding) the staged images.
    await wait_until_async(lambda: not live_processes_mentioning(str(cfg.socket_path)), 10)
    async with running_agent(cfg) as run:  # start-up undoes the killed job
        assert _leftovers(cfg) == []
        jobs = await asyncio.to_thread(guest.td.dom().jobInfo)
        assert jobs[0] == 0, "the killed agent's libvirt backup job is still there"
        # Its checkpoint is gone from libvirt, and the ledger says it was discarded.
        assert await asyncio.to_thread(_checkpoint_names, guest) == before
        records = await run.agent.chains.ledger.checkpoints(guest.td.name)
        assert [r.state for r in records] == [CheckpointState.ACTIVE, CheckpointState.DISCARDED]
        result = await run.agent.backups.run(guest.td.uuid)
        assert {d.mode for d in result.disks} == {"incremental"}
        repo = run.agent.backups.repository
        await assert_restores(repo, guest.td.name, result.backup_id, expected, tmp_path)
        assert len(await repo.backups(guest.td.name)) == 2


async def test_agent_killed_right_after_publishing_keeps_the_backup(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """Killed between publishing a backup and marking it in the ledger: the next start
    rolls forward (the backup stands, its checkpoint is marked backed up), and the next
    backup is incremental from it."""
    cfg = config(tmp_path)
    agent_toml = config_file(tmp_path, cfg)
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        await guest.write("vda", 0, 2 * MiB, 0x65)
        first = await run.agent.backups.run(guest.td.uuid)
        await guest.write("sda", 4 * MiB, 1 * MiB, 0x66)
        at_kill = guest.snapshot()
    await _backup_killed_at("backup:published", guest, agent_toml)
    assert (cfg.run_path / "jobs").exists() and list((cfg.run_path / "jobs").iterdir())
    async with running_agent(cfg) as run:  # start-up rolls the published job forward
        assert _leftovers(cfg) == []
        repo = run.agent.backups.repository
        published = await repo.backups(guest.td.name)
        assert [m.parent for m in published] == [None, first.backup_id]
        await assert_restores(repo, guest.td.name, published[1].backup_id, at_kill, tmp_path)
        records = await run.agent.chains.ledger.checkpoints(guest.td.name)
        newest = next(r for r in records if r.name == published[1].checkpoint)
        assert newest.state is CheckpointState.ACTIVE and newest.backed_up_at is not None
        await guest.write("vda", 8 * MiB, 64 * KiB, 0x67)
        result = await _next_backup_restores(run.agent.backups, guest, tmp_path)
        assert {d.mode for d in result.disks} == {"incremental"}
        assert (await repo.backups(guest.td.name))[-1].parent == published[1].backup_id


async def test_a_failure_just_after_publishing_keeps_the_backup(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """A failure (a cancellation, say) between the publish and the rest of the job: the
    backup stands and its checkpoint is marked backed up; nothing is undone."""

    def fail_after_publish(point: str, /) -> None:
        if point == "backup:published" and armed:
            raise SimulatedCrash(point)

    armed = False
    async with running_agent(config(tmp_path), faults=fail_after_publish) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        backups, repo = run.agent.backups, run.agent.backups.repository
        await guest.write("vda", 0, 1 * MiB, 0x68)
        await backups.run(guest.td.uuid)
        await guest.write("sda", 2 * MiB, 64 * KiB, 0x69)
        at_failure = guest.snapshot()
        armed = True
        with pytest.raises(SimulatedCrash):
            await backups.run(guest.td.uuid)
        armed = False
        published = await repo.backups(guest.td.name)
        assert len(published) == 2
        await assert_restores(repo, guest.td.name, published[1].backup_id, at_failure, tmp_path)
        assert published[1].checkpoint in await asyncio.to_thread(_checkpoint_names, guest)
        records = await run.agent.chains.ledger.checkpoints(guest.td.name)
        assert records[-1].name == published[1].checkpoint
        assert records[-1].state is CheckpointState.ACTIVE and records[-1].backed_up_at
        assert _leftovers(run.agent.config) == []
        await guest.write("vda", 4 * MiB, 64 * KiB, 0x6A)
        result = await _next_backup_restores(backups, guest, tmp_path)
        assert {d.mode for d in result.disks} == {"incremental"}


async def test_a_job_failing_after_its_backup_was_marked_does_not_trust_chains_again(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """A backup published and marked in the ledger, whose job then failed (while pruning,
    here): the next start finishes the job without marking it again, so a chain broken
    meanwhile (a crash, a damaged backup) still makes that disk's next backup full."""

    def fail_pruning(point: str, /) -> None:
        if point == "prune:marked" and armed:
            raise SimulatedCrash(point)

    armed = False
    cfg = config(tmp_path)
    async with running_agent(cfg, faults=fail_pruning) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        backups, ledger = run.agent.backups, run.agent.chains.ledger
        await guest.write("vda", 0, 1 * MiB, 0x6B)
        await backups.run(guest.td.uuid)
        await guest.write("sda", 1 * MiB, 64 * KiB, 0x6C)
        armed = True
        with pytest.raises(SimulatedCrash):
            await backups.run(guest.td.uuid)
        armed = False
        assert len(await backups.repository.backups(guest.td.name)) == 2
        assert await backups.leftovers(), "the failed job's intent is left for the next start"
        await ledger.set_disk_chains(guest.td.name, {"vda": (False, "backup-corrupt", "test")})
    async with running_agent(cfg) as run:  # start-up finishes the job
        assert _leftovers(cfg) == []
        chain = (await run.agent.chains.ledger.disk_chains(guest.td.name))["vda"]
        assert (chain.valid, chain.reason) == (False, "backup-corrupt")
        await guest.write("vda", 3 * MiB, 64 * KiB, 0x6D)
        expected = guest.snapshot()
        result = await run.agent.backups.run(guest.td.uuid)
        assert {(d.target, d.mode, d.reason) for d in result.disks} == {
            ("vda", "full", "backup-corrupt"),
            ("sda", "incremental", None),
        }
        repo = run.agent.backups.repository
        await assert_restores(repo, guest.td.name, result.backup_id, expected, tmp_path)


async def test_a_backup_over_its_time_limit_is_undone(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """[backup] job_timeout: a backup still copying then fails with code timeout and is
    undone like any failure; the next one is incremental and restores."""
    cfg = config(tmp_path, backup={"job_timeout": 1.5, "bandwidth_limit": 4 * MiB})
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        backups, repo = run.agent.backups, run.agent.backups.repository
        await guest.write("vda", 0, 1 * MiB, 0x6E)
        await backups.run(guest.td.uuid)
        await guest.write("sda", 0, 16 * MiB, 0x6F)  # four seconds at 4 MiB/s
        before = await asyncio.to_thread(_checkpoint_names, guest)
        started = time.monotonic()
        with pytest.raises(BackupError) as timed_out:
            await backups.run(guest.td.uuid)
        assert timed_out.value.code == "timeout"
        assert time.monotonic() - started < 4, "not cut short by the time limit"
        await _assert_undone(cfg, repo, guest, before, backups=1)
        await wait_until_async(lambda: guest.td.dom().jobInfo()[0] == 0, 10)
    fast = config(tmp_path)
    async with running_agent(fast) as run:
        result = await _next_backup_restores(run.agent.backups, guest, tmp_path)
        assert {d.mode for d in result.disks} == {"incremental"}


async def test_qemu_killed_during_the_backup(domain_factory: DomainFactory, tmp_path: Path) -> None:
    cfg = config(tmp_path, backup={"bandwidth_limit": 16 * MiB})
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        backups, repo = run.agent.backups, run.agent.backups.repository
        await guest.write("vda", 0, 16 * MiB, 0x81)
        await backups.run(guest.td.uuid)
        await guest.write("sda", 0, 16 * MiB, 0x82)
        await guest.flush()
        before = await asyncio.to_thread(_checkpoint_names, guest)
        recorded = {r.name for r in await run.agent.chains.ledger.checkpoints(guest.td.name)}
        halfway = asyncio.Event()
        job = asyncio.create_task(
            backups.run(
                guest.td.uuid, progress=lambda done, total: done * 3 > total and halfway.set()
            )
        )
        await asyncio.wait_for(halfway.wait(), 60)
        await asyncio.to_thread(guest.td.crash)
        with pytest.raises(BackupError):
            await job
        assert _leftovers(cfg) == []
        assert len(await repo.backups(guest.td.name)) == 1
        mark = run.recorder.mark()
        await asyncio.to_thread(guest.td.start)
        await run.recorder.wait_for(lifecycle(guest.td.uuid, K.STARTED, "booted"), since=mark)
        # The failed job's checkpoint did not survive (in libvirt or as usable in the ledger).
        assert await asyncio.to_thread(_checkpoint_names, guest) <= before
        records = await run.agent.chains.ledger.checkpoints(guest.td.name)
        new = [r.state for r in records if r.name not in recorded]
        assert new in ([], [CheckpointState.DISCARDED]), new
        result = await _next_backup_restores(backups, guest, tmp_path)
        assert {(d.mode, d.reason) for d in result.disks} == {("full", "bitmap-inconsistent")}


def _checkpoint_names(guest: Guest) -> set[str]:
    return {cp.getName() for cp in guest.td.dom().listAllCheckpoints(0)}


async def test_failure_right_after_begin_undoes_the_images_prepared_meanwhile(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """The repository images are created and served while libvirt begins the job; a
    failure at that point must stop their qemu-nbd and remove them with the rest."""
    cfg = config(tmp_path)
    served_at_begin: list[list[int]] = []

    def crash_after_begin(point: str, /) -> None:
        # Called on the main loop; the images are prepared on the data plane's thread,
        # so waiting here (blocking) until their qemu-nbd serves makes the crash come
        # with them served, whatever the timing of libvirt's begin.
        if point == "backup:begun" and not served_at_begin:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                served = live_processes_mentioning(str(cfg.repository_path))
                if len(served) == 2:  # one qemu-nbd per disk
                    break
                time.sleep(0.01)
            served_at_begin.append(served)
            raise SimulatedCrash(point)

    async with running_agent(cfg, faults=crash_after_begin) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        backups, repo = run.agent.backups, run.agent.backups.repository
        await guest.write("vda", 0, 1 * MiB, 0x31)
        before = await asyncio.to_thread(_checkpoint_names, guest)
        with pytest.raises(SimulatedCrash):
            await backups.run(guest.td.uuid)
        assert served_at_begin, "the crash point was not reached"
        assert len(served_at_begin[0]) == 2, "the images were not served when begin returned"
        await _assert_undone(cfg, repo, guest, before, backups=0)
        # libvirt ends the aborted pull job when QEMU's block jobs report cancelled.
        await wait_until_async(lambda: guest.td.dom().jobInfo()[0] == 0, 10)
        result = await _next_backup_restores(backups, guest, tmp_path)
        assert {d.mode for d in result.disks} == {"full"}


async def test_begin_refused_leaves_nothing_and_the_next_backup_is_incremental(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """libvirt refuses to begin (another backup job runs on the domain): the images and
    the qemu-nbd the agent prepared meanwhile are gone, the chain is intact."""
    cfg = config(tmp_path)
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        backups, repo = run.agent.backups, run.agent.backups.repository
        await guest.write("vda", 0, 1 * MiB, 0x41)
        await backups.run(guest.td.uuid)
        await guest.write("sda", 2 * MiB, 64 * KiB, 0x42)
        await guest.flush()
        before = await asyncio.to_thread(_checkpoint_names, guest)
        foreign = (
            "<domainbackup mode='pull'>"
            f"<server transport='unix' socket='{tmp_path / 'foreign.sock'}'/>"
            "<disks><disk name='vda' backup='yes' type='file'>"
            f"<scratch file='{tmp_path / 'foreign-scratch.qcow2'}'/><driver type='qcow2'/>"
            "</disk><disk name='sda' backup='no'/></disks></domainbackup>"
        )
        await asyncio.to_thread(guest.td.dom().backupBegin, foreign, None, 0)
        try:
            with pytest.raises(BackupError) as refused:
                await backups.run(guest.td.uuid)
            # libvirt waits for the domain's job lock (30 s), then refuses.
            assert "begin backup" in str(refused.value), refused.value
            await _assert_undone(cfg, repo, guest, before, backups=1)
        finally:
            mark = run.recorder.mark()
            await asyncio.to_thread(guest.td.dom().abortJob)
        expected = guest.snapshot()
        # The foreign job's JOB_COMPLETED must be behind us before our next job waits
        # for its own.
        await run.recorder.wait_for(
            lambda e: isinstance(e, JobCompleted) and e.domain.uuid == guest.td.uuid, since=mark
        )
        await wait_until_async(lambda: guest.td.dom().jobInfo()[0] == 0, 10)
        result = await backups.run(guest.td.uuid)
        assert {d.mode for d in result.disks} == {"incremental"}
        await assert_restores(repo, guest.td.name, result.backup_id, expected, tmp_path)


async def test_disk_grown_between_plan_and_begin_fails_and_the_next_backup_copies_it_whole(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """libvirt said one size when the job was planned, QEMU exports another: the copy
    must not fit the export into an image of the planned size."""
    cfg = config(tmp_path)
    armed = asyncio.Event()
    grown: list[str] = []
    guest: Guest | None = None

    def grow_after_planning(point: str, /) -> None:
        if point == "backup:planned" and armed.is_set() and guest is not None and not grown:
            guest.resize("vda", SIZE + 1 * MiB)  # blocking, on the loop: this is a test
            grown.append(point)

    async with running_agent(cfg, faults=grow_after_planning) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        backups, repo = run.agent.backups, run.agent.backups.repository
        await guest.write("vda", 0, 1 * MiB, 0x51)
        await guest.write("sda", 0, 1 * MiB, 0x52)
        await backups.run(guest.td.uuid)
        armed.set()
        await guest.write("vda", SIZE - 64 * KiB, 64 * KiB, 0x53)
        before = await asyncio.to_thread(_checkpoint_names, guest)
        with pytest.raises(BackupError) as resized:
            await backups.run(guest.td.uuid)
        assert grown == ["backup:planned"]
        assert resized.value.code == "disk-resized", resized.value
        assert "vda" in str(resized.value)
        await _assert_undone(cfg, repo, guest, before, backups=1)
        await wait_until_async(lambda: guest.td.dom().jobInfo()[0] == 0, 10)
        # The grown disk's chain is broken (its size changed since the checkpoint): it is
        # copied whole, at its new size; the other disk stays incremental.
        await guest.write("vda", SIZE + 512 * KiB, 64 * KiB, 0x54)  # in the new megabyte
        expected = guest.snapshot()
        result = await backups.run(guest.td.uuid)
        assert {(d.target, d.mode, d.reason) for d in result.disks} == {
            ("vda", "full", "disk-resized"),
            ("sda", "incremental", None),
        }
        assert [d.virtual_size for d in result.disks if d.target == "vda"] == [SIZE + 1 * MiB]
        await assert_restores(repo, guest.td.name, result.backup_id, expected, tmp_path)


def flip_byte(image: Path, guest_offset: int) -> None:
    """Corrupt the byte the guest sees at ``guest_offset`` inside the qcow2 file itself."""
    mapping = subprocess.run(
        ["qemu-img", "map", "--output=json", str(image)], check=True, capture_output=True, text=True
    ).stdout
    extent = next(
        e
        for e in json.loads(mapping)
        if e["data"] and e["start"] <= guest_offset < e["start"] + e["length"]
    )
    host = extent["offset"] + (guest_offset - extent["start"])
    with open(image, "r+b") as handle:
        handle.seek(host)
        byte = handle.read(1)
        handle.seek(host)
        handle.write(bytes([byte[0] ^ 0xFF]))


@contextlib.asynccontextmanager
async def tmpfs(path: Path, size: str) -> AsyncIterator[Path]:
    await asyncio.to_thread(path.mkdir)
    await asyncio.to_thread(
        subprocess.run,
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(path)], check=True)


@pytest.mark.parametrize("small_one", ["repository", "scratch directory"])
async def test_too_small_a_filesystem_is_refused_before_anything_starts(
    domain_factory: DomainFactory, tmp_path: Path, small_one: str
) -> None:
    """The repository, or the scratch directory (a full one pauses the guest), cannot
    hold the worst case: refused before anything starts; once it is larger, it works."""
    async with tmpfs(tmp_path / "small", "32M") as small:
        place = small / "here"
        if small_one == "repository":
            cfg = config(tmp_path, repository={"path": str(place)})
        else:
            cfg = config(tmp_path, backup={"scratch_dir": str(place)})
        async with running_agent(cfg) as run:
            guest = await started_guest(run, domain_factory, TWO_DISKS)
            await guest.write("vda", 0, 1 * MiB, 0x91)
            with pytest.raises(RepositorySpaceError) as refused:
                await run.agent.backups.run(guest.td.uuid)
            assert f"{small_one} {place} has " in str(refused.value), str(refused.value)
            assert "refusing" in str(refused.value)
            assert await asyncio.to_thread(guest.td.dom().listAllCheckpoints) == []
            assert _leftovers(cfg) == []
            await asyncio.to_thread(
                subprocess.run, ["mount", "-o", "remount,size=512M", str(small)], check=True
            )
            result = await _next_backup_restores(run.agent.backups, guest, tmp_path)
            assert {(d.mode, d.reason) for d in result.disks} == {("full", "first-backup")}


async def test_repository_filling_up_during_the_copy_is_undone(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """The space check passed, then the repository filled up (another writer, a shared
    filesystem): the copy fails on the full filesystem, everything is undone, and once
    there is room again the next backup is incremental (the chain survived) and restores."""
    async with tmpfs(tmp_path / "small", "200M") as small:
        cfg = config(tmp_path, repository={"path": str(small / "repo")})
        filler = small / "filler"
        filled: list[int] = []

        def fill_at_begin(point: str, /) -> None:
            # On the main loop, while the images are prepared on the data plane's thread:
            # once both are served (one qemu-nbd per disk), leave 256 KiB free.
            if point != "backup:begun" or not armed:
                return
            deadline = time.monotonic() + 10
            while len(live_processes_mentioning(str(small))) < 2:
                assert time.monotonic() < deadline, "the images were not served"
                time.sleep(0.01)
            filled.append(_fill(filler, leave=256 * KiB))

        armed = False
        async with running_agent(cfg, faults=fill_at_begin) as run:
            guest = await started_guest(run, domain_factory, TWO_DISKS)
            backups, repo = run.agent.backups, run.agent.backups.repository
            await guest.write("vda", 0, 1 * MiB, 0x61)
            first = await backups.run(guest.td.uuid)
            await guest.write("vda", 8 * MiB, 4 * MiB, 0x62)
            await guest.write("sda", 0, 4 * MiB, 0x63)
            before = await asyncio.to_thread(_checkpoint_names, guest)
            armed = True
            with pytest.raises(BackupError) as failed:
                await backups.run(guest.td.uuid)
            armed = False
            assert filled, "the fault point was not reached"
            assert failed.value.code == "copy-failed"
            assert "ENOSPC" in str(failed.value), str(failed.value)
            await _assert_undone(cfg, repo, guest, before, backups=1)

            await asyncio.to_thread(filler.unlink)
            expected = guest.snapshot()
            result = await backups.run(guest.td.uuid)
            assert {(d.mode, d.reason) for d in result.disks} == {("incremental", None)}
            (manifest,) = [m for m in await repo.backups(guest.td.name) if m.parent]
            assert manifest.backup_id == result.backup_id and manifest.parent == first.backup_id
            await assert_restores(repo, guest.td.name, result.backup_id, expected, tmp_path)


def _fill(path: Path, *, leave: int) -> int:
    """Allocate a file taking all but ``leave`` bytes of its filesystem's free space."""
    stats = os.statvfs(path.parent)
    size = stats.f_bavail * stats.f_frsize - leave
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return size


async def test_verify_names_a_corrupted_byte(domain_factory: DomainFactory, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, [DiskSpec("vda", "virtio")])
        await guest.write("vda", 4 * MiB, 64 * KiB, 0xE1)
        result = await run.agent.backups.run(guest.td.uuid)
    image = cfg.repository_path / guest.td.name / "backups" / result.backup_id / "vda.qcow2"
    await asyncio.to_thread(flip_byte, image, 4 * MiB + 1000)
    agent_toml = config_file(tmp_path, cfg)
    out = await asyncio.to_thread(agent_cli, agent_toml, "verify", guest.td.name)
    assert out.returncode == 1
    assert str(image) in out.stdout or "vda.qcow2" in out.stdout
    assert str(4 * MiB) in out.stdout, out.stdout
    # The next backup does not build on the damage: vda starts a new chain.
    assert "vda: its next backup copies it in full (backup-corrupt)" in out.stderr, out.stderr
    async with running_agent(cfg) as run:
        await guest.write("vda", 8 * MiB, 64 * KiB, 0xE2)
        after = await _next_backup_restores(run.agent.backups, guest, tmp_path)
        assert [(d.mode, d.reason) for d in after.disks] == [("full", "backup-corrupt")]


async def test_retention_keeps_the_last_two_restorable(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    # Per domain (test domains are named lbat-*), over a default that keeps everything.
    cfg = config(tmp_path, retention={"keep_last": 0, "domains": {"lbat-*": 2}})
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        backups, repo = run.agent.backups, run.agent.backups.repository
        points = {}
        modes = []
        for i in range(5):
            await guest.write("vda", i * 4 * MiB, 1 * MiB, 0x10 + i)
            await guest.write("sda", (i * 4 + 1) * MiB, 64 * KiB, 0x20 + i)
            result = await backups.run(guest.td.uuid)
            points[result.backup_id] = guest.snapshot()
            modes.append({d.mode for d in result.disks})
        # One chain (so dropping backups had to merge what the later ones need).
        assert modes == [{"full"}] + [{"incremental"}] * 4
        kept = await repo.backups(guest.td.name)
        assert [m.backup_id for m in kept] == list(points)[-2:]
        assert kept[0].parent is None and kept[1].parent == kept[0].backup_id
        for manifest in kept:
            await assert_restores(
                repo, guest.td.name, manifest.backup_id, points[manifest.backup_id], tmp_path
            )
        assert await repo.verify(guest.td.name) == []


async def test_cli_lists_and_restores(domain_factory: DomainFactory, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        await guest.write("vda", 6 * MiB, 64 * KiB, 0xF1)
        await guest.write("sda", 2 * MiB, 64 * KiB, 0xF2)
        expected = guest.snapshot()
        result = await run.agent.backups.run(guest.td.uuid)
    agent_toml = config_file(tmp_path, cfg)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return agent_cli(agent_toml, *args)

    listed = await asyncio.to_thread(cli, "backups", guest.td.name, "--json")
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry["id"] == result.backup_id and entry["mode"] == "full"
    assert {d["target"] for d in entry["disks"]} == {"vda", "sda"}
    out_dir = tmp_path / "restored"
    restored = await asyncio.to_thread(
        cli,
        "restore",
        guest.td.name,
        "--backup",
        result.backup_id,
        "--to",
        str(out_dir),
        "--format",
        "raw",
    )
    assert restored.returncode == 0, restored.stderr
    for target, content in expected.items():
        assert (out_dir / f"{target}.raw").read_bytes() == content
    missing = await asyncio.to_thread(
        cli,
        "restore",
        guest.td.name,
        "--backup",
        result.backup_id,
        "--disk",
        "vdz",
        "--to",
        str(tmp_path / "x.raw"),
    )
    assert missing.returncode == 1 and "has no disk 'vdz'" in missing.stderr


async def wait_until_async(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(predicate):
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_a_recovery_sweep_during_a_backup_leaves_its_staging_alone(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """Recovery's sweep of staging leftovers runs while the agent takes jobs (at start,
    on every reconnection, on its back-off): it must not remove a running backup's staged
    images, while it still removes one that no job owns."""
    cfg = config(tmp_path, backup={"bandwidth_limit": 8 * MiB})
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        backups, repo = run.agent.backups, run.agent.backups.repository
        await guest.write("vda", 0, 8 * MiB, 0x7A)
        expected = guest.snapshot()
        backups_dir = cfg.repository_path / guest.td.name / "backups"
        running = asyncio.create_task(backups.run(guest.td.uuid))
        await wait_until_async(
            lambda: any(p.name.startswith(".staging-") for p in backups_dir.glob(".*")), 30
        )
        # A leftover of a killed job in another domain's directory: the sweep's work.
        stale = cfg.repository_path / "gone" / "backups" / ".staging-20260101T000000Z-abcdef"
        stale.mkdir(parents=True)
        removed = await backups.sweep_staging()
        assert removed == [stale] and not stale.exists()
        assert not running.done(), "the backup ended before the sweep; the test proves nothing"
        result = await running
        await assert_restores(repo, guest.td.name, result.backup_id, expected, tmp_path)
