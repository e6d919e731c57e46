"""NATS faults: the agent killed -9 in a backup the scheduler asked for, with NATS away
when it comes back; and several agents setting up one JetStream stream at the same moment.

The first case runs a real agent process on a real domain and nats-server: the end of
the killed job (failed, ``agent-restarted``) can only reach the scheduler from the job
store's outbox, because NATS is down while the next start ends the job. The second case
runs several agents' :class:`SchedulerMessages` in-process (the NATS behaviour is what is
under test) against a fresh server, round after round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import libvirt
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client

from agent.control.messages import SchedulerMessages
from agent.core.config import AgentConfig, NatsSection, load_config
from agent.core.faults import CRASH_ENV
from tests.guest_model import Guest, KiB, MiB, assert_cli_restores
from tests.test_messages import MemoryJobs, eventually
from tests.testbed.agent_process import AgentProcess, agent_process
from tests.testbed.domains import DiskSpec, DomainFactory
from tests.testbed.nats import NatsServer

pytestmark = [pytest.mark.faults]

STREAM = "BACKUP_AGENT"
WAIT = 30.0
HOST = "test-host"  # agent_process's host id
JOBS = f"backup-agent.{HOST}.jobs"
EVENTS = f"backup-agent.{HOST}.events"
FINISHED = {"succeeded", "failed", "cancelled"}
# A disk's repository image served by a local qemu-nbd: <backup-id>-<target>.sock[.pid]
_DATA_PLANE = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]+-[^.]+\.sock(\.pid)?")


# -- the agent killed in a job the scheduler asked for --------------------------------


class StaleDataPlaneFilesError(AssertionError):
    """The sockets and pid files of a killed job's qemu-nbd servers are still there."""


@pytest.mark.libvirt
async def test_a_job_the_agent_died_in_is_announced_once_nats_is_back(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    server = NatsServer(tmp_path / "nats")
    await asyncio.to_thread(server.start)
    # A bandwidth limit keeps the full copy of 16 MiB going for a second: the half-way
    # crash point comes from a copy in flight.
    settings = {"nats": {"url": server.url}, "backup": {"bandwidth_limit": 16 * MiB}}
    try:
        with agent_process(tmp_path, settings) as agent:
            cfg = load_config(agent.config)
            try:
                await _kill_restart_and_hear(agent, cfg, server, domain_factory, tmp_path)
            finally:
                await asyncio.to_thread(agent.stop)
                await asyncio.to_thread(_remove_own_socket_dir, cfg)
    finally:
        await asyncio.to_thread(server.stop)


async def _kill_restart_and_hear(
    agent: AgentProcess,
    cfg: AgentConfig,
    server: NatsServer,
    domain_factory: DomainFactory,
    tmp_path: Path,
) -> None:
    td = await asyncio.to_thread(domain_factory, persistent=True, disks=[DiskSpec("vda")])
    guest = Guest(td)
    await guest.write("vda", 0, 16 * MiB, 0x5A)

    # 1. The scheduler asks for a backup; the agent dies half-way through its copy.
    await asyncio.to_thread(agent.start, extra_env={CRASH_ENV: "copy:half"})
    await _wait_consuming(server.url)
    await _request(server.url, {"id": "sched-1", "kind": "backup", "domain": td.name})
    assert await asyncio.to_thread(agent.wait_exit, 60) == -signal.SIGKILL, agent.tail()
    assert td.dom().jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE, "not killed mid-backup"

    # 2. NATS goes away; the next start ends the job while nobody can be told.
    await asyncio.to_thread(server.stop)
    await asyncio.to_thread(agent.start)
    killed = await asyncio.to_thread(agent.wait_job, "sched-1", FINISHED, 60)
    assert (killed["state"], killed["error"]["code"]) == ("failed", "agent-restarted"), killed
    assert await asyncio.to_thread(_outbox, cfg) == ["sched-1"]

    # 3. NATS comes back: the end arrives from the outbox, once, and leaves it.
    await asyncio.to_thread(server.start)
    end, msg_id = await _job_end(server.url, "sched-1")
    assert end["job"]["state"] == "failed", end
    assert end["job"]["error"]["code"] == "agent-restarted", end
    assert msg_id == f"{HOST}:sched-1:failed"
    await eventually_empty(cfg)

    # 4. The next backup the scheduler asks for succeeds and restores exactly.
    await guest.write("vda", 40 * MiB, 64 * KiB, 0x5B)
    expected = guest.snapshot()
    await _request(server.url, {"id": "sched-2", "kind": "backup", "domain": td.name})
    done = await asyncio.to_thread(agent.wait_job, "sched-2", FINISHED, 90)
    assert done["state"] == "succeeded", f"{done}\n{agent.tail()}"
    end, _ = await _job_end(server.url, "sched-2")
    assert end["job"]["state"] == "succeeded" and end["job"]["backup_id"] == done["backup_id"]
    await assert_cli_restores(agent.config, td.name, done["backup_id"], expected, tmp_path)
    assert td.dom().jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE, "a libvirt job is left"
    sockets = list(cfg.socket_path.glob("*.sock*"))
    left = [
        *(cfg.run_path / "jobs").glob("*"),
        *cfg.scratch_path.glob("*"),
        *(p for p in sockets if not _DATA_PLANE.fullmatch(p.name)),
    ]
    assert left == [], f"left in the agent's run and scratch directories: {left}"
    # Checked last, so that a case failing here has passed every other check.
    stale = sorted(p.name for p in sockets if _DATA_PLANE.fullmatch(p.name))
    if stale:
        raise StaleDataPlaneFilesError(f"left in {cfg.socket_path}: {stale}")


async def _wait_consuming(url: str, host: str = HOST) -> None:
    """Until the agent's durable consumer exists (``/readyz`` does not wait for NATS)."""
    nc = await nats.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + WAIT
        while True:
            try:
                await js.consumer_info(STREAM, f"agent-{host}")
                return
            except nats.js.errors.NotFoundError:
                assert time.monotonic() < deadline, "the agent did not start consuming"
                await asyncio.sleep(0.1)
    finally:
        await asyncio.wait_for(nc.close(), 10)


async def _request(url: str, body: dict[str, Any], subject: str = JOBS) -> None:
    nc = await nats.connect(url, connect_timeout=5)
    try:
        await nc.jetstream().publish(subject, json.dumps(body).encode(), timeout=10)
    finally:
        await asyncio.wait_for(nc.close(), 10)


async def _job_end(url: str, job_id: str, timeout: float = 60) -> tuple[dict[str, Any], str | None]:
    """The first stored event saying ``job_id`` finished, and its ``Nats-Msg-Id``; fails
    if a second one is stored behind it."""
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=-1)
    try:
        sub = await nc.jetstream().subscribe(EVENTS, ordered_consumer=True)
        found: list[tuple[dict[str, Any], str | None]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=2 if found else 1)
            except nats.errors.TimeoutError:
                if found:
                    break  # nothing behind the end
                continue
            event = json.loads(msg.data)
            job = event.get("job") or {}
            if job.get("id") == job_id and job.get("state") in FINISHED:
                found.append((event, (msg.headers or {}).get("Nats-Msg-Id")))
        assert len(found) == 1, f"{job_id}: {len(found)} ends stored within {timeout:g} s"
        return found[0]
    finally:
        await asyncio.wait_for(nc.close(), 10)


def _outbox(cfg: AgentConfig) -> list[str]:
    """The job ids in the job store's outbox (read-only, beside the running agent)."""
    db = sqlite3.connect(f"file:{cfg.jobs_path}?mode=ro", uri=True, timeout=10)
    try:
        return [row[0] for row in db.execute("SELECT job_id FROM outbox ORDER BY seq")]
    finally:
        db.close()


async def eventually_empty(cfg: AgentConfig) -> None:
    deadline = time.monotonic() + WAIT
    while await asyncio.to_thread(_outbox, cfg):
        assert time.monotonic() < deadline, "the published end stayed in the outbox"
        await asyncio.sleep(0.1)


def _remove_own_socket_dir(cfg: AgentConfig) -> None:
    # A deep state directory's sockets live in a /run directory named after it: ours.
    if cfg.socket_path != cfg.run_path and cfg.socket_path.is_dir():
        for path in cfg.socket_path.iterdir():
            path.unlink(missing_ok=True)
        cfg.socket_path.rmdir()


# -- agents racing to set up the stream -----------------------------------------------
RACERS = 8
ROUNDS = 8


@pytest.fixture
async def scheduler(tmp_path: Path) -> AsyncIterator[tuple[NatsServer, Client]]:
    """A fresh nats-server and the scheduler's connection to it."""
    with NatsServer(tmp_path / "nats") as server:
        nc = await nats.connect(server.url, connect_timeout=5)
        try:
            yield server, nc
        finally:
            await asyncio.wait_for(nc.close(), 10)


async def _race_once(url: str, nc: Client, round_no: int) -> None:
    """RACERS agents with different host ids start at once, against no stream (even
    rounds: they race to create it) or a stream of the scheduler's (odd rounds: they race
    to add their subjects); each must end up with its subjects stored and its requests
    arriving."""
    js = nc.jetstream()
    if round_no % 2:
        await js.add_stream(name=STREAM, subjects=["elsewhere.>"])
    settings = NatsSection(url=url, connect_timeout=2.0)
    sinks = [MemoryJobs() for _ in range(RACERS)]
    agents = [SchedulerMessages(settings, f"racer-{i}", sinks[i]) for i in range(RACERS)]
    readies = [asyncio.Event() for _ in agents]
    runs = [asyncio.create_task(a.run(r)) for a, r in zip(agents, readies, strict=True)]
    try:
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), WAIT)
        subjects = set((await js.stream_info(STREAM)).config.subjects or [])
        wanted = {s for a in agents for s in (a.jobs_subject, a.events_subject)}
        assert wanted <= subjects, f"round {round_no}: lost subjects {sorted(wanted - subjects)}"
        for agent in agents:
            await js.consumer_info(STREAM, agent.consumer_name)
        for i, agent in enumerate(agents):
            request = {"id": f"r{round_no}-{i}", "kind": "backup", "domain": "vm1"}
            await js.publish(agent.jobs_subject, json.dumps(request).encode(), timeout=5)
        for i, sink in enumerate(sinks):
            await eventually(lambda s=sink, i=i: f"r{round_no}-{i}" in s.jobs, f"racer-{i}'s job")
        assert all(list(s.jobs) == [f"r{round_no}-{i}"] for i, s in enumerate(sinks))
    finally:
        for run in runs:
            run.cancel()
        await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), WAIT)
    await js.delete_stream(STREAM)


async def test_agents_creating_the_stream_at_once_all_consume_their_subjects(
    scheduler: tuple[NatsServer, Client],
) -> None:
    server, nc = scheduler
    for round_no in range(ROUNDS):
        await _race_once(server.url, nc, round_no)


@pytest.mark.libvirt
async def test_two_agent_processes_started_at_once_both_back_up_over_nats(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """Two real agents with different host ids, started at the same moment against a
    fresh server (both create or extend the stream): each takes a backup request on its
    own subject, and each backup restores exactly."""
    server = NatsServer(tmp_path / "nats")
    await asyncio.to_thread(server.start)
    hosts = ("racer-a", "racer-b")
    try:
        with contextlib.ExitStack() as stack:
            agents = {}
            for host in hosts:
                (tmp_path / host).mkdir()
                settings = {"nats": {"url": server.url}, "agent": {"host_id": host}}
                agents[host] = stack.enter_context(agent_process(tmp_path / host, settings))
            guests = {}
            for host in hosts:
                td = await asyncio.to_thread(domain_factory, disks=[DiskSpec("vda")])
                guests[host] = Guest(td)
                await guests[host].write("vda", 0, 2 * MiB, 0x70 + hosts.index(host))
            await asyncio.gather(*(asyncio.to_thread(agents[h].start) for h in hosts))
            for host in hosts:
                await _wait_consuming(server.url, host)
            expected = {h: guests[h].snapshot() for h in hosts}
            for host in hosts:
                request = {"id": f"{host}-1", "kind": "backup", "domain": guests[host].td.name}
                await _request(server.url, request, f"backup-agent.{host}.jobs")
            for host in hosts:
                agent, td = agents[host], guests[host].td
                done = await asyncio.to_thread(agent.wait_job, f"{host}-1", FINISHED, 90)
                assert done["state"] == "succeeded", f"{host}: {done}\n{agent.tail()}"
                await assert_cli_restores(
                    agent.config, td.name, done["backup_id"], expected[host], tmp_path / host
                )
                assert td.dom().jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE, "a libvirt job is left"
            for host in hosts:
                await asyncio.to_thread(agents[host].stop)
                await asyncio.to_thread(_remove_own_socket_dir, load_config(agents[host].config))
    finally:
        await asyncio.to_thread(server.stop)
