"""The real agent process consuming a real nats-server: a request redelivered after the
agent was killed before acknowledging it is still one job and one backup; ``/readyz`` and
``/metrics`` say whether NATS is connected, through the server going and coming back."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from agent.core.faults import CRASH_ENV
from agent.repository.store import Repository
from tests.guest_model import MiB
from tests.testbed.agent_process import agent_process
from tests.testbed.domains import DiskSpec, DomainFactory
from tests.testbed.nats import NatsServer

pytestmark = pytest.mark.libvirt

JOBS = "backup-agent.test-host.jobs"
EVENTS = "backup-agent.test-host.events"


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _consumer_settled(url: str, timeout: float = 30) -> dict[str, Any]:
    """Wait until the agent's durable consumer has nothing pending or unacknowledged."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while True:
            info = await js.consumer_info("BACKUP_AGENT", "agent-test-host")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return {
                    "delivered": info.delivered.consumer_seq,
                    "redelivered": info.num_redelivered,
                }
            assert time.monotonic() < deadline, f"consumer not settled: {info}"
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def _wait_consuming(url: str, timeout: float = 30) -> None:
    """Wait until the agent's stream and durable consumer exist: /readyz does not wait for
    NATS (the agent takes jobs from its API without it), so a request published right
    after it could find no stream yet."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while True:
            try:
                await js.consumer_info("BACKUP_AGENT", "agent-test-host")
                return
            except nats.js.errors.NotFoundError:
                assert time.monotonic() < deadline, "the agent did not start consuming"
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def _job_events(url: str) -> list[dict[str, Any]]:
    """Every job event the agents published (they are kept in the stream)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(EVENTS, ordered_consumer=True)
        found = []
        while True:
            try:
                msg = await sub.next_msg(timeout=1)
            except nats.errors.TimeoutError:
                return found
            found.append(json.loads(msg.data))
    finally:
        await nc.close()


async def test_redelivery_after_kill_before_ack_is_one_backup(
    domain_factory: DomainFactory, tmp_path: Path, nats_server: NatsServer
) -> None:
    settings = {"nats": {"url": nats_server.url, "ack_wait": 2.0}}
    with agent_process(tmp_path, settings) as agent:
        td = await asyncio.to_thread(domain_factory, persistent=True, disks=[DiskSpec("vda")])
        await asyncio.to_thread(td.write_pattern, "vda", 0, 2 * MiB, 0x61)
        # The first agent records the job, then dies before it acknowledges the message.
        await asyncio.to_thread(agent.start, extra_env={CRASH_ENV: "nats:before-ack"})
        await _wait_consuming(nats_server.url)
        nc = await nats.connect(nats_server.url)
        try:
            request = {"id": "scheduler-7", "kind": "backup", "domain": td.name}
            await nc.jetstream().publish(JOBS, json.dumps(request).encode())
        finally:
            await nc.close()
        assert await asyncio.to_thread(agent.wait_exit, 60) == -signal.SIGKILL, agent.tail()

        # The next agent runs the recorded job; JetStream redelivers the message to it.
        await asyncio.to_thread(agent.start)
        job = await asyncio.to_thread(
            agent.wait_job, "scheduler-7", {"succeeded", "failed", "cancelled"}, 120
        )
        assert job["state"] == "succeeded", job
        assert job["source"] == "nats"
        settled = await _consumer_settled(nats_server.url)
        assert settled["redelivered"] >= 1 or settled["delivered"] >= 2, settled
        _, metrics = await asyncio.to_thread(agent.call, "GET", "/metrics")
        assert 'backup_agent_nats_messages_total{outcome="accepted"} 1.0' in metrics
        backups = await Repository(tmp_path / "repo").backups(td.name)
        assert [b.backup_id for b in backups] == [job["backup_id"]]
        _, jobs = await asyncio.to_thread(agent.call, "GET", "/v1/jobs")
        assert [j["id"] for j in jobs["jobs"]] == ["scheduler-7"]

    events = await _job_events(nats_server.url)
    states = [e["job"]["state"] for e in events if e["type"] == "job"]
    assert states[-2:] == ["running", "succeeded"], events
    assert states.count("succeeded") == 1, events  # the end from the outbox, once
    assert all(e["job"]["id"] == "scheduler-7" for e in events if e["type"] == "job")


async def _readyz_once_nats(agent: Any, state: str, timeout: float = 60) -> tuple[int, Any]:
    """``/readyz`` once it says NATS is ``state``: its status and body."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = await asyncio.to_thread(agent.call, "GET", "/readyz")
        if isinstance(body, dict) and body.get("nats") == state:
            return status, body
        assert time.monotonic() < deadline, f"/readyz never said nats {state}: {body}"
        await asyncio.sleep(0.2)


async def test_readyz_and_metrics_say_whether_nats_is_connected(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    with agent_process(tmp_path, {"nats": {"url": nats_server.url}}) as agent:
        await asyncio.to_thread(agent.start)
        status, _ = await _readyz_once_nats(agent, "connected")
        assert status == 200
        _, metrics = await asyncio.to_thread(agent.call, "GET", "/metrics")
        assert "backup_agent_nats_connected 1.0" in metrics

        # The server goes: said, but the agent stays ready (its API and schedules take
        # jobs without NATS).
        await asyncio.to_thread(nats_server.stop)
        status, body = await _readyz_once_nats(agent, "disconnected")
        assert status == 200 and body["ready"] is True, body
        _, metrics = await asyncio.to_thread(agent.call, "GET", "/metrics")
        assert "backup_agent_nats_connected 0.0" in metrics

        # It comes back on the same port: the agent reconnects by itself.
        await asyncio.to_thread(nats_server.start)
        await _readyz_once_nats(agent, "connected")
        await _wait_consuming(nats_server.url)


async def test_without_nats_neither_readyz_nor_metrics_mention_it(tmp_path: Path) -> None:
    with agent_process(tmp_path, {}) as agent:
        await asyncio.to_thread(agent.start)
        status, body = await asyncio.to_thread(agent.call, "GET", "/readyz")
        assert status == 200 and "nats" not in body, body
        _, metrics = await asyncio.to_thread(agent.call, "GET", "/metrics")
        assert "backup_agent_nats_connected" not in metrics
