"""Scheduler messages against a real ``nats-server -js``: requests in, jobs and events out.

The job runner is stood in for by :class:`MemoryJobs`, a pure-logic :class:`JobSink`
(jobs by id, fingerprint conflicts, listeners, an outbox of job ends); one test uses the
real job runner and store. Everything NATS does is real: the stream, the durable pull
consumer, acks, naks, redeliveries after ``ack_wait``, and the duplicate window that
drops an event published twice with one ``Nats-Msg-Id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
import structlog
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from agent.control import messages as messages_module
from agent.control.job_requests import (
    Job,
    JobKind,
    JobListener,
    JobRequest,
    JobState,
    new_job_id,
)
from agent.control.job_store import JobStore
from agent.control.jobs import JobOutcome, Jobs, Progress
from agent.control.messages import SchedulerMessages
from agent.core.config import JobsSection, NatsSection
from agent.core.errors import JobConflictError, JobsClosedError, JobStoreError
from agent.core.faults import Faults, SimulatedCrash, no_faults
from tests.testbed.nats import NatsServer, free_port

HOST = "host.one *>"  # dots, a space and wildcards: all must be sanitised
TOKEN = "host_one___"
JOBS_SUBJECT = f"backup-agent.{TOKEN}.jobs"
EVENTS_SUBJECT = f"backup-agent.{TOKEN}.events"
STREAM = "BACKUP_AGENT"
CONSUMER = f"agent-{TOKEN}"
WAIT = 20.0


class MemoryJobs:
    """In-memory JobSink: records every submit; ``failures`` are raised by the next submits.

    :meth:`end` finishes a job as the runner would: into the outbox, then the listeners.
    ``mark_failures`` are raised by the next :meth:`end_published` calls.
    """

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.submits: list[tuple[JobRequest, str, bool | None]] = []  # request, source, created
        self.failures: list[Exception] = []
        self.outbox: list[str] = []  # ids of ended jobs not published yet, oldest first
        self.published: list[str] = []
        self.mark_failures: list[Exception] = []
        self._listeners: list[JobListener] = []

    def end(self, job_id: str, state: JobState = JobState.SUCCEEDED) -> Job:
        job = self.jobs[job_id].with_state(state, time.time())
        self.jobs[job_id] = job
        self.outbox.append(job_id)
        for listener in list(self._listeners):
            listener(job)
        return job

    async def unpublished_ends(self, limit: int) -> list[Job]:
        return [self.jobs[job_id] for job_id in self.outbox[:limit]]

    async def end_published(self, job_id: str) -> None:
        if self.mark_failures:
            raise self.mark_failures.pop(0)
        self.outbox.remove(job_id)
        self.published.append(job_id)

    async def submit(self, request: JobRequest, *, source: str) -> tuple[Job, bool]:
        if self.failures:
            self.submits.append((request, source, None))
            raise self.failures.pop(0)
        job_id = request.id or new_job_id()
        existing = self.jobs.get(job_id)
        if existing is not None:
            if existing.request.fingerprint() != request.fingerprint():
                self.submits.append((request, source, None))
                raise JobConflictError(f"job {job_id} exists with a different request")
            self.submits.append((request, source, False))
            return existing, False
        job = Job(
            id=job_id, request=request, state=JobState.QUEUED, source=source, created_at=time.time()
        )
        self.jobs[job_id] = job
        self.submits.append((request, source, True))
        for listener in list(self._listeners):
            listener(job)
        return job, True

    def subscribe(self, listener: JobListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A running nats-server with JetStream, stopped (by its pid) after the test."""
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[Client]:
    """The scheduler's side: a plain nats-py connection to the test server."""
    nc = await nats.connect(nats_server.url, connect_timeout=5, max_reconnect_attempts=-1)
    try:
        yield nc
    finally:
        await asyncio.wait_for(nc.close(), 10)


def settings(url: str, **overrides: Any) -> NatsSection:
    return NatsSection(url=url, connect_timeout=2.0, **overrides)


@contextlib.asynccontextmanager
async def running(
    url: str,
    jobs: MemoryJobs,
    *,
    faults: Faults = no_faults,
    nak_delay: float = 5.0,
    wait_ready: bool = True,
    **overrides: Any,
) -> AsyncIterator[tuple[SchedulerMessages, asyncio.Task[None], asyncio.Event]]:
    """SchedulerMessages running in a task (consuming, unless ``wait_ready`` is False);
    cancelled and awaited on exit unless the task already ended. ``overrides`` are
    NatsSection fields."""
    messages = SchedulerMessages(
        settings(url, **overrides), HOST, jobs, faults=faults, nak_delay=nak_delay
    )
    ready = asyncio.Event()
    task = asyncio.create_task(messages.run(ready))
    try:
        if wait_ready:
            await asyncio.wait_for(ready.wait(), WAIT)
        yield messages, task, ready
    finally:
        if not task.done():
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=WAIT)
            assert done, "SchedulerMessages.run did not end within 20 s of its cancellation"
        assert task.cancelled() or task.exception() is not None
        assert not messages.connected


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def settled(js: JetStreamContext, timeout: float = WAIT) -> None:
    """Wait until the consumer has nothing pending and nothing unacknowledged."""
    deadline = time.monotonic() + timeout
    while True:
        info = await js.consumer_info(STREAM, CONSUMER)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"consumer not settled after {timeout:g} s: pending {info.num_pending}, "
                f"ack pending {info.num_ack_pending}, redelivered {info.num_redelivered}"
            )
        await asyncio.sleep(0.1)


async def next_event(sub: Subscription, timeout: float = WAIT) -> dict[str, Any]:
    msg = await sub.next_msg(timeout=timeout)
    event: dict[str, Any] = json.loads(msg.data)
    return event


async def publish(js: JetStreamContext, body: bytes | dict[str, Any]) -> int:
    """Publish a request on the jobs subject; its stream sequence."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    ack = await js.publish(JOBS_SUBJECT, data, timeout=10)
    return ack.seq


def backup(job_id: str, domain: str = "vm1") -> dict[str, Any]:
    return {"id": job_id, "kind": "backup", "domain": domain}


async def test_request_becomes_one_job_and_a_stored_event(
    nats_server: NatsServer, client: Client
) -> None:
    jobs = MemoryJobs()
    events = await client.subscribe(EVENTS_SUBJECT)
    async with running(nats_server.url, jobs) as (messages, _task, _ready):
        js = client.jetstream()
        assert messages.jobs_subject == JOBS_SUBJECT
        assert messages.events_subject == EVENTS_SUBJECT
        await publish(js, backup("nightly-1"))

        event = await next_event(events)
        assert event["type"] == "job"
        assert event["host"] == HOST
        assert event["job"]["id"] == "nightly-1"
        assert event["job"]["state"] == "queued"
        assert event["job"]["source"] == "nats"
        await settled(js)

        assert list(jobs.jobs) == ["nightly-1"]
        assert [(src, created) for _, src, created in jobs.submits] == [("nats", True)]
        assert jobs.jobs["nightly-1"].source == "nats"
        assert messages.messages_received == 1
        assert messages.messages_rejected == 0
        assert messages.connected
        # Published through JetStream: the event is stored in the stream.
        stored = await js.get_last_msg(STREAM, EVENTS_SUBJECT)
        assert stored.data is not None
        assert json.loads(stored.data)["job"]["id"] == "nightly-1"
    await events.unsubscribe()


async def test_same_job_id_twice_is_one_job_and_both_are_acked(
    nats_server: NatsServer, client: Client
) -> None:
    jobs = MemoryJobs()
    js = client.jetstream()
    async with running(nats_server.url, jobs) as (messages, _task, _ready):
        await publish(js, backup("nightly-2"))
        await publish(js, backup("nightly-2"))
        await eventually(lambda: len(jobs.submits) == 2, "two submits")
        await settled(js)
        assert [created for _, _, created in jobs.submits] == [True, False]
        assert list(jobs.jobs) == ["nightly-2"]
        assert messages.messages_received == 2
        assert messages.messages_rejected == 0


async def test_malformed_requests_are_rejected_and_acked(
    nats_server: NatsServer, client: Client
) -> None:
    jobs = MemoryJobs()
    js = client.jetstream()
    events = await client.subscribe(EVENTS_SUBJECT)
    bad: list[tuple[bytes | dict[str, Any], str, str | None, str | None]] = [
        # body, expected code, expected field, expected request_id
        (b"this is not json", "invalid-request", None, None),
        (b'[{"id": "in-an-array"}]', "invalid-request", None, None),
        (
            {"id": "r-3", "kind": "backup", "domain": "vm1", "bogus": 1},
            "invalid-request",
            "bogus",
            "r-3",
        ),
        (
            {"id": "r-4", "kind": "backup", "domain": "../../etc"},
            "invalid-request",
            "domain",
            "r-4",
        ),
        (
            b'{"id": "r-5", "kind": "backup", "domain": "' + b"a" * 100_000 + b'"}',
            "too-large",
            None,
            None,
        ),
    ]
    async with running(nats_server.url, jobs) as (messages, _task, _ready):
        seqs = [await publish(js, body) for body, *_ in bad]
        rejected = [await next_event(events) for _ in bad]
        await settled(js)

        assert jobs.submits == []
        assert jobs.jobs == {}
        assert messages.messages_received == len(bad)
        assert messages.messages_rejected == len(bad)
        by_seq = {event["stream_seq"]: event for event in rejected}
        assert sorted(by_seq) == seqs
        for seq, (_, code, field, request_id) in zip(seqs, bad, strict=True):
            event = by_seq[seq]
            assert event["type"] == "request-rejected"
            assert event["host"] == HOST
            assert event["error"]["code"] == code
            assert event["error"]["field"] == field
            assert event["error"]["message"]
            assert event["request_id"] == request_id
        assert "unknown field" in by_seq[seqs[2]]["error"]["message"]
    await events.unsubscribe()


async def test_reused_id_with_a_different_request_is_rejected(
    nats_server: NatsServer, client: Client
) -> None:
    jobs = MemoryJobs()
    js = client.jetstream()
    events = await client.subscribe(EVENTS_SUBJECT)
    async with running(nats_server.url, jobs) as (messages, _task, _ready):
        await publish(js, backup("nightly-3", domain="vm1"))
        assert (await next_event(events))["type"] == "job"
        seq = await publish(js, backup("nightly-3", domain="vm2"))
        event = await next_event(events)
        await settled(js)
        assert event["type"] == "request-rejected"
        assert event["error"]["code"] == "job-conflict"
        assert event["request_id"] == "nightly-3"
        assert event["stream_seq"] == seq
        assert jobs.jobs["nightly-3"].domain == "vm1"
        assert messages.messages_rejected == 1
    await events.unsubscribe()


async def test_request_is_redelivered_when_submit_fails(
    nats_server: NatsServer, client: Client
) -> None:
    jobs = MemoryJobs()
    jobs.failures.append(JobsClosedError("the agent is stopping"))
    js = client.jetstream()
    # ack_wait stays long (30 s): only the nak can bring the request back within WAIT.
    async with running(nats_server.url, jobs, nak_delay=0.5) as (messages, _task, _ready):
        await publish(js, backup("nightly-4"))
        await eventually(lambda: "nightly-4" in jobs.jobs, "the redelivered request's job")
        await settled(js)
        assert [created for _, _, created in jobs.submits] == [None, True]
        assert messages.messages_received == 2
        assert messages.messages_rejected == 0


async def test_crash_before_ack_redelivers_to_the_next_agent(
    nats_server: NatsServer, client: Client
) -> None:
    jobs = MemoryJobs()
    js = client.jetstream()
    crashes: list[str] = []

    def crash_once(point: str, /) -> None:
        if point == "nats:before-ack" and not crashes:
            crashes.append(point)
            raise SimulatedCrash(point)

    async with running(nats_server.url, jobs, faults=crash_once, ack_wait=1.0) as (_, task, _r):
        await publish(js, backup("nightly-5"))
        done, _ = await asyncio.wait([task], timeout=WAIT)
        assert done, "the crash did not end SchedulerMessages.run"
        assert isinstance(task.exception(), SimulatedCrash)
    assert crashes == ["nats:before-ack"]
    assert [created for _, _, created in jobs.submits] == [True]
    info = await js.consumer_info(STREAM, CONSUMER)
    assert info.num_ack_pending == 1, "the request was acknowledged before the crash point"

    async with running(nats_server.url, jobs, ack_wait=1.0) as (messages, _task, _ready):
        await eventually(lambda: len(jobs.submits) == 2, "the redelivery")
        await settled(js)
        assert [created for _, _, created in jobs.submits] == [True, False]
        assert list(jobs.jobs) == ["nightly-5"]
        assert messages.messages_received == 1


async def test_agent_started_before_the_server_connects_when_it_comes(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats", port=free_port())
    jobs = MemoryJobs()
    try:
        async with running(server.url, jobs, wait_ready=False) as (messages, task, ready):
            await asyncio.sleep(3)
            assert not ready.is_set()
            assert not messages.connected
            assert not task.done(), "run() gave up while the server was away"

            await asyncio.to_thread(server.start)
            await asyncio.wait_for(ready.wait(), 60)
            assert messages.connected
            nc = await nats.connect(server.url, connect_timeout=5)
            try:
                js = nc.jetstream()
                await publish(js, backup("nightly-6"))
                await eventually(lambda: "nightly-6" in jobs.jobs, "the job")
                await settled(js)
            finally:
                await asyncio.wait_for(nc.close(), 10)
    finally:
        await asyncio.to_thread(server.stop)


async def test_existing_stream_gets_our_subjects_added(
    nats_server: NatsServer, client: Client
) -> None:
    js = client.jetstream()
    await js.add_stream(name=STREAM, subjects=["elsewhere.>"])
    await js.publish("elsewhere.x", b"kept", timeout=10)
    jobs = MemoryJobs()
    async with running(nats_server.url, jobs):
        info = await js.stream_info(STREAM)
        assert sorted(info.config.subjects or []) == sorted(
            ["elsewhere.>", JOBS_SUBJECT, EVENTS_SUBJECT]
        )
        assert info.state.messages == 1
        await publish(js, backup("nightly-7"))
        await eventually(lambda: "nightly-7" in jobs.jobs, "the job")
        await settled(js)


async def test_server_restarted_without_its_store_is_set_up_again(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    jobs = MemoryJobs()
    async with running(nats_server.url, jobs) as (messages, _task, _ready):
        await asyncio.to_thread(nats_server.stop)
        await eventually(lambda: not messages.connected, "the disconnection")
        shutil.rmtree(nats_server.store_dir)
        await asyncio.to_thread(nats_server.start)
        await eventually(lambda: messages.connected, "the reconnection", timeout=60)

        nc = await nats.connect(nats_server.url, connect_timeout=5)
        try:
            js = nc.jetstream()
            # The agent recreates the stream after reconnecting; until then nothing
            # stores the request (no responders).
            deadline = time.monotonic() + WAIT
            while True:
                try:
                    await publish(js, backup("nightly-8"))
                    break
                except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            await eventually(lambda: "nightly-8" in jobs.jobs, "the job")
            await settled(js)
        finally:
            await asyncio.wait_for(nc.close(), 10)


async def test_token_file_authenticates_and_a_wrong_token_is_retried(tmp_path: Path) -> None:
    right = tmp_path / "token"
    right.write_text("s3cret-token\n")
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    jobs = MemoryJobs()
    with NatsServer(tmp_path / "nats", token="s3cret-token") as server:
        with structlog.testing.capture_logs() as logs:
            async with running(server.url, jobs, wait_ready=False, token_file=str(wrong)) as (
                _messages,
                task,
                ready,
            ):
                await eventually(
                    lambda: any(e["event"] == "scheduler messages unavailable" for e in logs),
                    "the refused connection to be logged",
                )
                assert not ready.is_set()
                assert not task.done(), "run() gave up after a refused connection"
        refusal = next(e for e in logs if e["event"] == "scheduler messages unavailable")
        assert "authorization" in refusal["error"].lower()

        async with running(server.url, jobs, token_file=str(right)):
            nc = await nats.connect(server.url, token="s3cret-token", connect_timeout=5)
            try:
                js = nc.jetstream()
                await publish(js, backup("nightly-9"))
                await eventually(lambda: "nightly-9" in jobs.jobs, "the job")
                await settled(js)
            finally:
                await asyncio.wait_for(nc.close(), 10)


# -- job ends: the outbox --------------------------------------------------------------


async def stored_events(js: JetStreamContext) -> list[tuple[dict[str, Any], str | None]]:
    """Every event the stream holds, oldest first, with its ``Nats-Msg-Id``."""
    sub = await js.subscribe(EVENTS_SUBJECT, ordered_consumer=True)
    found = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1)
            except nats.errors.TimeoutError:
                return found
            found.append((json.loads(msg.data), (msg.headers or {}).get("Nats-Msg-Id")))
    finally:
        await sub.unsubscribe()


def job_states(events: list[tuple[dict[str, Any], str | None]], job_id: str) -> list[str]:
    return [e["job"]["state"] for e, _ in events if e["type"] == "job" and e["job"]["id"] == job_id]


async def test_job_end_is_published_from_the_outbox_in_order_with_a_msg_id(
    nats_server: NatsServer, client: Client
) -> None:
    jobs = MemoryJobs()
    js = client.jetstream()
    events = await client.subscribe(EVENTS_SUBJECT)
    async with running(nats_server.url, jobs):
        await publish(js, backup("end-1"))
        await eventually(lambda: "end-1" in jobs.jobs, "the job")
        jobs.end("end-1", JobState.FAILED)  # right behind "queued" in the event queue
        first = await events.next_msg(timeout=WAIT)
        second = await events.next_msg(timeout=WAIT)
        assert [json.loads(m.data)["job"]["state"] for m in (first, second)] == [
            "queued",
            "failed",
        ]
        assert (second.headers or {}).get("Nats-Msg-Id") == f"{TOKEN}:end-1:failed"
        await eventually(lambda: jobs.published == ["end-1"], "the outbox entry to go")
        assert jobs.outbox == []
    await events.unsubscribe()


async def test_ends_wait_in_the_outbox_while_nats_is_away(
    nats_server: NatsServer, client: Client
) -> None:
    jobs = MemoryJobs()
    js = client.jetstream()
    # An end recorded before the session started (by the start-up, say) goes out first.
    async with running(nats_server.url, jobs):
        await publish(js, backup("before"))
        await publish(js, backup("away"))
        await eventually(lambda: {"before", "away"} <= set(jobs.jobs), "both jobs")
    jobs.end("before", JobState.FAILED)
    async with running(nats_server.url, jobs) as (messages, _task, _ready):
        await eventually(lambda: jobs.published == ["before"], "the earlier end published")
        await asyncio.to_thread(nats_server.stop)
        await eventually(lambda: not messages.connected, "the disconnection")
        jobs.end("away", JobState.CANCELLED)
        await asyncio.sleep(2)  # publishing fails meanwhile; the end must stay
        assert jobs.outbox == ["away"]
        await asyncio.to_thread(nats_server.start)
        await eventually(lambda: jobs.outbox == [], "the end published after the restart", 60)
    assert jobs.published == ["before", "away"]
    stored = await stored_events(js)
    assert job_states(stored, "before")[-1:] == ["failed"]
    assert job_states(stored, "away")[-1:] == ["cancelled"]


async def test_an_end_published_twice_is_stored_once(
    nats_server: NatsServer, client: Client
) -> None:
    jobs = MemoryJobs()
    js = client.jetstream()
    # The store fails to drop the entry once, as after a crash right after the publish:
    # the publisher sends the end again, and JetStream's duplicate window drops it.
    jobs.mark_failures.append(JobStoreError("disk full"))
    async with running(nats_server.url, jobs):
        await publish(js, backup("twice"))
        await eventually(lambda: "twice" in jobs.jobs, "the job")
        jobs.end("twice")
        await eventually(lambda: jobs.published == ["twice"], "the end published", 30)
        assert jobs.mark_failures == []
    stored = await stored_events(js)
    assert job_states(stored, "twice") == ["queued", "succeeded"]
    assert [mid for e, mid in stored if e["job"]["state"] == "succeeded"] == [
        f"{TOKEN}:twice:succeeded"
    ]


async def test_subjects_taken_out_of_the_stream_are_put_back(
    nats_server: NatsServer, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(messages_module, "STREAM_CHECK_INTERVAL", 0.5)
    js = client.jetstream()
    jobs = MemoryJobs()
    async with running(nats_server.url, jobs):
        # Another agent's stale read-modify-write lands: our subjects are gone.
        info = await js.stream_info(STREAM)
        await js.update_stream(info.config.evolve(subjects=["elsewhere.>"]))

        async def restored() -> set[str]:
            return set((await js.stream_info(STREAM)).config.subjects or [])

        deadline = time.monotonic() + WAIT
        while {JOBS_SUBJECT, EVENTS_SUBJECT} - await restored():
            assert time.monotonic() < deadline, "our subjects were not put back"
            await asyncio.sleep(0.1)
        await publish(js, backup("after-loss"))
        await eventually(lambda: "after-loss" in jobs.jobs, "the job")
        await settled(js)


async def test_a_job_the_restart_ended_is_announced_by_the_real_runner(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    async def run(job: Job, progress: Progress, /) -> JobOutcome:
        return JobOutcome()

    path = tmp_path / "jobs.sqlite"
    store = await JobStore.open(path)
    try:
        queued = Job(
            id="killed-in",
            request=JobRequest(kind="backup", domain="vm1", id="killed-in"),
            state=JobState.QUEUED,
            source="nats",
            created_at=time.time(),
        )
        await store.insert_or_get(queued)
        await store.update(queued.with_state(JobState.RUNNING, time.time()))
    finally:
        await store.close()
    # The next agent: its start ends the job before any NATS session exists.
    store = await JobStore.open(path)
    jobs = Jobs(store, dict.fromkeys(JobKind, run), JobsSection())
    js = client.jetstream()
    try:
        restarted = await asyncio.wait_for(jobs.start(), WAIT)
        assert [job.id for job in restarted] == ["killed-in"]
        async with running(nats_server.url, MemoryJobs()):  # makes the stream, then goes
            pass
        events = await client.subscribe(EVENTS_SUBJECT)
        messages = SchedulerMessages(settings(nats_server.url), HOST, jobs)
        task = asyncio.create_task(messages.run())
        try:
            event = await next_event(events)
            assert event["job"]["id"] == "killed-in"
            assert event["job"]["state"] == "failed"
            assert event["job"]["error"]["code"] == "agent-restarted"
            await eventually_async(store.unpublished, [], "the outbox to empty")
            # A live job: its events in order, its end once.
            await publish(js, backup("live"))
            states = [(await next_event(events))["job"]["state"] for _ in range(3)]
            assert states == ["queued", "running", "succeeded"]
            await eventually_async(store.unpublished, [], "the outbox to empty")
        finally:
            task.cancel()
            await asyncio.wait([task], timeout=WAIT)
            await events.unsubscribe()
        assert job_states(await stored_events(js), "live") == ["queued", "running", "succeeded"]
    finally:
        await asyncio.wait_for(jobs.stop(0), WAIT)
        await store.close()


async def eventually_async(
    read: Callable[[], Awaitable[Any]], wanted: Any, what: str, timeout: float = WAIT
) -> None:
    deadline = time.monotonic() + timeout
    while (found := await read()) != wanted:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}: {found}")
        await asyncio.sleep(0.05)
