"""The job runner (agent.control.jobs.Jobs): pure logic, with a real job store and fake runners.

Each fake runner call waits until the test finishes it (with an outcome or an error), so
the test decides when a job ends; nothing here talks to libvirt. Every wait is bounded.
A short settle (``SETTLE``) is used only to show that something does *not* happen.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.backup.plan import BackupMode
from agent.backup.run import BackupResult
from agent.chain.records import DiskChain
from agent.cli.control import describe, status_rows
from agent.control.api import ApiParts, make_app
from agent.control.gate import Gate
from agent.control.job_requests import JOB_ID_RE, Job, JobDisk, JobKind, JobRequest, JobState
from agent.control.job_store import SCHEMA_VERSION, JobStore
from agent.control.jobs import JobFailedError, JobOutcome, JobRunner, Jobs, Progress
from agent.control.metrics import Metrics, StateCollector, domain_coverage
from agent.core.config import BackupSection, JobsSection
from agent.core.errors import (
    AgentError,
    BackupError,
    ConfigError,
    DomainNotFoundError,
    JobConflictError,
    JobError,
    JobNotFoundError,
    JobsClosedError,
    JobStoreError,
    NotConnectedError,
    RepositoryError,
    RepositorySpaceError,
)
from agent.repository.listing import Listing
from agent.repository.manifest import DiskManifest, ExcludedDisk
from agent.virt.inventory import DomainInfo, DomainState, parse_domain
from handlers import job_kinds

WAIT = 10.0  # bound on any wait for something that should happen soon
SETTLE = 0.3  # time given to something that must not happen
UUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
LIMITS = JobsSection(max_concurrent_backups=2, max_concurrent_jobs=4, shutdown_grace=5.0)
OUTCOME = JobOutcome(
    backup_id="20261128T101500Z-1a2b3c",
    disks=(JobDisk("vda", "full", "no checkpoint", 1024), JobDisk("vdb", "incremental", None, 7)),
    result={"bytes": 1031, "files": ["vda.qcow2"]},
)


def request(
    domain: str, job_id: str | None = None, kind: str = "backup", **extra: Any
) -> JobRequest:
    return JobRequest.model_validate({"id": job_id, "kind": kind, "domain": domain, **extra})


class FakeRunners:
    """One runner for every kind; each call waits for :meth:`finish` or :meth:`fail`."""

    def __init__(self) -> None:
        self.calls: list[str] = []  # job ids, in the order the runners were called
        self.log: list[tuple[str, str]] = []  # ("start" | "end", job id)
        self.active: dict[str, Job] = {}
        self.cancelled: set[str] = set()  # runners that saw CancelledError
        self.progress: dict[str, tuple[int, int]] = {}  # reported when the runner starts
        self._gates: dict[str, asyncio.Future[JobOutcome]] = {}
        self._started: dict[str, asyncio.Event] = {}

    def runners(self, kinds: Iterable[JobKind] = tuple(JobKind)) -> dict[JobKind, JobRunner]:
        return dict.fromkeys(kinds, self.run)

    async def run(self, job: Job, progress: Progress, /) -> JobOutcome:
        self.calls.append(job.id)
        self.active[job.id] = job
        self.log.append(("start", job.id))
        if job.id in self.progress:
            progress(*self.progress[job.id])
        self._event(job.id).set()
        try:
            return await self._gate(job.id)
        except asyncio.CancelledError:
            self.cancelled.add(job.id)
            raise
        finally:
            del self.active[job.id]
            self.log.append(("end", job.id))

    def finish(self, job_id: str, outcome: JobOutcome = OUTCOME) -> None:
        self._gate(job_id).set_result(outcome)

    def fail(self, job_id: str, exc: BaseException) -> None:
        self._gate(job_id).set_exception(exc)

    async def started(self, *job_ids: str) -> None:
        for job_id in job_ids:
            await asyncio.wait_for(self._event(job_id).wait(), WAIT)

    def peak(self, job_ids: Iterable[str] | None = None) -> int:
        """Most runners (of ``job_ids``, default all) running at once."""
        wanted = None if job_ids is None else set(job_ids)
        running = peak = 0
        for what, job_id in self.log:
            if wanted is None or job_id in wanted:
                running += 1 if what == "start" else -1
                peak = max(peak, running)
        return peak

    def ended_before_start(self, first: str, second: str) -> bool:
        return self.log.index(("end", first)) < self.log.index(("start", second))

    def _gate(self, job_id: str) -> asyncio.Future[JobOutcome]:
        if job_id not in self._gates:
            self._gates[job_id] = asyncio.get_running_loop().create_future()
        return self._gates[job_id]

    def _event(self, job_id: str) -> asyncio.Event:
        return self._started.setdefault(job_id, asyncio.Event())


class Recorder:
    """A job listener that remembers every state change and lets the test wait for one."""

    def __init__(self) -> None:
        self.seen: list[Job] = []
        self._changed = asyncio.Event()

    def __call__(self, job: Job) -> None:
        self.seen.append(job)
        self._changed.set()

    def states(self, job_id: str) -> list[JobState]:
        return [job.state for job in self.seen if job.id == job_id]

    async def until(self, job_id: str, *states: JobState, timeout: float = WAIT) -> Job:
        async def wait() -> Job:
            while True:
                self._changed.clear()
                last = [job for job in self.seen if job.id == job_id]
                if last and last[-1].state in states:
                    return last[-1]
                await self._changed.wait()

        return await asyncio.wait_for(wait(), timeout)

    async def ended(self, job_id: str, timeout: float = WAIT) -> Job:
        return await self.until(
            job_id, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, timeout=timeout
        )


class GatedStore(JobStore):
    """The real store, whose write of ``hold`` as running waits until ``release`` is set."""

    hold: str | None = None
    entered: asyncio.Event
    release: asyncio.Event

    def arm(self, job_id: str) -> None:
        self.hold = job_id
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def update(self, job: Job) -> None:
        if job.id == self.hold and job.state is JobState.RUNNING:
            self.entered.set()
            await self.release.wait()
        await super().update(job)


MakeJobs = Callable[..., Awaitable[tuple[Jobs, FakeRunners, Recorder]]]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[JobStore]:
    opened = await JobStore.open(tmp_path / "jobs.sqlite")
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def make_jobs(store: JobStore) -> AsyncIterator[MakeJobs]:
    """Started runners on the test's store; stopped (grace 0) at teardown."""
    made: list[Jobs] = []

    async def make(
        limits: JobsSection = LIMITS,
        *,
        kinds: Iterable[JobKind] = tuple(JobKind),
        on: JobStore | None = None,
        start: bool = True,
        **options: Any,
    ) -> tuple[Jobs, FakeRunners, Recorder]:
        runners = FakeRunners()
        recorder = Recorder()
        jobs = Jobs(on or store, runners.runners(kinds), limits, **options)
        jobs.subscribe(recorder)
        made.append(jobs)
        if start:
            await asyncio.wait_for(jobs.start(), WAIT)
        return jobs, runners, recorder

    yield make
    for jobs in made:
        await asyncio.wait_for(jobs.stop(0), 2 * WAIT)


async def submit(jobs: Jobs, req: JobRequest, source: str = "http") -> Job:
    job, created = await asyncio.wait_for(jobs.submit(req, source=source), WAIT)
    assert created
    return job


async def stored(store: JobStore, job_id: str) -> Job:
    job = await store.get(job_id)
    assert job is not None, f"{job_id} is not in the store"
    return job


# -- submitting and running ------------------------------------------------------------


async def test_submitted_job_is_stored_queued_then_runs_and_succeeds(
    store: JobStore, make_jobs: MakeJobs
) -> None:
    jobs, runners, rec = await make_jobs()
    await submit(jobs, request("vm1", "blocker"))
    await runners.started("blocker")

    job, created = await asyncio.wait_for(
        jobs.submit(request("vm1", "j1", mode="full"), source="nats"), WAIT
    )
    assert created
    assert (job.id, job.state, job.source) == ("j1", JobState.QUEUED, "nats")
    assert job.request == request("vm1", "j1", mode="full")
    in_store = await stored(store, "j1")
    assert in_store.state is JobState.QUEUED
    assert in_store.request == job.request
    assert in_store.started_at is None

    runners.progress["j1"] = (3, 10)
    runners.finish("blocker")
    await runners.started("j1")
    live = await jobs.get("j1")
    assert live.state is JobState.RUNNING
    assert (live.progress_done, live.progress_total) == (3, 10)
    assert (await stored(store, "j1")).state is JobState.RUNNING

    runners.finish("j1", OUTCOME)
    done = await rec.ended("j1")
    assert done.state is JobState.SUCCEEDED
    assert runners.calls == ["blocker", "j1"]
    assert rec.states("j1") == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]

    final = await stored(store, "j1")
    assert final.state is JobState.SUCCEEDED
    assert final.backup_id == OUTCOME.backup_id
    assert final.disks == OUTCOME.disks
    assert final.result == OUTCOME.result
    assert (final.error_code, final.error_message) == (None, None)
    assert (final.progress_done, final.progress_total) == (10, 10)
    assert final.started_at is not None
    assert final.finished_at is not None
    assert final.created_at <= final.started_at <= final.finished_at
    assert await jobs.get("j1") == final
    assert jobs.running() == []
    assert jobs.counts() == {JobState.QUEUED: 0, JobState.RUNNING: 0}


async def test_unsubscribed_and_failing_listeners_do_not_see_or_break_jobs(
    make_jobs: MakeJobs,
) -> None:
    jobs, runners, rec = await make_jobs()
    other = Recorder()
    unsubscribe = jobs.subscribe(other)

    def broken(job: Job) -> None:
        raise RuntimeError("listener bug")

    jobs.subscribe(broken)
    await submit(jobs, request("vm1", "a"))
    await runners.started("a")
    unsubscribe()
    runners.finish("a")
    assert (await rec.ended("a")).state is JobState.SUCCEEDED
    assert other.states("a") == [JobState.QUEUED, JobState.RUNNING]


async def test_a_passing_store_fault_at_a_jobs_end_is_tried_again(
    store: JobStore, make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of a job is recorded (and so enters the outbox) even if the first writes
    fail: a job left "running" would be announced only at the next start."""
    jobs, runners, rec = await make_jobs()
    await submit(jobs, request("vm1", "j1"))
    await runners.started("j1")
    real_update = store.update
    failures = 2

    async def flaky_update(job: Job) -> None:
        nonlocal failures
        if job.state.finished and failures:
            failures -= 1
            raise JobStoreError("database is locked")
        await real_update(job)

    monkeypatch.setattr(store, "update", flaky_update)
    runners.finish("j1", OUTCOME)
    assert (await rec.ended("j1")).state is JobState.SUCCEEDED
    assert failures == 0
    assert (await stored(store, "j1")).state is JobState.SUCCEEDED
    assert [job.id for job in await jobs.unpublished_ends(10)] == ["j1"]


async def test_same_id_twice_is_one_job(store: JobStore, make_jobs: MakeJobs) -> None:
    jobs, runners, rec = await make_jobs()
    runners.progress["j1"] = (4, 8)
    first = await submit(jobs, request("vm1", "j1"))
    await runners.started("j1")

    again, created = await asyncio.wait_for(jobs.submit(request("vm1", "j1"), source="nats"), WAIT)
    assert not created
    assert again.id == first.id
    assert again.state is JobState.RUNNING  # its live state, progress included
    assert (again.progress_done, again.progress_total) == (4, 8)
    assert again.source == "http"  # the first submission's

    runners.finish("j1")
    await rec.ended("j1")
    late, created = await asyncio.wait_for(jobs.submit(request("vm1", "j1"), source="http"), WAIT)
    assert not created
    assert late.state is JobState.SUCCEEDED
    await asyncio.sleep(SETTLE)
    assert runners.calls == ["j1"]
    assert rec.states("j1") == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    assert [job.id for job in await store.find()] == ["j1"]


@pytest.mark.parametrize(
    "other",
    [
        request("vm1", "j1", mode="incremental"),
        request("vm2", "j1", mode="full"),
        request("vm1", "j1", kind="verify"),
    ],
    ids=["mode", "domain", "kind"],
)
async def test_same_id_with_another_request_conflicts(
    store: JobStore, make_jobs: MakeJobs, other: JobRequest
) -> None:
    jobs, runners, rec = await make_jobs()
    original = request("vm1", "j1", mode="full")
    await submit(jobs, original)
    await runners.started("j1")
    before = await store.find()

    with pytest.raises(JobConflictError):
        await asyncio.wait_for(jobs.submit(other, source="http"), WAIT)

    assert await store.find() == before
    assert (await stored(store, "j1")).request == original
    runners.finish("j1")
    assert (await rec.ended("j1")).request == original
    assert runners.calls == ["j1"]
    assert rec.states("j1") == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]


async def test_request_without_id_gets_a_generated_one(
    store: JobStore, make_jobs: MakeJobs
) -> None:
    jobs, runners, _ = await make_jobs()
    one = await submit(jobs, request("vm1"))
    two = await submit(jobs, request("vm1"))
    assert one.id != two.id
    for job in (one, two):
        assert JOB_ID_RE.fullmatch(job.id)
        assert job.id.startswith("job-")
        assert job.request.id == job.id
        assert (await stored(store, job.id)).request.id == job.id
    await runners.started(one.id)
    assert runners.calls == [one.id]


async def test_kind_without_runner_is_refused(store: JobStore, make_jobs: MakeJobs) -> None:
    jobs, runners, _ = await make_jobs(kinds=[JobKind.BACKUP])
    with pytest.raises(JobError) as caught:
        await asyncio.wait_for(jobs.submit(request("vm1", "v1", kind="verify"), source="http"), 5)
    assert caught.value.code == "unsupported"
    assert await store.find() == []
    assert runners.calls == []


# -- limits ----------------------------------------------------------------------------


async def test_one_job_per_domain_at_a_time(store: JobStore, make_jobs: MakeJobs) -> None:
    jobs, runners, rec = await make_jobs()
    await submit(jobs, request("vm1", "a"))
    await runners.started("a")
    await submit(jobs, request("vm1", "b"))
    await submit(jobs, request("vm2", "c"))  # younger, other domain: may pass b
    await runners.started("c")

    assert runners.calls == ["a", "c"]
    assert (await stored(store, "b")).state is JobState.QUEUED
    assert jobs.counts() == {JobState.QUEUED: 1, JobState.RUNNING: 2}

    runners.finish("a")
    await runners.started("b")
    assert runners.ended_before_start("a", "b")
    runners.finish("b")
    runners.finish("c")
    for job_id in "abc":
        assert (await rec.ended(job_id)).state is JobState.SUCCEEDED


async def test_at_most_max_concurrent_backups(store: JobStore, make_jobs: MakeJobs) -> None:
    limits = JobsSection(max_concurrent_backups=2, max_concurrent_jobs=4)
    jobs, runners, rec = await make_jobs(limits)
    for n in (1, 2, 3):
        await submit(jobs, request(f"vm{n}", f"b{n}"))
    await runners.started("b1", "b2")
    await submit(jobs, request("vm4", "v4", kind="verify"))  # not a backup: it may run
    await runners.started("v4")

    assert runners.calls == ["b1", "b2", "v4"]
    assert (await stored(store, "b3")).state is JobState.QUEUED

    runners.finish("b2")
    await runners.started("b3")
    assert runners.ended_before_start("b2", "b3")
    for job_id in ("b1", "b3", "v4"):
        runners.finish(job_id)
    for job_id in ("b1", "b2", "b3", "v4"):
        assert (await rec.ended(job_id)).state is JobState.SUCCEEDED
    assert runners.peak(["b1", "b2", "b3"]) == 2


async def test_max_concurrent_jobs_counts_every_kind(store: JobStore, make_jobs: MakeJobs) -> None:
    limits = JobsSection(max_concurrent_backups=2, max_concurrent_jobs=2)
    jobs, runners, rec = await make_jobs(limits)
    await submit(jobs, request("vm1", "v1", kind="verify"))
    await submit(jobs, request("vm2", "r2", kind="reconcile"))
    await runners.started("v1", "r2")
    await submit(jobs, request("vm3", "b3"))
    await asyncio.sleep(SETTLE)

    assert runners.calls == ["v1", "r2"]
    assert (await stored(store, "b3")).state is JobState.QUEUED

    runners.finish("r2")
    await runners.started("b3")
    runners.finish("v1")
    runners.finish("b3")
    for job_id in ("v1", "r2", "b3"):
        assert (await rec.ended(job_id)).state is JobState.SUCCEEDED
    assert runners.peak() == 2


@pytest.mark.parametrize("first", ["vm1", UUID])
async def test_domain_named_by_uuid_and_by_name_is_one_domain(
    store: JobStore, make_jobs: MakeJobs, first: str
) -> None:
    aliases = {UUID: "vm1"}
    jobs, runners, rec = await make_jobs(domain_key=lambda domain: aliases.get(domain, domain))
    second = UUID if first == "vm1" else "vm1"
    await submit(jobs, request(first, "a"))
    await runners.started("a")
    await submit(jobs, request(second, "b", kind="verify"))
    await submit(jobs, request("vm2", "c"))
    await runners.started("c")

    assert runners.calls == ["a", "c"]
    assert (await stored(store, "b")).state is JobState.QUEUED

    runners.finish("a")
    await runners.started("b")
    assert runners.ended_before_start("a", "b")
    runners.finish("b")
    runners.finish("c")
    for job_id in "abc":
        assert (await rec.ended(job_id)).state is JobState.SUCCEEDED


# -- cancelling ------------------------------------------------------------------------


async def test_cancel_queued_job_at_once(store: JobStore, make_jobs: MakeJobs) -> None:
    jobs, runners, rec = await make_jobs()
    await submit(jobs, request("vm1", "a"))
    await runners.started("a")
    await submit(jobs, request("vm1", "b"))

    cancelled = await asyncio.wait_for(jobs.cancel("b"), WAIT)
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.error_code == "cancelled"
    in_store = await stored(store, "b")
    assert (in_store.state, in_store.error_code) == (JobState.CANCELLED, "cancelled")
    assert in_store.finished_at is not None
    assert in_store.started_at is None
    assert rec.states("b") == [JobState.QUEUED, JobState.CANCELLED]

    runners.finish("a")
    await rec.ended("a")
    await submit(jobs, request("vm1", "c"))  # the domain is free, and b stays dropped
    await runners.started("c")
    assert runners.calls == ["a", "c"]
    assert (await stored(store, "b")).state is JobState.CANCELLED


async def test_cancel_running_job(store: JobStore, make_jobs: MakeJobs) -> None:
    jobs, runners, rec = await make_jobs()
    await submit(jobs, request("vm1", "a"))
    await runners.started("a")

    answer = await asyncio.wait_for(jobs.cancel("a"), WAIT)
    assert answer.state is JobState.RUNNING  # it undoes its work first
    done = await rec.ended("a")
    assert (done.state, done.error_code) == (JobState.CANCELLED, "cancelled")
    assert runners.cancelled == {"a"}
    in_store = await stored(store, "a")
    assert (in_store.state, in_store.error_code) == (JobState.CANCELLED, "cancelled")
    assert rec.states("a") == [JobState.QUEUED, JobState.RUNNING, JobState.CANCELLED]

    await submit(jobs, request("vm1", "b"))
    await runners.started("b")  # the domain is free again


async def test_cancel_job_the_moment_it_is_reported_running(
    store: JobStore, make_jobs: MakeJobs
) -> None:
    # A client told "running" may cancel before the job's task has taken its first step;
    # a task cancelled then never runs its body, so nothing would ever end the job.
    jobs, runners, rec = await make_jobs()
    await submit(jobs, request("vm1", "a"))
    await runners.started("a")
    await submit(jobs, request("vm1", "b"))

    async def cancel_as_soon_as_running() -> None:
        # Polling once per loop turn (not an Event, whose waiter wakes after the job's
        # task has taken its first step) lands between the "running" report and that step.
        while JobState.RUNNING not in rec.states("b"):  # noqa: ASYNC110
            await asyncio.sleep(0)
        await jobs.cancel("b")

    canceller = asyncio.create_task(cancel_as_soon_as_running())
    runners.finish("a")
    await asyncio.wait_for(canceller, WAIT)

    done = await rec.ended("b")
    assert (done.state, done.error_code) == (JobState.CANCELLED, "cancelled")
    assert "b" not in runners.active
    assert (await stored(store, "b")).state is JobState.CANCELLED
    await submit(jobs, request("vm1", "c"))
    await runners.started("c")  # the domain is not held by a job that never ends


async def test_cancel_while_job_is_being_recorded_as_running(tmp_path: Path) -> None:
    gated = await GatedStore.open(tmp_path / "jobs.sqlite")
    assert isinstance(gated, GatedStore)
    runners, rec = FakeRunners(), Recorder()
    jobs = Jobs(gated, runners.runners(), LIMITS)
    jobs.subscribe(rec)
    try:
        await jobs.start()
        gated.arm("a")
        await submit(jobs, request("vm1", "a"))
        await asyncio.wait_for(gated.entered.wait(), WAIT)

        answer = await asyncio.wait_for(jobs.cancel("a"), WAIT)  # not "already ended"
        assert not answer.state.finished
        gated.release.set()

        done = await rec.ended("a")
        assert (done.state, done.error_code) == (JobState.CANCELLED, "cancelled")
        assert runners.calls == []
        assert (await stored(gated, "a")).state is JobState.CANCELLED
        await submit(jobs, request("vm1", "b"))
        await runners.started("b")
    finally:
        await asyncio.wait_for(jobs.stop(0), 2 * WAIT)
        await gated.close()


async def test_cancel_queued_job_while_another_is_being_started(tmp_path: Path) -> None:
    # The scheduler walks a snapshot of the queue and awaits the store as it starts each
    # job; a job cancelled meanwhile must be skipped, and the scheduler must live on.
    gated = await GatedStore.open(tmp_path / "jobs.sqlite")
    for n, job_id in enumerate(("a", "b", "c")):
        req = request(f"vm{n}", job_id)
        job = Job(id=job_id, request=req, state=JobState.QUEUED, source="http", created_at=1.0)
        await gated.insert_or_get(job)
    runners, rec = FakeRunners(), Recorder()
    jobs = Jobs(gated, runners.runners(), LIMITS)
    jobs.subscribe(rec)
    try:
        gated.arm("a")
        await jobs.start()
        await asyncio.wait_for(gated.entered.wait(), WAIT)
        cancelled = await asyncio.wait_for(jobs.cancel("b"), WAIT)
        assert cancelled.state is JobState.CANCELLED
        gated.release.set()

        await runners.started("a", "c")
        await submit(jobs, request("vm1", "d", kind="verify"))  # (two backups run)
        await runners.started("d")
        assert sorted(runners.calls) == ["a", "c", "d"]
        assert (await stored(gated, "b")).state is JobState.CANCELLED
        assert rec.states("b") == [JobState.CANCELLED]
    finally:
        await asyncio.wait_for(jobs.stop(0), 2 * WAIT)
        await gated.close()


async def test_cancel_finished_or_unknown_job(store: JobStore, make_jobs: MakeJobs) -> None:
    jobs, runners, rec = await make_jobs()
    await submit(jobs, request("vm1", "a"))
    runners.finish("a")
    await rec.ended("a")
    before = await stored(store, "a")

    with pytest.raises(JobConflictError):
        await asyncio.wait_for(jobs.cancel("a"), WAIT)
    assert await stored(store, "a") == before
    assert before.state is JobState.SUCCEEDED
    with pytest.raises(JobNotFoundError):
        await asyncio.wait_for(jobs.cancel("no-such-job"), WAIT)
    with pytest.raises(JobNotFoundError):
        await asyncio.wait_for(jobs.get("no-such-job"), WAIT)


# -- deadlines -------------------------------------------------------------------------


async def test_queued_job_is_dropped_at_its_deadline(store: JobStore, make_jobs: MakeJobs) -> None:
    jobs, runners, rec = await make_jobs()
    await submit(jobs, request("vm1", "a"))
    await runners.started("a")
    deadline = datetime.now(UTC) + timedelta(seconds=0.5)
    await submit(jobs, request("vm1", "b", deadline=deadline))

    # Well before the scheduler's periodic look (5 s): it wakes up for the deadline.
    dropped = await rec.ended("b", timeout=3.0)
    assert (dropped.state, dropped.error_code) == (JobState.CANCELLED, "deadline-passed")
    assert dropped.finished_at is not None
    assert dropped.finished_at >= deadline.timestamp()
    assert "a" in runners.active  # it was dropped while a still ran
    in_store = await stored(store, "b")
    assert (in_store.state, in_store.error_code) == (JobState.CANCELLED, "deadline-passed")

    runners.finish("a")
    assert (await rec.ended("a")).state is JobState.SUCCEEDED
    await asyncio.sleep(SETTLE)
    assert runners.calls == ["a"]


async def test_job_submitted_past_its_deadline_never_runs(make_jobs: MakeJobs) -> None:
    jobs, runners, rec = await make_jobs()
    past = datetime.now(UTC) - timedelta(seconds=1)
    await submit(jobs, request("vm1", "late", deadline=past))
    dropped = await rec.ended("late")
    assert (dropped.state, dropped.error_code) == (JobState.CANCELLED, "deadline-passed")
    assert runners.calls == []


# -- restart ---------------------------------------------------------------------------


async def test_restart_reports_a_running_job_whose_work_was_done_as_succeeded(
    tmp_path: Path, make_jobs: MakeJobs
) -> None:
    """A backup published just before the agent died stands: the job says so (with its
    backup), not agent-restarted; one it cannot tell about fails as before (the plain
    case: test_restart_fails_running_jobs_and_runs_queued_ones)."""
    path = tmp_path / "crash.sqlite"
    old_store = await JobStore.open(path)
    old, old_runners, _ = await make_jobs(on=old_store)
    for job_id, domain in (("done", "vm1"), ("unknown", "vm2")):
        await submit(old, request(domain, job_id))
        await old_runners.started(job_id)
    await old_store.close()
    await asyncio.wait_for(old.stop(0), WAIT)

    async def finished(job: Job) -> JobOutcome | None:
        if job.id == "unknown":
            raise RepositoryError("repository away")
        if job.id == "done":
            disk = JobDisk("vda", "incremental", None, 4096)
            return JobOutcome(backup_id="b-1", disks=(disk,), result={"finished_by": "x"})
        return None

    store = await JobStore.open(path)
    try:
        jobs, _, rec = await make_jobs(on=store, start=False)
        restarted = await asyncio.wait_for(jobs.start(finished), WAIT)
        states = {job.id: (job.state, job.error_code, job.backup_id) for job in restarted}
        assert states == {
            "done": (JobState.SUCCEEDED, None, "b-1"),
            "unknown": (JobState.FAILED, "agent-restarted", None),
        }
        done = await stored(store, "done")
        assert (done.state, done.backup_id, done.result) == (
            JobState.SUCCEEDED,
            "b-1",
            {"finished_by": "x"},
        )
        assert [d.target for d in done.disks] == ["vda"]
        assert rec.states("done") == [JobState.SUCCEEDED]
        ends = {job.id: job.state for job in await jobs.unpublished_ends(10)}
        assert ends == {"done": JobState.SUCCEEDED, "unknown": JobState.FAILED}
        await asyncio.wait_for(jobs.stop(0), WAIT)
    finally:
        await store.close()


async def test_restart_fails_running_jobs_and_runs_queued_ones(
    tmp_path: Path, make_jobs: MakeJobs
) -> None:
    path = tmp_path / "crash.sqlite"
    old_store = await JobStore.open(path)
    old, old_runners, _ = await make_jobs(on=old_store)
    await submit(old, request("vm1", "r"))
    await old_runners.started("r")
    await submit(old, request("vm1", "q1"))
    await submit(old, request("vm1", "q2", kind="verify"))
    # The agent dies: nothing it does from now on reaches the store.
    await old_store.close()
    await asyncio.wait_for(old.stop(0), WAIT)

    store = await JobStore.open(path)
    try:
        left = {job.id: job.state for job in await store.unfinished()}
        assert left == {"r": JobState.RUNNING, "q1": JobState.QUEUED, "q2": JobState.QUEUED}

        jobs, runners, rec = await make_jobs(on=store, start=False)
        restarted = await asyncio.wait_for(jobs.start(), WAIT)
        assert [job.id for job in restarted] == ["r"]
        assert restarted[0].state is JobState.FAILED
        assert restarted[0].error_code == "agent-restarted"
        failed = await stored(store, "r")
        assert (failed.state, failed.error_code) == (JobState.FAILED, "agent-restarted")
        assert failed.finished_at is not None
        assert rec.states("r") == [JobState.FAILED]
        # Its end waits in the outbox for the scheduler messages, whenever they start.
        ends = await jobs.unpublished_ends(10)
        assert [(job.id, job.error_code) for job in ends] == [("r", "agent-restarted")]

        await runners.started("q1")
        runners.finish("q1")
        await runners.started("q2")
        runners.finish("q2")
        for job_id in ("q1", "q2"):
            assert (await rec.ended(job_id)).state is JobState.SUCCEEDED
            assert (await stored(store, job_id)).state is JobState.SUCCEEDED
        assert runners.calls == ["q1", "q2"]  # oldest first, never r
        assert await store.unfinished() == []
        await asyncio.wait_for(jobs.stop(0), WAIT)
    finally:
        await store.close()


async def test_start_forgets_long_finished_jobs(store: JobStore, make_jobs: MakeJobs) -> None:
    now = time.time()
    for job_id, finished in (("old", now - 31 * 86400), ("recent", now - 29 * 86400)):
        job = Job(
            id=job_id,
            request=request("vm1", job_id),
            state=JobState.SUCCEEDED,
            source="http",
            created_at=finished - 10,
            started_at=finished - 5,
            finished_at=finished,
        )
        await store.insert_or_get(job)
    assert [job.id for job in await store.unpublished()] == ["old", "recent"]
    await make_jobs(JobsSection(keep_finished_days=30))
    assert [job.id for job in await store.find()] == ["recent"]
    assert [job.id for job in await store.unpublished()] == ["recent"]  # bounded with the jobs


# -- shutdown --------------------------------------------------------------------------


async def test_stop_lets_a_job_finish_within_the_grace_period(
    store: JobStore, make_jobs: MakeJobs
) -> None:
    jobs, runners, rec = await make_jobs()
    await submit(jobs, request("vm1", "a"))
    await runners.started("a")
    await submit(jobs, request("vm1", "q"))

    stopping = asyncio.create_task(jobs.stop(grace=30))
    await asyncio.sleep(SETTLE)
    assert not stopping.done()
    assert not jobs.accepting
    with pytest.raises(JobsClosedError):
        await asyncio.wait_for(jobs.submit(request("vm2", "late"), source="http"), WAIT)

    runners.finish("a")
    await asyncio.wait_for(stopping, WAIT)  # long before the grace period ends
    done = await stored(store, "a")
    assert (done.state, done.backup_id) == (JobState.SUCCEEDED, OUTCOME.backup_id)
    assert (await stored(store, "q")).state is JobState.QUEUED
    assert await store.get("late") is None
    assert runners.calls == ["a"]
    assert rec.states("q") == [JobState.QUEUED]


async def test_stop_cancels_a_job_still_running_after_the_grace_period(
    store: JobStore, make_jobs: MakeJobs
) -> None:
    jobs, runners, rec = await make_jobs()
    await submit(jobs, request("vm1", "a"))
    await runners.started("a")
    await submit(jobs, request("vm1", "q"))
    await submit(jobs, request("vm2", "q2"))
    await runners.started("q2")
    runners.finish("q2")
    await rec.ended("q2")

    began = time.monotonic()
    await asyncio.wait_for(jobs.stop(grace=0.5), WAIT)
    assert time.monotonic() - began >= 0.5
    assert runners.cancelled == {"a"}
    done = await stored(store, "a")
    assert (done.state, done.error_code) == (JobState.CANCELLED, "agent-stopping")
    assert (await stored(store, "q")).state is JobState.QUEUED
    with pytest.raises(JobsClosedError):
        await asyncio.wait_for(jobs.submit(request("vm3", "late"), source="http"), WAIT)
    await asyncio.sleep(SETTLE)
    assert runners.calls == ["a", "q2"]


async def test_submit_before_start_is_refused(store: JobStore, make_jobs: MakeJobs) -> None:
    jobs, _, _ = await make_jobs(start=False)
    with pytest.raises(JobsClosedError):
        await asyncio.wait_for(jobs.submit(request("vm1", "a"), source="http"), WAIT)
    assert await store.find() == []


# -- failures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BackupError("chain broken at vda", code="chain-broken", domain="vm1"), "chain-broken"),
        (JobError("no such domain here", code="domain-not-found"), "domain-not-found"),
        (RepositorySpaceError("needs 10 GiB, 2 GiB free"), "no-space"),
        (DomainNotFoundError("vm1 is gone"), "domain-not-found"),
        (NotConnectedError("libvirtd went away"), "libvirt-unavailable"),
        (ConfigError("some other agent error"), "failed"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, AgentError) else str(value),
)
async def test_runner_agent_error_fails_the_job_with_its_code(
    store: JobStore, make_jobs: MakeJobs, error: AgentError, code: str
) -> None:
    jobs, runners, rec = await make_jobs()
    await submit(jobs, request("vm1", "a"))
    await runners.started("a")
    runners.fail("a", error)
    failed = await rec.ended("a")
    assert (failed.state, failed.error_code, failed.error_message) == (
        JobState.FAILED,
        code,
        str(error),
    )
    in_store = await stored(store, "a")
    assert (in_store.state, in_store.error_code, in_store.error_message) == (
        JobState.FAILED,
        code,
        str(error),
    )
    assert in_store.backup_id is None


async def test_job_failed_error_keeps_its_result(store: JobStore, make_jobs: MakeJobs) -> None:
    jobs, runners, rec = await make_jobs()
    await submit(jobs, request("vm1", "v", kind="verify"))
    await runners.started("v")
    problems: Mapping[str, Any] = {"problems": ["vda: checksum mismatch"]}
    runners.fail("v", JobFailedError("1 problem found", code="verify-failed", result=problems))
    await rec.ended("v")
    in_store = await stored(store, "v")
    assert (in_store.state, in_store.error_code) == (JobState.FAILED, "verify-failed")
    assert in_store.error_message == "1 problem found"
    assert in_store.result == problems


async def test_runner_bug_fails_the_job_and_the_runner_goes_on(
    store: JobStore, make_jobs: MakeJobs
) -> None:
    jobs, runners, rec = await make_jobs()
    await submit(jobs, request("vm1", "a"))
    await submit(jobs, request("vm1", "b"))
    await runners.started("a")
    runners.fail("a", RuntimeError("boom"))
    failed = await rec.ended("a")
    assert (failed.state, failed.error_code, failed.error_message) == (
        JobState.FAILED,
        "internal-error",
        "boom",
    )
    assert (await stored(store, "a")).error_code == "internal-error"

    await runners.started("b")
    runners.finish("b")
    assert (await rec.ended("b")).state is JobState.SUCCEEDED
    await submit(jobs, request("vm1", "c"))
    await runners.started("c")


# -- can_start -------------------------------------------------------------------------


async def test_jobs_wait_while_they_cannot_start(store: JobStore, make_jobs: MakeJobs) -> None:
    allowed = False
    jobs, runners, rec = await make_jobs(can_start=lambda: allowed)
    await submit(jobs, request("vm1", "a"))
    await submit(jobs, request("vm2", "b", kind="verify"))
    await asyncio.sleep(SETTLE)
    assert runners.calls == []
    for job_id in "ab":
        assert (await stored(store, job_id)).state is JobState.QUEUED

    allowed = True
    await submit(jobs, request("vm3", "c"))  # wakes the scheduler
    await runners.started("a", "b", "c")
    assert runners.calls == ["a", "b", "c"]  # oldest first
    for job_id in "abc":
        runners.finish(job_id)
        assert (await rec.ended(job_id)).state is JobState.SUCCEEDED


async def test_scheduler_looks_again_without_being_woken(make_jobs: MakeJobs) -> None:
    allowed = False
    jobs, runners, _ = await make_jobs(can_start=lambda: allowed)
    await submit(jobs, request("vm1", "a"))
    await asyncio.sleep(SETTLE)
    assert runners.calls == []
    allowed = True
    began = time.monotonic()
    await runners.started("a")
    assert time.monotonic() - began < 6.0


# -- listing and forgetting ------------------------------------------------------------


async def test_find_filters_and_forget_finished(store: JobStore, make_jobs: MakeJobs) -> None:
    jobs, runners, rec = await make_jobs()
    await submit(jobs, request("vm1", "a"))
    runners.finish("a")
    await rec.ended("a")
    await submit(jobs, request("vm2", "b", kind="verify"))
    runners.fail("b", BackupError("bad", code="chain-broken"))
    await rec.ended("b")
    runners.progress["d"] = (5, 50)
    await submit(jobs, request("vm1", "d"))
    await runners.started("d")
    await submit(jobs, request("vm1", "c"))
    await asyncio.wait_for(jobs.cancel("c"), WAIT)

    assert [job.id for job in await store.find()] == ["c", "d", "b", "a"]  # newest first
    assert [job.id for job in await store.find(domain="vm1")] == ["c", "d", "a"]
    assert [job.id for job in await store.find(domain="vm2")] == ["b"]
    assert [job.id for job in await store.find(state=JobState.FAILED)] == ["b"]
    assert [job.id for job in await store.find(domain="vm1", state=JobState.SUCCEEDED)] == ["a"]
    assert await store.find(domain="vm2", state=JobState.SUCCEEDED) == []
    assert [job.id for job in await store.find(limit=2)] == ["c", "d"]
    running = await jobs.find(state=JobState.RUNNING)
    assert [job.id for job in running] == ["d"]
    assert (running[0].progress_done, running[0].progress_total) == (5, 50)  # live
    assert [job.id for job in await jobs.find(domain="vm1")] == ["c", "d", "a"]

    assert await store.forget_finished(0.0) == 0
    finished_at = {job.id: job.finished_at for job in await store.find()}
    assert await store.forget_finished(finished_at["b"] or 0.0) == 1  # a ended before b
    assert [job.id for job in await store.find()] == ["c", "d", "b"]
    assert await store.forget_finished(time.time() + 1) == 2
    assert [job.id for job in await store.find()] == ["d"]  # running jobs stay
    runners.finish("d")
    await rec.ended("d")


# -- the outbox of job ends ------------------------------------------------------------


async def test_every_end_enters_the_outbox_once_oldest_first(
    store: JobStore, make_jobs: MakeJobs
) -> None:
    jobs, runners, rec = await make_jobs()
    await submit(jobs, request("vm1", "a"))
    runners.finish("a")
    await rec.ended("a")
    await submit(jobs, request("vm2", "b"))
    runners.fail("b", BackupError("bad", code="chain-broken"))
    await rec.ended("b")
    await submit(jobs, request("vm3", "running"))
    await runners.started("running")
    await submit(jobs, request("vm3", "c"))
    await asyncio.wait_for(jobs.cancel("c"), WAIT)

    ends = await jobs.unpublished_ends(10)
    assert [(j.id, j.state) for j in ends] == [
        ("a", JobState.SUCCEEDED),
        ("b", JobState.FAILED),
        ("c", JobState.CANCELLED),
    ]
    assert ends == [await stored(store, j.id) for j in ends]  # the job as stored
    assert [j.id for j in await jobs.unpublished_ends(2)] == ["a", "b"]

    await jobs.end_published("b")
    await jobs.end_published("a")
    # Writing a finished job again does not announce it again.
    await store.update(replace(await stored(store, "a"), error_message="rewritten"))
    assert [j.id for j in await jobs.unpublished_ends(10)] == ["c"]
    runners.finish("running")
    await rec.ended("running")
    assert [j.id for j in await jobs.unpublished_ends(10)] == ["c", "running"]


async def test_a_version_1_store_is_migrated_and_its_killed_job_announced(
    tmp_path: Path, make_jobs: MakeJobs
) -> None:
    path = tmp_path / "v1.sqlite"
    old = await JobStore.open(path)
    job = Job(
        id="r",
        request=request("vm1", "r"),
        state=JobState.RUNNING,
        source="nats",
        created_at=time.time(),
        started_at=time.time(),
    )
    await old.insert_or_get(job)
    await old.close()

    def as_version_1() -> None:  # what agents before the outbox wrote
        db = sqlite3.connect(path)
        try:
            db.execute("DROP TABLE outbox")
            db.execute("PRAGMA user_version = 1")
            db.commit()
        finally:
            db.close()

    def version() -> int:
        db = sqlite3.connect(path)
        try:
            found: int = db.execute("PRAGMA user_version").fetchone()[0]
            return found
        finally:
            db.close()

    await asyncio.to_thread(as_version_1)
    store = await JobStore.open(path)
    try:
        assert await asyncio.to_thread(version) == SCHEMA_VERSION == 3
        assert await store.unpublished() == []  # nothing invented for old jobs
        jobs, _, _ = await make_jobs(on=store)
        assert [j.id for j in await jobs.unpublished_ends(10)] == ["r"]
        assert (await stored(store, "r")).error_code == "agent-restarted"
        await asyncio.wait_for(jobs.stop(0), WAIT)
    finally:
        await store.close()


async def test_newer_or_foreign_database_files_are_refused(tmp_path: Path) -> None:
    def make(path: Path, *statements: str) -> None:
        db = sqlite3.connect(path)
        try:
            for statement in statements:
                db.execute(statement)
            db.commit()
        finally:
            db.close()

    newer, foreign = tmp_path / "newer.sqlite", tmp_path / "foreign.sqlite"
    await asyncio.to_thread(make, newer, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    await asyncio.to_thread(make, foreign, "CREATE TABLE t (x)")
    with pytest.raises(JobStoreError, match=f"version {SCHEMA_VERSION + 1} is newer than this"):
        await JobStore.open(newer)
    with pytest.raises(JobStoreError, match="is an SQLite database but not a job store"):
        await JobStore.open(foreign)


# -- every disk of a domain: the job, the API, status and metrics (issue 22) -------------

DB1_XML = """<domain type='kvm'><name>db1</name><uuid>{uuid}</uuid><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/images/db1-vda.qcow2'/><target dev='vda' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
    <source file='/iso/install.iso'/><target dev='sdc' bus='sata'/><readonly/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='raw'/>
    <source file='/images/db1-vdb.img'/><target dev='vdb' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
    <source file='/iso/drivers.iso'/><target dev='sdd' bus='sata'/><readonly/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/images/db1-vdd.qcow2'/><target dev='vdd' bus='virtio'/></disk>
</devices></domain>"""
WEB_XML = """<domain type='kvm'><name>web</name><uuid>{uuid}</uuid><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/images/web-vda.qcow2'/><target dev='vda' bus='virtio'/></disk>
  <disk type='block' device='disk'><driver name='qemu' type='raw'/>
    <source dev='/dev/vg/shared'/><target dev='vdb' bus='virtio'/><shareable/></disk>
</devices></domain>"""
APP_XML = """<domain type='kvm'><name>app</name><uuid>{uuid}</uuid><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/images/app-vda.qcow2'/><target dev='vda' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
    <source file='/iso/install.iso'/><target dev='sdc' bus='sata'/><readonly/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/images/app-vdb.qcow2'/><target dev='vdb' bus='virtio'/><readonly/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/images/app-vdd.qcow2'/><target dev='vdd' bus='virtio'/></disk>
</devices></domain>"""
EXCLUDE = BackupSection(exclude={"db*": ["vdd"]})


def live_domain(xml: str, uuid: str) -> DomainInfo:
    return parse_domain(xml.format(uuid=uuid), persistent=True, state=DomainState.RUNNING)


def chain(domain: str, target: str, reason: str | None = None) -> DiskChain:
    return DiskChain(domain, target, reason is None, reason, reason or "fine", 0.0)


class FakeHost:
    """What ``GET /v1/domains`` reads: live domains, the ledger, an empty repository."""

    def __init__(self) -> None:
        db1, web = live_domain(DB1_XML, UUID), live_domain(WEB_XML, UUID.replace("1b", "2c"))
        self.live = {db1.uuid: db1, web.uuid: web}
        self.chains = {
            "db1": {  # vdz: a disk the domain no longer has
                "vda": chain("db1", "vda"),
                "vdd": chain("db1", "vdd"),
                "vdz": chain("db1", "vdz"),
            },
            "web": {"vda": chain("web", "vda", "bitmap-missing")},
            "gone": {"vda": chain("gone", "vda")},
        }
        self.ledger = self

    # Domains
    def all(self) -> Mapping[str, DomainInfo]:
        return self.live

    def name_of(self, domain: str) -> str:
        return next((i.name for i in self.live.values() if domain in (i.uuid, i.name)), domain)

    # Ledger
    async def domains(self) -> list[str]:
        return sorted(self.chains)

    async def disk_chains(self, domain: str) -> dict[str, DiskChain]:
        return self.chains.get(domain, {})

    # Repository
    async def listing(self, domain: str) -> Listing:
        return Listing((), ())

    def coverage(self) -> dict[str, Any]:
        return {i.name: domain_coverage(i, EXCLUDE) for i in self.live.values()}


async def test_a_backup_job_lists_every_disk_and_counts_only_those_copied(
    store: JobStore, make_jobs: MakeJobs
) -> None:
    """The job of a backup that left disks out names each (mode ``excluded``, its reason,
    nothing copied) in the domain's order, through the store; ``backup --wait`` prints
    it; the metrics count the backup as incremental (not mixed) and no forced full."""
    info = live_domain(APP_XML, UUID)

    def copied(target: str, mode: str, reason: str | None, size: int) -> DiskManifest:
        return DiskManifest(target, f"{target}.qcow2", mode, reason, size, size, None, ())

    result = BackupResult(
        "20261128T101500Z-1a2b3c",
        "app",
        "cp-2",
        (copied("vda", "incremental", None, 4096),),
        1.5,
        (
            ExcludedDisk("sdc", "device-cdrom"),
            ExcludedDisk("vdb", "readonly"),
            ExcludedDisk("vdd", "excluded-by-config"),
        ),
    )

    async def run(uuid: str, mode: BackupMode, **options: Any) -> BackupResult:
        assert uuid == info.uuid
        return result

    async def backups(domain: str) -> list[Any]:
        return []

    ctx: Any = SimpleNamespace(
        domains=SimpleNamespace(find=lambda domain: info),
        backups=SimpleNamespace(run=run, repository=SimpleNamespace(backups=backups)),
    )
    metrics = Metrics()
    jobs, runners, recorder = await make_jobs()
    jobs.subscribe(metrics.job_changed)
    job = await submit(jobs, request("app", "with-excluded"))
    await runners.started(job.id)
    runners.finish(job.id, await job_kinds.backup(ctx, job, lambda done, total: None))
    assert (await recorder.ended(job.id)).state is JobState.SUCCEEDED
    shown = (await stored(store, job.id)).to_json()
    assert shown["disks"] == [
        {"target": "vda", "mode": "incremental", "reason": None, "bytes_copied": 4096},
        {"target": "sdc", "mode": "excluded", "reason": "device-cdrom", "bytes_copied": 0},
        {"target": "vdb", "mode": "excluded", "reason": "readonly", "bytes_copied": 0},
        {"target": "vdd", "mode": "excluded", "reason": "excluded-by-config", "bytes_copied": 0},
    ]
    line = describe(shown)
    assert "(vda incremental, sdc excluded [device-cdrom], vdb excluded [readonly], " in line
    assert "vdd excluded [excluded-by-config])" in line
    rendered = metrics.render().decode()
    assert 'backup_agent_backups_total{mode="incremental",result="succeeded"} 1.0' in rendered
    assert 'backup_agent_backups_total{mode="mixed",result="succeeded"} 0.0' in rendered
    assert "backup_agent_bytes_copied_total 4096.0" in rendered


def test_a_raw_disk_read_in_full_is_no_forced_full() -> None:
    """A disk with no bitmap is full every time: not counted as a full the chain forced."""
    job = Job(
        "j",
        request("db1"),
        JobState.SUCCEEDED,
        "http",
        0.0,
        1.0,
        2.0,
        disks=(
            JobDisk("vda", "full", "bitmap-inconsistent", 10),
            JobDisk("vdb", "full", "format-raw: no persistent bitmap", 20),
            JobDisk("sdc", "excluded", "device-cdrom", 0),
        ),
    )
    metrics = Metrics()
    metrics.job_changed(job)
    rendered = metrics.render().decode()
    assert 'backup_agent_full_backups_forced_total{reason="bitmap-inconsistent"} 1.0' in rendered
    assert "no persistent bitmap" not in rendered
    assert 'backup_agent_backups_total{mode="full",result="succeeded"} 1.0' in rendered


async def test_domains_show_how_every_disk_is_backed_up_and_status_says_partial() -> None:
    """``GET /v1/domains``: every disk of a live domain (qcow2 incremental, raw full, CD-ROMs
    and a disk configuration leaves out excluded, with their reasons), merged with the
    ledger's chains; ``partial`` only for a writable disk left out silently (shareable);
    ``status`` shows it in CHAIN and every disk in DISKS."""
    host = FakeHost()
    parts: Any = ApiParts(
        jobs=cast(Any, None),
        chains=cast(Any, host),
        domains=cast(Any, host),
        connection=cast(Any, None),
        repository=cast(Any, host),
        metrics=Metrics(),
        backup=EXCLUDE,
    )
    async with TestClient(TestServer(make_app(parts, Gate(token=None, hosts=None)))) as client:
        response = await client.get("/v1/domains")
        assert response.status == 200
        body = await response.json()
        schema = (await (await client.get("/v1/openapi.json")).json())["components"]["schemas"]
    domains = {d["name"]: d for d in body["domains"]}
    assert list(domains) == ["db1", "gone", "web"]

    def disks(name: str) -> list[tuple[Any, ...]]:
        return [
            (x["target"], x["chain_valid"], x["reason"], x["backup"], x["backup_reason"])
            for x in domains[name]["disks"]
        ]

    raw = "format-raw: no persistent bitmap"
    assert disks("db1") == [  # the domain's order, then the ledger's other disks
        ("vda", True, None, "incremental", None),
        ("sdc", None, None, "excluded", "device-cdrom"),
        ("vdb", None, None, "full", raw),
        ("sdd", None, None, "excluded", "device-cdrom"),
        ("vdd", True, None, "excluded", "excluded-by-config"),
        ("vdz", True, None, None, None),
    ]
    # Nothing writable left out by accident.
    assert (domains["db1"]["partial"], domains["db1"]["partial_disks"]) == (False, [])
    assert domains["db1"]["not_backed_up"] == [
        {"target": "sdc", "reason": "device-cdrom"},
        {"target": "sdd", "reason": "device-cdrom"},
        {"target": "vdd", "reason": "excluded-by-config"},
    ]
    assert disks("web") == [
        ("vda", False, "bitmap-missing", "incremental", None),
        ("vdb", None, None, "excluded", "shareable"),
    ]
    assert (domains["web"]["partial"], domains["web"]["partial_disks"]) == (True, ["vdb"])
    assert domains["web"]["not_backed_up"] == [{"target": "vdb", "reason": "shareable"}]
    assert disks("gone") == [("vda", True, None, None, None)]
    assert domains["gone"]["partial"] is None and domains["gone"]["not_backed_up"] is None
    assert domains["gone"]["partial_disks"] is None
    # The document describes what is served.
    for domain in body["domains"]:
        required = schema["Domains"]["properties"]["domains"]["items"]["required"]
        assert set(required) <= set(domain)
        assert all(set(schema["DomainDisk"]["required"]) <= set(x) for x in domain["disks"])

    rows = {row[0]: row for row in status_rows(body["domains"])}
    assert rows["DOMAIN"][:4] == ["DOMAIN", "STATE", "CHAIN", "DISKS"]
    assert rows["db1"][2:4] == [
        "ok",
        "vda:incremental,sdc:excluded,vdb:full,sdd:excluded,vdd:excluded",
    ]
    assert rows["web"][2:4] == [
        "broken vda:bitmap-missing partial vdb:shareable",
        "vda:incremental,vdb:excluded",
    ]
    assert rows["gone"][1:4] == ["undefined", "ok", "-"]


def test_metrics_say_which_domains_are_partial_and_count_excluded_disks() -> None:
    host = FakeHost()
    metrics = Metrics()
    metrics.add_collector(
        StateCollector(lambda: True, lambda: 0, lambda: {}, coverage=host.coverage)
    )
    lines = metrics.render().decode().splitlines()
    assert 'backup_agent_domain_partial{domain="db1"} 0.0' in lines
    assert 'backup_agent_domain_partial{domain="web"} 1.0' in lines
    excluded = sorted(line for line in lines if line.startswith("backup_agent_disks_excluded{"))
    assert excluded == [
        'backup_agent_disks_excluded{domain="db1",reason="device-cdrom"} 2.0',
        'backup_agent_disks_excluded{domain="db1",reason="excluded-by-config"} 1.0',
        'backup_agent_disks_excluded{domain="web",reason="shareable"} 1.0',
    ]
