"""The control plane against real domains: jobs through the HTTP API, idempotency,
kill -9 and SIGTERM of a real agent process, metrics, local schedules, readiness.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import libvirt
import pytest

from agent.chain.ledger import Ledger
from agent.chain.records import CheckpointState
from agent.control.job_store import JobStore
from agent.repository.store import Repository
from agent.virt.events import LifecycleKind
from tests.guest_model import Guest, MiB, agent_cli, assert_restores, config, started_guest
from tests.harness import RunningAgent, api_headers, lifecycle, running_agent
from tests.test_backup_live import flip_byte
from tests.testbed.agent_process import agent_process
from tests.testbed.daemon import live_processes_mentioning
from tests.testbed.domains import DiskSpec, DomainFactory, TestDomain

pytestmark = pytest.mark.libvirt

ONE_DISK = [DiskSpec("vda", "virtio")]
T = TypeVar("T")


class Api:
    """A client of the in-process agent's API."""

    def __init__(self, run: RunningAgent, session: aiohttp.ClientSession) -> None:
        self.url = run.agent.urls[0]
        self.session = session
        self.headers = api_headers(run)

    async def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        async with self.session.request(
            method, self.url + path, json=body, headers=self.headers
        ) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    async def wait_job(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        async def fetch() -> dict[str, Any]:
            status, job = await self.call("GET", f"/v1/jobs/{job_id}")
            assert status == 200, job
            return dict(job)

        ended = ("succeeded", "failed", "cancelled")
        return await _until(fetch, lambda job: job["state"] in ended, timeout, f"job {job_id}")

    async def backup(self, domain: str, job_id: str, **extra: Any) -> dict[str, Any]:
        status, job = await self.call(
            "POST", "/v1/jobs", {"id": job_id, "kind": "backup", "domain": domain, **extra}
        )
        assert status == 201, job
        return await self.wait_job(job_id)

    async def metrics(self) -> dict[str, float]:
        status, text = await self.call("GET", "/metrics")
        assert status == 200
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


async def test_the_same_job_submitted_twice_is_one_backup(
    domain_factory: DomainFactory, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with running_agent(config(tmp_path, http={"port": 0})) as run:
        api = Api(run, session)
        guest = await started_guest(run, domain_factory, ONE_DISK)
        await guest.write("vda", 0, 4 * MiB, 0x5A)
        request = {"id": "nightly-42", "kind": "backup", "domain": guest.td.name}
        first = await api.call("POST", "/v1/jobs", request)
        second = await api.call("POST", "/v1/jobs", request)  # a retry while it runs
        assert (first[0], second[0]) == (201, 200)
        assert first[1]["id"] == second[1]["id"] == "nightly-42"
        done = await api.wait_job("nightly-42")
        assert done["state"] == "succeeded", done
        again = await api.call("POST", "/v1/jobs", request)  # a retry after it ended
        assert again[0] == 200 and again[1]["state"] == "succeeded"
        # The same id for another request is refused and changes nothing.
        status, error = await api.call("POST", "/v1/jobs", {**request, "mode": "full"})
        assert status == 409 and error["error"]["code"] == "job-conflict"
        backups = await run.agent.backups.repository.backups(guest.td.name)
        assert [b.backup_id for b in backups] == [done["backup_id"]]
        await assert_restores(
            run.agent.backups.repository,
            guest.td.name,
            done["backup_id"],
            guest.snapshot(),
            tmp_path,
        )
        status, listed = await api.call("GET", f"/v1/jobs?domain={guest.td.name}")
        assert status == 200 and [j["id"] for j in listed["jobs"]] == ["nightly-42"]
        status, shown = await api.call("GET", f"/v1/domains/{guest.td.name}/backups")
        assert [b["id"] for b in shown["backups"]] == [done["backup_id"]]
        status, cps = await api.call("GET", f"/v1/domains/{guest.td.uuid}/checkpoints")
        assert status == 200 and [c["state"] for c in cps["checkpoints"]] == ["active"]
        status, job = await api.call(
            "POST", "/v1/jobs", {"kind": "reconcile", "domain": guest.td.name}
        )
        assert status == 201
        reconciled = await api.wait_job(job["id"])
        assert reconciled["state"] == "succeeded"
        assert reconciled["result"]["broken_disks"] == {}


async def test_restore_and_verify_jobs_through_the_api(
    domain_factory: DomainFactory, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Restores and verifies as jobs: without ``disk`` a restore writes a directory with
    every disk, with ``disk`` one file, each holding what the guest held, and never
    overwrites; verify passes, then fails naming a corrupted byte; a domain named by
    UUID is found, one without backups is refused by code."""
    cfg = config(tmp_path, http={"port": 0})
    async with running_agent(cfg) as run:
        api = Api(run, session)
        guest = await started_guest(run, domain_factory, ONE_DISK)
        await guest.write("vda", 2 * MiB, 64 * 1024, 0x7A)
        expected = guest.snapshot()["vda"]
        backup = await api.backup(guest.td.name, "b1")
        assert backup["state"] == "succeeded", backup
        backup_id = backup["backup_id"]

        async def job(request: dict[str, Any]) -> dict[str, Any]:
            status, submitted = await api.call("POST", "/v1/jobs", request)
            assert status == 201, submitted
            return await api.wait_job(submitted["id"])

        restore = {"kind": "restore", "domain": guest.td.uuid, "backup": backup_id}
        every = await job({**restore, "to": "all", "format": "raw"})
        assert every["state"] == "succeeded", every
        assert sorted(p.name for p in (cfg.restore_path / "all").iterdir()) == ["vda.raw"]
        assert (cfg.restore_path / "all" / "vda.raw").read_bytes() == expected
        one = await job({**restore, "disk": "vda", "to": "vda.raw", "format": "raw"})
        assert one["state"] == "succeeded", one
        assert (cfg.restore_path / "vda.raw").read_bytes() == expected
        again = await job({**restore, "disk": "vda", "to": "vda.raw", "format": "raw"})
        assert again["state"] == "failed" and again["error"]["code"] == "exists", again
        assert (cfg.restore_path / "vda.raw").read_bytes() == expected

        verified = await job({"kind": "verify", "domain": guest.td.name})
        assert verified["state"] == "succeeded", verified
        image = cfg.repository_path / guest.td.name / "backups" / backup_id / "vda.qcow2"
        await asyncio.to_thread(flip_byte, image, 2 * MiB + 100)
        corrupt = await job({"kind": "verify", "domain": guest.td.name, "backup": backup_id})
        assert corrupt["state"] == "failed" and corrupt["error"]["code"] == "verify-failed"
        problems = corrupt["result"]["problems"]
        assert [(p["image"], p["offset"] <= 2 * MiB + 100) for p in problems] == [
            (str(image), True)
        ]
        # The damaged disk's next backup starts a new chain rather than build on it.
        assert corrupt["result"]["full_next"] == ["vda"]
        after = await api.backup(guest.td.name, "b2")
        assert after["state"] == "succeeded", after
        assert [(d["mode"], d["reason"]) for d in after["disks"]] == [("full", "backup-corrupt")]

        other = await started_guest(run, domain_factory, ONE_DISK)
        none = await job({"kind": "verify", "domain": other.td.name})
        assert none["state"] == "failed" and none["error"]["code"] == "no-backups", none


def _value(metrics: dict[str, float], name: str, **labels: str) -> float:
    inside = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    key = f"{name}{{{inside}}}" if labels else name
    for found, value in metrics.items():
        if _normalised(found) == key:
            return value
    return 0.0


def _normalised(series: str) -> str:
    match = re.fullmatch(r"([^{]+)\{(.*)\}", series)
    if not match:
        return series
    pairs = sorted(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
    return match.group(1) + "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


async def test_metrics_count_full_incremental_forced_full_and_failed_backups(
    domain_factory: DomainFactory, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with running_agent(config(tmp_path, http={"port": 0})) as run:
        api = Api(run, session)
        guest = await started_guest(run, domain_factory, ONE_DISK)
        name = guest.td.name
        before = await api.metrics()
        assert _value(before, "backup_agent_libvirt_connected") == 1

        await guest.write("vda", 0, 2 * MiB, 0x11)
        full = await api.backup(name, "m-full")
        assert full["state"] == "succeeded" and full["disks"][0]["mode"] == "full"
        await guest.write("vda", 8 * MiB, 1 * MiB, 0x12)
        incremental = await api.backup(name, "m-incr")
        assert incremental["disks"][0]["mode"] == "incremental"
        after_two = await api.metrics()

        # QEMU dies without writing its bitmaps back: the chain cannot be trusted.
        await guest.flush()
        mark = run.recorder.mark()
        await asyncio.to_thread(guest.td.crash)
        await run.recorder.wait_for(lifecycle(guest.td.uuid, LifecycleKind.STOPPED), since=mark)
        await asyncio.to_thread(guest.td.start)
        await run.recorder.wait_for(lifecycle(guest.td.uuid, LifecycleKind.STARTED), since=mark)
        await run.agent.dispatcher.drain()
        refused = await api.backup(name, "m-refused", mode="incremental")
        assert refused["state"] == "failed" and refused["error"]["code"] == "chain-broken"
        forced = await api.backup(name, "m-forced")
        assert forced["disks"][0]["mode"] == "full"
        assert forced["disks"][0]["reason"] == "bitmap-inconsistent"
        end = await api.metrics()

    def moved(metrics: dict[str, float], name: str, **labels: str) -> float:
        return _value(metrics, name, **labels) - _value(before, name, **labels)

    assert moved(after_two, "backup_agent_backups_total", result="succeeded", mode="full") == 1
    assert moved(end, "backup_agent_backups_total", result="succeeded", mode="full") == 2
    assert moved(end, "backup_agent_backups_total", result="succeeded", mode="incremental") == 1
    assert moved(end, "backup_agent_backups_total", result="failed", mode="incremental") == 1
    # The first full was not forced; the one after the crash was, for that reason.
    assert (
        moved(after_two, "backup_agent_full_backups_forced_total", reason="bitmap-inconsistent")
        == 0
    )
    assert moved(end, "backup_agent_full_backups_forced_total", reason="bitmap-inconsistent") == 1
    copied = sum(d["bytes_copied"] for j in (full, incremental, forced) for d in j["disks"])
    assert moved(end, "backup_agent_bytes_copied_total") == copied
    assert moved(end, "backup_agent_backup_duration_seconds_count") == 3
    last = _value(end, "backup_agent_last_successful_backup_timestamp_seconds", domain=name)
    assert abs(last - time.time()) < 120
    # The newest backup after the full and the incremental needs both images; after the
    # forced full, only its own.
    assert _value(after_two, "backup_agent_chain_length", domain=name) == 2
    assert _value(end, "backup_agent_chain_length", domain=name) == 1
    assert moved(end, "backup_agent_jobs_ended_total", kind="backup", state="failed") == 1
    assert moved(end, "backup_agent_events_total", type="Lifecycle") >= 2  # stop, start
    assert _value(end, "backup_agent_jobs", state="running") == 0
    assert _value(end, "backup_agent_event_loop_lag_seconds_count") > 0


async def test_every_disk_in_the_job_the_domains_and_the_metrics(
    domain_factory: DomainFactory, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A domain with a qcow2 disk, a raw image, a CD-ROM and a disk configuration leaves
    out: the backup job names all four, ``/v1/domains`` says how each is backed up (the
    domain is not partial: nothing writable is left out by accident), ``/metrics`` too."""
    disks = [  # (in libvirt's order: by bus, then target)
        DiskSpec("vda", "virtio"),
        DiskSpec("vdb", "virtio", format="raw"),
        DiskSpec("vdc", "virtio"),
        DiskSpec("sdc", "sata", device="cdrom"),
    ]
    cfg = config(tmp_path, http={"port": 0}, backup={"exclude": {"lbat-*": ["vdc"]}})
    async with running_agent(cfg) as run:
        api = Api(run, session)
        guest = await started_guest(run, domain_factory, disks)
        name = guest.td.name
        await guest.write("vdb", 0, 1 * MiB, 0x3B)
        first = await api.backup(name, "every-1")
        assert first["state"] == "succeeded", first
        assert [(d["target"], d["mode"], d["reason"]) for d in first["disks"]] == [
            ("vda", "full", "first-backup"),
            ("vdb", "full", "format-raw: no persistent bitmap"),
            ("vdc", "excluded", "excluded-by-config"),
            ("sdc", "excluded", "device-cdrom"),
        ]
        assert [d["bytes_copied"] for d in first["disks"][2:]] == [0, 0]
        status, body = await api.call("GET", "/v1/domains")
        assert status == 200
        [domain] = [d for d in body["domains"] if d["name"] == name]
        assert [
            (d["target"], d["chain_valid"], d["backup"], d["backup_reason"])
            for d in domain["disks"]
        ] == [
            ("vda", True, "incremental", None),
            ("vdb", None, "full", "format-raw: no persistent bitmap"),
            ("vdc", None, "excluded", "excluded-by-config"),
            ("sdc", None, "excluded", "device-cdrom"),
        ]
        assert (domain["partial"], domain["partial_disks"]) == (False, [])
        assert domain["not_backed_up"] == [
            {"target": "vdc", "reason": "excluded-by-config"},
            {"target": "sdc", "reason": "device-cdrom"},
        ]
        metrics = await api.metrics()
    assert _value(metrics, "backup_agent_domain_partial", domain=name) == 0
    assert f'backup_agent_domain_partial{{domain="{name}"}}' in metrics  # present, as 0
    for reason in ("device-cdrom", "excluded-by-config"):
        assert _value(metrics, "backup_agent_disks_excluded", domain=name, reason=reason) == 1


def _backup_job_xml(td: TestDomain) -> str | None:
    """The domain's running backup job (its XML names the agent's export socket)."""
    try:
        return str(td.dom().backupGetXMLDesc(0))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_BACKUP:
            return None
        raise


def _backup_job_running(td: TestDomain) -> bool:
    return _backup_job_xml(td) is not None


def _export_socket(xml: str) -> str:
    match = re.search(r"<server [^>]*socket='([^']+)'", xml) or re.search(
        r'<server [^>]*socket="([^"]+)"', xml
    )
    assert match, xml
    return match.group(1)


async def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until the blocking ``predicate`` (run in a thread) holds."""
    await _until(lambda: asyncio.to_thread(predicate), bool, timeout, what)


async def test_kill_9_with_queued_and_running_jobs(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    slow = {"backup": {"bandwidth_limit": 4 * MiB}, "jobs": {"max_concurrent_backups": 1}}
    with agent_process(tmp_path, slow) as agent:
        one = await asyncio.to_thread(domain_factory, persistent=True, disks=ONE_DISK)
        two = await asyncio.to_thread(domain_factory, persistent=True, disks=ONE_DISK)
        await asyncio.to_thread(one.write_pattern, "vda", 0, 32 * MiB, 0x31)
        await asyncio.to_thread(agent.start)
        submit = [
            {"id": "run-1", "kind": "backup", "domain": one.name},
            {"id": "queued-same-domain", "kind": "backup", "domain": one.name},
            {"id": "queued-other-domain", "kind": "backup", "domain": two.uuid},
        ]
        for body in submit:
            status, job = await asyncio.to_thread(agent.call, "POST", "/v1/jobs", body)
            assert status == 201, job

        def copying() -> bool:
            _, job = agent.call("GET", "/v1/jobs/run-1")
            return bool(job["state"] == "running" and job["progress"]["done_bytes"] > 0)

        await _wait(copying, 60, "the first backup to copy")
        killed_xml = await asyncio.to_thread(_backup_job_xml, one)
        assert killed_xml is not None
        await asyncio.to_thread(agent.kill9)
        # Its qemu-nbd died with it (no orphan serving the staged image).
        sockets = _export_socket(killed_xml).rsplit("/", 1)[0]
        await _wait(lambda: not live_processes_mentioning(sockets), 10, "qemu-nbd to die")

        await asyncio.to_thread(agent.start)  # same configuration: still slow, one at a time
        killed = await asyncio.to_thread(agent.wait_job, "run-1", {"failed"}, 30)
        assert killed["error"]["code"] == "agent-restarted"
        # The killed agent's libvirt job is gone (the queued backup may have begun its own).
        now = await asyncio.to_thread(_backup_job_xml, one)
        assert now is None or _export_socket(killed_xml) != _export_socket(now)
        for job_id in ("queued-same-domain", "queued-other-domain"):
            done = await asyncio.to_thread(
                agent.wait_job, job_id, {"succeeded", "failed", "cancelled"}, 150
            )
            assert done["state"] == "succeeded", done
        repository = Repository(tmp_path / "repo")
        assert len(await repository.backups(one.name)) == 1
        assert len(await repository.backups(two.name)) == 1


async def test_sigterm_cancels_a_running_backup_cleanly_and_notifies_systemd(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(60)
    settings = {"backup": {"bandwidth_limit": 4 * MiB}, "jobs": {"shutdown_grace": 3.0}}
    try:
        with agent_process(tmp_path, settings, env={"NOTIFY_SOCKET": str(notify_path)}) as agent:
            td = await asyncio.to_thread(domain_factory, persistent=True, disks=ONE_DISK)
            guest = Guest(td)
            await guest.write("vda", 0, 1 * MiB, 0x41)
            await asyncio.to_thread(agent.start, ready=False)
            assert await asyncio.to_thread(listener.recv, 100) == b"READY=1"
            status, _ = await asyncio.to_thread(agent.call, "GET", "/readyz")
            assert status == 200, "READY=1 was sent before the agent was ready"
            first = await asyncio.to_thread(
                agent.call, "POST", "/v1/jobs", {"id": "b1", "kind": "backup", "domain": td.name}
            )
            assert first[0] == 201
            assert (await asyncio.to_thread(agent.wait_job, "b1", {"succeeded"}, 60))["state"]
            await guest.write("vda", 8 * MiB, 32 * MiB, 0x42)
            expected = guest.snapshot()
            second = {"id": "b2", "kind": "backup", "domain": td.name}
            assert (await asyncio.to_thread(agent.call, "POST", "/v1/jobs", second))[0] == 201
            await asyncio.to_thread(agent.wait_job, "b2", {"running"}, 30)
            await _wait(lambda: _backup_job_running(td), 30, "the backup job in libvirt")

            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(listener.recv, 100) == b"STOPPING=1"
            # During the grace period the agent answers, but takes no new job.
            late = {"id": "late", "kind": "backup", "domain": td.name}
            status, refused = await asyncio.to_thread(agent.call, "POST", "/v1/jobs", late)
            assert status == 503 and refused["error"]["code"] == "not-accepting-jobs"
            status, running = await asyncio.to_thread(agent.call, "GET", "/v1/jobs/b2")
            assert running["state"] == "running", "b2 was cancelled before its grace period"
            exit_status = await asyncio.to_thread(agent.wait_exit, 90)
            assert exit_status == 0, agent.tail()
            assert not await asyncio.to_thread(_backup_job_running, td)
            store = await JobStore.open(tmp_path / "state" / "jobs.sqlite")
            try:
                b2 = await store.get("b2")
            finally:
                await store.close()
            assert b2 is not None and b2.state.value == "cancelled"
            assert b2.error_code == "agent-stopping"
            async with await Ledger.open(tmp_path / "state" / "ledger.sqlite") as ledger:
                records = await ledger.checkpoints(td.name)
            assert [r.state for r in records] == [CheckpointState.ACTIVE, CheckpointState.DISCARDED]
            assert not list((tmp_path / "state" / "scratch").glob("*"))

            # The next agent's backup is incremental from the first and restores exactly.
            await asyncio.to_thread(agent.start)
            third = {"id": "b3", "kind": "backup", "domain": td.name}
            assert (await asyncio.to_thread(agent.call, "POST", "/v1/jobs", third))[0] == 201
            done = await asyncio.to_thread(agent.wait_job, "b3", {"succeeded", "failed"}, 120)
            assert done["state"] == "succeeded", done
            assert done["disks"][0]["mode"] == "incremental"
            repository = Repository(tmp_path / "repo")
            await assert_restores(repository, td.name, done["backup_id"], expected, tmp_path)
            assert len(await repository.backups(td.name)) == 2
    finally:
        listener.close()


async def test_a_missed_schedule_slot_runs_once_at_start(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    tds = [await asyncio.to_thread(domain_factory, disks=ONE_DISK) for _ in range(2)]
    # Its own domains only (a pattern, as operators write them): "lbat-*" would back up,
    # and prune the checkpoints of, every other test's domains running at the same time.
    patterns = [f"{td.name[:-1]}[{td.name[-1]}]" for td in tds]
    schedule = {"name": "hourly", "cron": "0 * * * *", "domains": patterns}
    cfg = config(tmp_path, http={"port": 0}, schedules=[schedule])
    # The agent last handled a slot a day ago: it was down for many slots since.
    store = await JobStore.open(cfg.jobs_path)
    await store.set_last_slot("hourly", time.time() - 86400)
    await store.close()
    async with running_agent(cfg) as run:
        await asyncio.wait_for(run.agent.taking_jobs.wait(), 30)
        jobs = await _wait_jobs(run, 2)
        assert {j.domain for j in jobs} == {td.name for td in tds}
        mine = [j for j in jobs if j.domain in {td.name for td in tds}]
        assert len(mine) == 2, "one job per domain, not one per missed slot"
        assert all(j.source == "schedule" and j.id.startswith("sched:hourly:") for j in mine)
        for job in mine:
            finished = await _wait_finished(run, job.id)
            assert finished.state.value == "succeeded", finished
    async with running_agent(cfg) as run:  # the slot was handled: nothing runs again
        await asyncio.wait_for(run.agent.taking_jobs.wait(), 30)
        await asyncio.sleep(1)
        assert len(await run.agent.jobs.find()) == len(jobs)


async def _until(
    fetch: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float, what: str
) -> T:
    """Poll ``fetch`` until ``ok`` holds for its value; that value."""
    deadline = time.monotonic() + timeout
    while not ok(value := await fetch()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {value}"
        await asyncio.sleep(0.1)
    return value


async def _wait_jobs(run: RunningAgent, count: int, timeout: float = 30) -> list[Any]:
    return await _until(
        run.agent.jobs.find, lambda jobs: len(jobs) >= count, timeout, f"{count} jobs"
    )


async def _wait_finished(run: RunningAgent, job_id: str, timeout: float = 120) -> Any:
    return await _until(
        lambda: run.agent.jobs.get(job_id),
        lambda job: job.state.finished,
        timeout,
        f"job {job_id} to end",
    )


async def test_operator_commands_talk_to_the_running_agent(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    # No token configured: the agent makes one on its first start, the CLI reads it.
    with agent_process(tmp_path, {}) as agent:
        td = await asyncio.to_thread(domain_factory, persistent=True, disks=ONE_DISK)
        await asyncio.to_thread(td.write_pattern, "vda", 0, 1 * MiB, 0x21)
        await asyncio.to_thread(agent.start)
        # Without the token the API refuses; the CLI reads the agent's token file.
        status, body = await asyncio.to_thread(
            functools.partial(agent.call, "GET", "/v1/jobs", token=False)
        )
        assert status == 401 and body["error"]["code"] == "unauthorized"
        done = await asyncio.to_thread(agent_cli, agent.config, "backup", td.name, "--wait")
        assert done.returncode == 0, done.stderr
        assert "succeeded: backup " in done.stdout and "vda full [first-backup]" in done.stdout
        listed = await asyncio.to_thread(agent_cli, agent.config, "jobs", "--json")
        jobs = json.loads(listed.stdout)
        assert [(j["kind"], j["domain"], j["state"]) for j in jobs] == [
            ("backup", td.name, "succeeded")
        ]
        shown = await asyncio.to_thread(agent_cli, agent.config, "status")
        assert shown.returncode == 0
        row = next(line for line in shown.stdout.splitlines() if line.startswith(td.name))
        assert "running" in row and " ok " in row and "full" in row
        assert " vda:incremental " in row  # DISKS: how each disk is backed up
        gone = await asyncio.to_thread(agent_cli, agent.config, "cancel", jobs[0]["id"])
        assert gone.returncode == 1 and "job-conflict" in gone.stderr
        missing = await asyncio.to_thread(agent_cli, agent.config, "cancel", "no-such-job")
        assert missing.returncode == 1 and "job-not-found" in missing.stderr
        refused = await asyncio.to_thread(
            agent_cli, agent.config, "backup", td.name, "--mode", "incremental", "--wait"
        )
        assert refused.returncode == 0, refused.stderr  # the chain allows it
        assert "vda incremental" in refused.stdout
    unreachable = await asyncio.to_thread(agent_cli, agent.config, "jobs")
    assert unreachable.returncode == 1
    assert "cannot reach the agent" in unreachable.stderr


async def test_readyz_says_what_is_missing(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    cfg = config(
        tmp_path,
        http={"port": 0},
        libvirt={"uri": f"qemu+unix:///system?socket={tmp_path}/no-libvirtd.sock"},
    )
    async with running_agent(cfg, connect_timeout=None) as run:
        deadline = time.monotonic() + 10
        while not run.agent.urls:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        url = run.agent.urls[0]
        async with session.get(url + "/healthz") as response:
            assert response.status == 200
        async with session.get(url + "/readyz") as response:
            assert response.status == 503
            body = await response.json()
        assert body["ready"] is False
        assert body["checks"]["libvirt"] == "disconnected"
        assert body["checks"]["jobs"] == "not taking jobs"
        assert body["checks"]["state_store"] == "ok" and body["checks"]["repository"] == "ok"
        async with session.post(
            url + "/v1/jobs", json={"kind": "reconcile", "domain": "x"}, headers=api_headers(run)
        ) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "not-accepting-jobs"
