"""libvirtd SIGKILLed while a backup copies, then started again.

libvirt, reconnecting to QEMU, restores the backup job and keeps it; until someone calls
``virDomainAbortJob`` every later ``backupBegin`` of the domain fails ("cannot acquire
state change lock"). The agent's job fails with a clear error, its undo cannot end
libvirt's job while libvirtd is away, and must do so once libvirtd answers again, then
remove the scratch files; the next backup succeeds without restarting anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import libvirt
import pytest

from agent.core.errors import BackupError
from agent.core.faults import CRASH_ENV
from agent.virt.connection import ConnState
from agent.virt.events import JobCompleted
from tests.guest_model import (
    Guest,
    MiB,
    agent_cli,
    assert_restores,
    config,
    config_file,
    started_guest,
)
from tests.harness import TWO_DISKS, RunningAgent, running_agent
from tests.testbed import daemon
from tests.testbed.domains import DomainFactory

pytestmark = [pytest.mark.libvirt, pytest.mark.faults]

FAST_RECONNECT = {"reconnect_initial_delay": 0.5, "reconnect_max_delay": 1.0}


def _job_type(uuid: str) -> int:
    """libvirt's job of the domain, read on a connection of the test's own."""
    conn = libvirt.open(daemon.URI)
    try:
        return int(conn.lookupByUUIDString(uuid).jobInfo()[0])
    finally:
        conn.close()


def _files_under(*places: Path) -> list[Path]:
    return [p for place in places if place.exists() for p in place.rglob("*") if p.is_file()]


async def _until(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.1)


async def test_libvirtd_killed_mid_copy_job_fails_then_its_libvirt_job_is_aborted(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    killed = threading.Event()  # the hook may run on the data plane's thread

    def kill_libvirtd_at_half(point: str, /) -> None:
        if point == "copy:half" and not killed.is_set():
            daemon.kill_libvirtd()
            killed.set()

    cfg = config(tmp_path, libvirt=FAST_RECONNECT, backup={"bandwidth_limit": 16 * MiB})
    try:
        async with running_agent(cfg, faults=kill_libvirtd_at_half) as run:
            agent = run.agent
            guest = await started_guest(run, domain_factory, TWO_DISKS)
            await guest.write("vda", 0, 4 * MiB, 0x41)
            await guest.write("sda", 0, 4 * MiB, 0x42)
            killed.set()  # not during the first backup
            await agent.backups.run(guest.td.uuid)
            await guest.write("vda", 8 * MiB, 8 * MiB, 0x43)
            await guest.write("sda", 8 * MiB, 8 * MiB, 0x44)
            expected = guest.snapshot()
            killed.clear()

            with pytest.raises(BackupError) as failed:
                await agent.backups.run(guest.td.uuid)
            assert killed.is_set(), "libvirtd was not killed mid-copy; the test proves nothing"
            assert failed.value.code == "libvirt-lost", failed.value
            assert "libvirtd answers again" in str(failed.value)
            # The undo could not end libvirt's job: its intent and scratch files stay.
            assert list((cfg.run_path / "jobs").glob("*.json"))
            assert agent.recovery.recovering, "the pending undo is not tracked"

            await asyncio.to_thread(daemon.start_libvirtd)
            # libvirt restored the backup job from QEMU; the agent aborts it on its own.
            await _until(lambda: agent.connection.state is ConnState.CONNECTED, 30, "reconnect")
            await _until(lambda: not agent.recovery.recovering, 60, "the undo after reconnect")
            assert _job_type(guest.td.uuid) == libvirt.VIR_DOMAIN_JOB_NONE
            assert _files_under(cfg.run_path / "jobs", cfg.scratch_path) == []

            # The next backup succeeds without restarting anything, and restores exactly.
            result = await agent.backups.run(guest.td.uuid)
            assert {d.mode for d in result.disks} == {"incremental"}
            repo = agent.backups.repository
            await assert_restores(repo, guest.td.name, result.backup_id, expected, tmp_path)
            assert _job_type(guest.td.uuid) == libvirt.VIR_DOMAIN_JOB_NONE
    finally:
        await asyncio.to_thread(daemon.ensure_libvirtd)


async def test_agent_and_libvirtd_both_killed_mid_copy(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """The agent dies (kill -9) mid-copy, then libvirtd is SIGKILLed and started again, so
    that libvirt holds the restored job: the next agent's start aborts it."""
    cfg = config(tmp_path, libvirt=FAST_RECONNECT, backup={"bandwidth_limit": 16 * MiB})
    agent_toml = config_file(tmp_path, cfg, f"[backup]\nbandwidth_limit = {16 * MiB}\n")
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        await guest.write("vda", 0, 8 * MiB, 0x51)
        await run.agent.backups.run(guest.td.uuid)
        await guest.write("sda", 0, 16 * MiB, 0x52)
        expected = guest.snapshot()
    try:
        killed = await asyncio.to_thread(
            agent_cli,
            agent_toml,
            "backup",
            guest.td.name,
            "--local",
            env={**os.environ, CRASH_ENV: "copy:half"},
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        await asyncio.to_thread(daemon.restart_libvirtd)
        assert _job_type(guest.td.uuid) != libvirt.VIR_DOMAIN_JOB_NONE, (
            "libvirt did not keep the backup job over its restart; the test proves nothing"
        )
    finally:
        await asyncio.to_thread(daemon.ensure_libvirtd)
    async with running_agent(cfg) as run:
        assert run.agent.recovery.recovering == {}
        assert _job_type(guest.td.uuid) == libvirt.VIR_DOMAIN_JOB_NONE
        assert _files_under(cfg.run_path / "jobs", cfg.scratch_path) == []
        result = await run.agent.backups.run(guest.td.uuid)
        assert {d.mode for d in result.disks} == {"incremental"}
        repo = run.agent.backups.repository
        await assert_restores(repo, guest.td.name, result.backup_id, expected, tmp_path)
        assert _job_type(guest.td.uuid) == libvirt.VIR_DOMAIN_JOB_NONE


class _StopAtBegin:
    """A fault hook: SIGSTOP libvirtd as the armed backup begins, SIGCONT it ``resume``
    seconds later (on a timer thread; the hook may run on the data plane's thread)."""

    def __init__(self, resume: float) -> None:
        self.resume = resume
        self.stopped = threading.Event()
        self.stopped.set()  # disarmed

    def __call__(self, point: str, /) -> None:
        if point == "backup:beginning" and not self.stopped.is_set():
            self.stopped.set()
            pid = daemon.libvirtd_pid()
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(self.resume, os.kill, (pid, signal.SIGCONT)).start()


@contextlib.asynccontextmanager
async def _begin_stalls(
    domain_factory: DomainFactory, tmp_path: Path, *, call_timeout: float, resume: float
) -> AsyncIterator[tuple[RunningAgent, Guest, _StopAtBegin, dict[str, bytes]]]:
    """An agent whose next backup begins while libvirtd is stopped, on a guest with one
    backup made and writes since (``expected``); libvirtd is resumed at the end, always."""
    hook = _StopAtBegin(resume)
    cfg = config(tmp_path, libvirt={"call_timeout": call_timeout, **FAST_RECONNECT})
    try:
        async with running_agent(cfg, faults=hook) as run:
            guest = await started_guest(run, domain_factory, TWO_DISKS)
            await guest.write("vda", 0, 2 * MiB, 0x61)
            await run.agent.backups.run(guest.td.uuid)
            await guest.write("sda", 0, 2 * MiB, 0x62)
            expected = guest.snapshot()
            hook.stopped.clear()  # armed
            yield run, guest, hook, expected
    finally:
        pid = daemon.libvirtd_pid()
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        await asyncio.to_thread(daemon.ensure_libvirtd)


async def _started_job_ended_then_next_restores(
    run: RunningAgent, guest: Guest, since: int, expected: dict[str, bytes], tmp_path: Path
) -> None:
    """libvirt started the job once it ran again (its JOB_COMPLETED is seen), the undo
    ended it and left nothing; the next backup is incremental and restores exactly."""
    agent, cfg = run.agent, run.agent.config
    await run.recorder.wait_for(
        lambda e: isinstance(e, JobCompleted) and e.domain.uuid == guest.td.uuid,
        timeout=60,
        since=since,
    )
    await _until(lambda: not agent.recovery.recovering, 60, "the undo")
    assert _job_type(guest.td.uuid) == libvirt.VIR_DOMAIN_JOB_NONE
    assert _files_under(cfg.run_path / "jobs", cfg.scratch_path) == []
    result = await agent.backups.run(guest.td.uuid)
    assert {d.mode for d in result.disks} == {"incremental"}
    repo = agent.backups.repository
    await assert_restores(repo, guest.td.name, result.backup_id, expected, tmp_path)
    assert _job_type(guest.td.uuid) == libvirt.VIR_DOMAIN_JOB_NONE


async def test_begin_that_times_out_here_while_libvirt_starts_the_job(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """libvirtd stopped (SIGSTOP) just as the backup begins: ``backupBegin`` times out on
    the agent's side (``call_timeout``), then libvirtd resumes and starts the job after
    all. The undo must wait for that call and abort the job it started."""
    stalls = _begin_stalls(domain_factory, tmp_path, call_timeout=2.0, resume=3.5)
    async with stalls as (run, guest, hook, expected):
        since = run.recorder.mark()
        with pytest.raises(BackupError) as failed:
            await run.agent.backups.run(guest.td.uuid)
        assert hook.stopped.is_set()
        assert "begin backup: no answer from libvirt" in str(failed.value), failed.value
        await _started_job_ended_then_next_restores(run, guest, since, expected, tmp_path)


async def test_backup_cancelled_while_libvirt_has_not_answered_its_begin(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """The job is cancelled (an operator's cancel, a deadline) while ``backupBegin`` waits
    on a stopped libvirtd; libvirtd resumes and starts the job after all. The undo waits
    for the begin call and aborts that job: none is left, and the next backup works."""
    stalls = _begin_stalls(domain_factory, tmp_path, call_timeout=30.0, resume=3.0)
    async with stalls as (run, guest, hook, expected):
        since = run.recorder.mark()
        backup = asyncio.create_task(run.agent.backups.run(guest.td.uuid))
        await _until(hook.stopped.is_set, 30, "the begin")
        await asyncio.sleep(1.0)  # the begin call is in flight, libvirtd stopped
        backup.cancel()
        with pytest.raises(asyncio.CancelledError):
            await backup
        await _started_job_ended_then_next_restores(run, guest, since, expected, tmp_path)
