"""The agent killed -9 at every crash point of a backup; the next start cleans up after it.

Each case runs a real agent process (``python -m agent run``) on a fresh two-disk domain:
a first backup, more guest writes, then a backup requested over the API from an agent
started with ``BACKUP_AGENT_CRASH_AT=<point>``, which SIGKILLs itself there. The agent
is started again, and once it says it is ready (and recovering nothing) the test checks
what a broken recovery gets wrong:

- the killed job is over: ``failed``, ``agent-restarted`` before its backup was
  published; after it, ``succeeded`` with that backup, which stands (in the repository,
  its checkpoint marked backed up, restoring what the guest held when it began);
- libvirt has no job on the domain (a left-over backup job makes every later
  ``backupBegin`` fail "cannot acquire state change lock");
- libvirt's checkpoints are exactly the ledger's active ones, and those are the ones
  the crash point implies: the unfinished checkpoint deleted (discarded in the ledger),
  or, once published, kept with the older one pruned;
- no scratch file, socket, intent (the job's or retention's), staged, merged or dropped
  directory is left, and no qemu-nbd still serves the killed job's images.

Then the next backup is incremental from the right parent and ``backup-agent restore``
gives back, byte for byte, what the guest held.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest

from agent.core.config import AgentConfig, load_config
from agent.core.faults import CRASH_ENV
from tests.guest_model import Guest, KiB, MiB, assert_cli_restores
from tests.harness import TWO_DISKS
from tests.testbed.agent_process import AgentProcess, agent_process
from tests.testbed.daemon import live_processes_mentioning
from tests.testbed.domains import DomainFactory, TestDomain

pytestmark = [pytest.mark.libvirt, pytest.mark.faults]

AGENT_RESTARTED = "agent-restarted"
_RECOVERING_GAUGE = "backup_agent_domains_recovering"
# A disk's repository image served by a local qemu-nbd: <backup-id>-<target>.sock[.pid]
_DATA_PLANE = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]+-[^.]+\.sock(\.pid)?")


class LeftoverFilesError(AssertionError):
    """Files a job or retention has only while it runs are there once it is over."""


class StaleDataPlaneFilesError(AssertionError):
    """The sockets and pid files of a killed job's qemu-nbd servers are still there."""


@dataclass(frozen=True)
class Case:
    """One crash point and what the killed agent has done by then."""

    point: str
    job_left: bool  # libvirt's backup job still runs when the agent dies
    published: bool  # the backup is in the repository when the agent dies
    settings: Mapping[str, Any] = field(default_factory=dict)
    marks: tuple[pytest.MarkDecorator, ...] = ()
    first_mib: int = 8  # written to each disk before the first backup

    @property
    def keeps_one(self) -> bool:
        """[retention] keep_last = 1: each backup's retention drops the one before."""
        return bool(self.settings.get("retention", {}).get("keep_last") == 1)

    @property
    def listed_at_kill(self) -> int:
        """Backup directories the repository lists when the agent dies: the first
        backup's, and the killed one's once published, unless retention dropped the first
        (renamed away) already."""
        if self.point.startswith(("retention:dropped:", "retention:deleted:")):
            return 1
        return 2 if self.published else 1


CASES = [
    # Mid-copy: a bandwidth limit keeps the copy of 16 MiB going for a while, so that
    # the half-way report comes from a copy still in flight.
    Case(
        "copy:half",
        job_left=True,
        published=False,
        settings={"backup": {"bandwidth_limit": 32 * MiB}},
    ),
    Case("backup:copied", job_left=True, published=False),
    Case("backup:ended", job_left=False, published=False),
    Case("backup:published", job_left=False, published=True),
    Case("backup:marked", job_left=False, published=True),
    # keep_last = 1 with a backup before: the crashed backup's retention drops it, and
    # the agent dies at each step of it (a step of a disk's merge: the first disk's;
    # the other is not merged yet).
    *(
        Case(
            point,
            job_left=False,
            published=True,
            settings={"retention": {"keep_last": 1}},
            # Enough to merge that finishing the retention outlasts the agent's start.
            first_mib=48,
        )
        for point in (
            "retention:intent-written",
            "retention:merged:*",
            "retention:replaced:*",
            "retention:manifest-replaced:*",
            "retention:dropped:*",
            "retention:deleted:*",
        )
    ),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.point, marks=c.marks) for c in CASES])
async def test_agent_killed_at_a_crash_point_is_cleaned_up_at_the_next_start(
    case: Case, domain_factory: DomainFactory, tmp_path: Path
) -> None:
    with agent_process(tmp_path, case.settings) as agent:
        td = await asyncio.to_thread(domain_factory, persistent=True, disks=TWO_DISKS)
        guest = Guest(td)
        cfg = load_config(agent.config)
        try:
            await _run_case(case, agent, cfg, guest, tmp_path)
        finally:
            await asyncio.to_thread(agent.stop)
            await asyncio.to_thread(_remove_own_socket_dir, cfg)


async def _run_case(
    case: Case, agent: AgentProcess, cfg: AgentConfig, guest: Guest, tmp_path: Path
) -> None:
    history = await _first_backup_then_writes(agent, guest, case.first_mib * MiB)
    killed = await _backup_killed(case, agent, cfg, guest.td, history)
    await asyncio.to_thread(agent.start)
    await asyncio.to_thread(_wait_recovered, agent)
    parent = await _recovered(case, agent, cfg, guest.td, killed, tmp_path)
    await _next_backup_restores(case, agent, cfg, guest, parent, tmp_path)
    await asyncio.to_thread(_data_plane_leftovers, cfg)


@dataclass(frozen=True)
class History:
    """What the domain went through before the backup the agent dies in."""

    first: str  # the first backup's id
    checkpoints: set[str]  # libvirt's checkpoints after it: the first backup's
    at_kill: dict[str, bytes]  # what the guest's disks held when the killed backup began


@dataclass(frozen=True)
class Killed:
    history: History
    checkpoint: str  # the one the killed backup created


async def _first_backup_then_writes(agent: AgentProcess, guest: Guest, data: int) -> History:
    """A first backup (full), then the writes the killed backup is an increment of."""
    await guest.write("vda", 0, data, 0x71)
    await guest.write("sda", 0, data, 0x72)
    await asyncio.to_thread(agent.start)
    first = await _backup(agent, "first", guest.td.name)
    assert [d["mode"] for d in first["disks"]] == ["full", "full"], first
    await asyncio.to_thread(agent.terminate)
    checkpoints = await asyncio.to_thread(_libvirt_checkpoints, guest.td)
    assert len(checkpoints) == 1, checkpoints
    await guest.write("vda", 16 * MiB, 8 * MiB, 0x73)
    await guest.write("sda", 16 * MiB, 8 * MiB, 0x74)
    return History(first["backup_id"], checkpoints, guest.snapshot())


async def _backup_killed(
    case: Case, agent: AgentProcess, cfg: AgentConfig, td: TestDomain, history: History
) -> Killed:
    """The backup the agent (started with the crash point) dies in, requested over the API."""
    await asyncio.to_thread(agent.start, extra_env={CRASH_ENV: case.point})
    body = {"id": "crashed", "kind": "backup", "domain": td.name}
    status, job = await asyncio.to_thread(agent.call, "POST", "/v1/jobs", body)
    assert status == 201, job
    exit_status = await asyncio.to_thread(agent.wait_exit, 60)
    assert exit_status == -signal.SIGKILL, f"not killed at {case.point}:\n{agent.tail()}"
    checkpoint = await asyncio.to_thread(_what_the_kill_left, case, cfg, td, history.checkpoints)
    return Killed(history, checkpoint)


async def _recovered(
    case: Case, agent: AgentProcess, cfg: AgentConfig, td: TestDomain, killed: Killed, tmp: Path
) -> str:
    """After the restart: the killed job over, the domain clean, the backup that stands
    restoring; its id (the next backup's parent)."""
    job = await asyncio.to_thread(_crashed_job, agent, case)
    expected = {killed.checkpoint} if case.published else killed.history.checkpoints
    await asyncio.to_thread(_assert_clean, agent, cfg, td, expected)
    backups = await _backups(agent, td.name)
    if not case.published:
        assert [b["id"] for b in backups] == [killed.history.first], backups
        records = await _ledger(agent, td.name)
        assert records[killed.checkpoint]["state"] == "discarded", records
        return killed.history.first
    published = _published_backup(case, backups, killed.history.first, killed.checkpoint)
    assert job["backup_id"] == published, job
    await assert_cli_restores(agent.config, td.name, published, killed.history.at_kill, tmp)
    return published


async def _next_backup_restores(
    case: Case, agent: AgentProcess, cfg: AgentConfig, guest: Guest, parent: str, tmp: Path
) -> None:
    """The next backup: incremental from the backup that stands, restoring exactly."""
    td = guest.td
    await guest.write("vda", 40 * MiB, 64 * KiB, 0x75)
    await guest.write("sda", 63 * MiB, 1 * MiB, 0x76)
    final = guest.snapshot()
    after = await _backup(agent, "next", td.name)
    assert [d["mode"] for d in after["disks"]] == ["incremental", "incremental"], after
    listed = await _backups(agent, td.name)
    newest = listed[-1]
    if case.keeps_one:  # the next backup's retention merged it with its parent
        assert [b["id"] for b in listed] == [after["backup_id"]], listed
        assert newest["parent"] is None, newest
    else:
        assert newest["id"] == after["backup_id"] and newest["parent"] == parent, newest
    await asyncio.to_thread(_assert_clean, agent, cfg, td, {newest["checkpoint"]})
    await assert_cli_restores(agent.config, td.name, after["backup_id"], final, tmp)


# -- the crash -------------------------------------------------------------------------


def _what_the_kill_left(case: Case, cfg: AgentConfig, td: TestDomain, before: set[str]) -> str:
    """Check the agent died where it should have (else the case tests nothing); the
    name of the checkpoint its backup created."""
    intents = list((cfg.run_path / "jobs").glob("*.json"))
    assert len(intents) == 1, f"killed at {case.point}, the job's intent should be left: {intents}"
    job_type = td.dom().jobInfo()[0]
    if case.job_left:
        assert job_type != libvirt.VIR_DOMAIN_JOB_NONE, "no libvirt job was left to clean up"
    else:
        assert job_type == libvirt.VIR_DOMAIN_JOB_NONE, f"libvirt job type {job_type} at kill"
    new = _libvirt_checkpoints(td) - before
    assert len(new) == 1, f"the killed backup's checkpoint should be in libvirt: {new}"
    published = list((cfg.repository_path / td.name / "backups").glob("[0-9]*"))
    assert len(published) == case.listed_at_kill, published
    return new.pop()


def _wait_recovered(agent: AgentProcess, timeout: float = 60) -> None:
    """Until ``/readyz`` answers 200 and names no domain still recovering."""
    deadline = time.monotonic() + timeout
    body: Any = None
    while time.monotonic() < deadline:
        status, body = agent.call("GET", "/readyz")
        if status == 200 and not body.get("recovering"):
            return
        time.sleep(0.02)  # the clean-up is checked the moment the agent says it is over
    raise AssertionError(f"the agent did not recover within {timeout} s: {body}\n{agent.tail()}")


def _crashed_job(agent: AgentProcess, case: Case) -> dict[str, Any]:
    job = agent.wait_job("crashed", {"succeeded", "failed", "cancelled"}, 60)
    if case.published:  # its backup stands: the job says so, with it
        assert job["state"] == "succeeded", job
        assert job["result"]["finished_by"] == "start-up recovery", job
        return job
    assert job["state"] == "failed", job
    assert job["error"]["code"] == AGENT_RESTARTED, job
    return job


def _published_backup(
    case: Case, backups: list[dict[str, Any]], first_id: str, checkpoint: str
) -> str:
    """The crashed job's backup stands: in the repository, on the new checkpoint."""
    ids = [b["id"] for b in backups]
    if case.point.startswith("retention:"):
        # The retention the killed agent had begun was finished: the first backup gone,
        # the crashed one on its own (its images merged with what it sat on).
        assert len(backups) == 1 and first_id not in ids, backups
        assert backups[0]["parent"] is None, backups
    else:
        assert len(backups) == 2 and ids[0] == first_id, backups
        assert backups[1]["parent"] == first_id, backups
    assert backups[-1]["checkpoint"] == checkpoint, backups
    return str(backups[-1]["id"])


# -- what a clean domain looks like ------------------------------------------------------


def _assert_clean(
    agent: AgentProcess, cfg: AgentConfig, td: TestDomain, expected: set[str]
) -> None:
    """No libvirt job; libvirt's checkpoints are the ledger's active ones, ``expected``;
    nothing left on disk or running for a job that is over."""
    assert td.dom().jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE, "a libvirt job is left"
    in_libvirt = _libvirt_checkpoints(td)
    status, body = agent.call("GET", f"/v1/domains/{td.name}/checkpoints")
    assert status == 200, body
    states = {r["name"]: r["state"] for r in body["checkpoints"]}
    active = {name for name, state in states.items() if state == "active"}
    assert in_libvirt == active == expected, (in_libvirt, states, expected)
    unfinished = {name: state for name, state in states.items() if state in ("pending", "pruning")}
    assert not unfinished, unfinished
    for name in expected:
        assert next(r for r in body["checkpoints"] if r["name"] == name)["backed_up_at"]
    if leftovers := _leftovers(cfg, td.name):
        raise LeftoverFilesError(f"left behind: {leftovers}")
    # A qemu-nbd that outlived the killed agent would still serve (and lock) staged images.
    assert not live_processes_mentioning(str(cfg.repository_path / td.name))
    assert _recovering_gauge(agent) in (None, 0.0)


def _leftovers(cfg: AgentConfig, domain: str) -> list[str]:
    """Files a job (or retention) leaves only while it runs, but for the data plane's
    (:func:`_data_plane_leftovers`)."""
    found = [
        *(cfg.run_path / "jobs").glob("*"),
        *cfg.scratch_path.glob("*"),
        *(p for p in cfg.socket_path.glob("*.sock*") if not _DATA_PLANE.fullmatch(p.name)),
        *(cfg.repository_path / domain / "backups").glob(".*"),  # .staging-, .merge-, .dropped-
        *(cfg.repository_path / domain).glob("retention.json*"),
    ]
    return sorted(str(p) for p in found)


def _data_plane_leftovers(cfg: AgentConfig) -> None:
    """The sockets and pid files of the local qemu-nbd that served each disk's
    repository image (``<backup-id>-<target>.sock``, ``.sock.pid``): the job's intent
    does not name them, so nothing removes those of a killed job. Checked last, so that
    a case failing here has passed every other check."""
    stale = sorted(p.name for p in cfg.socket_path.glob("*.sock*") if _DATA_PLANE.fullmatch(p.name))
    if stale:
        raise StaleDataPlaneFilesError(f"left in {cfg.socket_path}: {stale}")


def _recovering_gauge(agent: AgentProcess) -> float | None:
    """The sum of ``backup_agent_domains_recovering`` on /metrics; None if there is none."""
    status, text = agent.call("GET", "/metrics")
    assert status == 200, text
    values = [
        float(line.rpartition(" ")[2])
        for line in str(text).splitlines()
        if line.startswith(_RECOVERING_GAUGE)
    ]
    return sum(values) if values else None


def _libvirt_checkpoints(td: TestDomain) -> set[str]:
    return {c.getName() for c in td.dom().listAllCheckpoints()}


def _remove_own_socket_dir(cfg: AgentConfig) -> None:
    # A deep state directory's sockets live in a /run directory named after it: ours.
    if cfg.socket_path != cfg.run_path and cfg.socket_path.is_dir():
        for path in cfg.socket_path.iterdir():
            path.unlink(missing_ok=True)
        cfg.socket_path.rmdir()


# -- the agent's API and CLI -------------------------------------------------------------


async def _backup(agent: AgentProcess, job_id: str, domain: str) -> dict[str, Any]:
    body = {"id": job_id, "kind": "backup", "domain": domain}
    status, job = await asyncio.to_thread(agent.call, "POST", "/v1/jobs", body)
    assert status == 201, job
    done = await asyncio.to_thread(agent.wait_job, job_id, {"succeeded", "failed", "cancelled"}, 90)
    assert done["state"] == "succeeded", f"{done}\n{agent.tail()}"
    return done


async def _backups(agent: AgentProcess, domain: str) -> list[dict[str, Any]]:
    status, body = await asyncio.to_thread(agent.call, "GET", f"/v1/domains/{domain}/backups")
    assert status == 200, body
    return list(body["backups"])


async def _ledger(agent: AgentProcess, domain: str) -> dict[str, dict[str, Any]]:
    status, body = await asyncio.to_thread(agent.call, "GET", f"/v1/domains/{domain}/checkpoints")
    assert status == 200, body
    return {r["name"]: r for r in body["checkpoints"]}
