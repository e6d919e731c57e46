"""The job runner: queue, limits, cancellation, deadlines, restart and shutdown.

Every way of asking for work (HTTP, NATS, local schedules, the CLI through HTTP) ends
in :meth:`Jobs.submit`, which records the job in the :class:`~agent.control.job_store.JobStore`
before it returns, so an acknowledged job is never lost. The runner then starts queued
jobs oldest first, as far as the limits allow:

- one job per domain at a time (a restore must not read images a backup's retention
  is merging);
- at most ``[jobs] max_concurrent_backups`` backups and ``max_concurrent_jobs`` jobs.

What a job *does* is not here: each kind has a runner in :mod:`handlers.job_kinds`.

Life cycle: :meth:`Jobs.start` (after the agent is connected and has undone what a
killed agent left behind) reports jobs the store says were running as failed with
``agent-restarted`` (their ends go into the store's outbox, to be published to the
scheduler whenever NATS is reachable) and runs the queued ones; :meth:`Jobs.stop` stops
taking jobs, lets running ones finish within a grace period, then cancels them (each
runner undoes its work on cancellation). Queued jobs stay queued for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from agent.control.job_requests import (
    Job,
    JobDisk,
    JobKind,
    JobListener,
    JobRequest,
    JobState,
    new_job_id,
)
from agent.control.job_store import JobStore
from agent.core.config import JobsSection
from agent.core.errors import (
    AgentError,
    BackupError,
    BackupNotFoundError,
    DestinationExistsError,
    DomainNotFoundError,
    FilesystemHungError,
    JobConflictError,
    JobError,
    JobNotFoundError,
    JobsClosedError,
    NotConnectedError,
    RepositoryMarkerError,
    RepositoryReadOnlyError,
    RepositorySpaceError,
)
from agent.core.logs import get_logger
from agent.core.retry import Backoff, retry_briefly
from agent.core.shielding import to_completion

log = get_logger("jobs")

AGENT_RESTARTED = "agent-restarted"
_END_WRITES = 4  # tries at recording a job's end: 0.5 s, 1 s, 2 s between them
_END_BACKOFF = Backoff(initial=0.5, maximum=2.0)


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What a successful job produced."""

    backup_id: str | None = None
    disks: tuple[JobDisk, ...] = ()
    result: Mapping[str, Any] = field(default_factory=dict)


class JobFailedError(JobError):
    """Raised by a runner whose job ended without an exception of its own (verify found
    problems; a backup published, but retention found damage): the job fails with
    ``code``, and ``result`` is kept, and ``outcome``'s backup and disks if given."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        result: Mapping[str, Any],
        outcome: JobOutcome | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.result = result
        self.outcome = outcome


Progress = Callable[[int, int], None]


class JobRunner(Protocol):
    """Does one kind of job; raises AgentError to fail it; undoes its work on cancellation."""

    def __call__(self, job: Job, progress: Progress, /) -> Awaitable[JobOutcome]: ...


Finished = Callable[[Job], Awaitable["JobOutcome | None"]]


async def _finished(finished: Finished | None, job: Job) -> JobOutcome | None:
    if finished is None:
        return None
    try:
        return await finished(job)
    except AgentError as exc:
        log.warning("cannot tell whether a killed job's work was done", job=job.id, error=str(exc))
        return None


def error_code(exc: BaseException) -> str:
    """The machine-readable code a failed job reports for ``exc``."""
    if isinstance(exc, BackupError | JobError):
        return exc.code
    codes: list[tuple[type[BaseException], str]] = [
        (RepositorySpaceError, "no-space"),
        (RepositoryMarkerError, "repository-unavailable"),
        (RepositoryReadOnlyError, "repository-read-only"),
        (FilesystemHungError, "filesystem-hung"),
        (BackupNotFoundError, "backup-not-found"),
        (DestinationExistsError, "exists"),
        (DomainNotFoundError, "domain-not-found"),
        (NotConnectedError, "libvirt-unavailable"),
    ]
    for kind, code in codes:
        if isinstance(exc, kind):
            return code
    return "failed" if isinstance(exc, AgentError) else "internal-error"


class Jobs:
    """This host's jobs (see the module docstring)."""

    def __init__(
        self,
        store: JobStore,
        runners: Mapping[JobKind, JobRunner],
        limits: JobsSection,
        *,
        domain_key: Callable[[str], str] = lambda domain: domain,
        can_start: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._runners = runners
        self._limits = limits
        self._domain_key = domain_key  # name or UUID -> one key per domain
        self._can_start = can_start
        self._clock = clock
        self._queued: dict[str, Job] = {}
        self._running: dict[str, Job] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started: set[str] = set()  # jobs whose task has begun to run its body
        self._cancel_requested: set[str] = set()
        self._listeners: list[JobListener] = []
        self._wake = asyncio.Event()
        self._accepting = False
        self._stopping = False
        self._scheduler: asyncio.Task[None] | None = None
        self._submit_lock = asyncio.Lock()

    # -- observing ---------------------------------------------------------------------

    def subscribe(self, listener: JobListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _notify(self, job: Job) -> None:
        for listener in list(self._listeners):
            try:
                listener(job)
            except Exception:
                log.exception("a job listener failed", job=job.id)

    async def unpublished_ends(self, limit: int) -> list[Job]:
        return await self.store.unpublished(limit)

    async def end_published(self, job_id: str) -> None:
        await self.store.mark_published(job_id)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def counts(self) -> dict[JobState, int]:
        return {JobState.QUEUED: len(self._queued), JobState.RUNNING: len(self._running)}

    def running(self) -> list[Job]:
        return list(self._running.values())

    async def get(self, job_id: str) -> Job:
        job = self._running.get(job_id) or self._queued.get(job_id)
        if job is None:
            job = await self.store.get(job_id)
        if job is None:
            raise JobNotFoundError(f"no job {job_id!r}")
        return job

    async def find(
        self,
        *,
        domain: str | Sequence[str] | None = None,
        state: JobState | None = None,
        limit: int = 1000,
        before: str | None = None,
    ) -> list[Job]:
        """Newest first (:meth:`JobStore.find`), with the progress of those running."""
        jobs = await self.store.find(domain=domain, state=state, limit=limit, before=before)
        live = {**self._queued, **self._running}  # progress lives in memory
        return [live.get(job.id, job) for job in jobs]

    # -- submitting and cancelling -----------------------------------------------------

    async def submit(self, request: JobRequest, *, source: str) -> tuple[Job, bool]:
        if not self._accepting:
            raise JobsClosedError("the agent is not taking jobs now (starting or stopping)")
        if request.kind not in {k.value for k in self._runners}:
            raise JobError(f"this agent cannot run {request.kind} jobs", code="unsupported")
        job_id = request.id or new_job_id()
        request = request.model_copy(update={"id": job_id})
        job = Job(
            id=job_id,
            request=request,
            state=JobState.QUEUED,
            source=source,
            created_at=self._clock(),
        )
        async with self._submit_lock:
            stored, created = await self.store.insert_or_get(job)
            known = job_id in self._queued or job_id in self._running
            if created or (stored.state is JobState.QUEUED and not known):
                # (A retry of a submit whose store write timed out but still committed
                # finds the job stored and queued, yet never queued here.)
                self._queued[job_id] = stored
                self._wake.set()
        if created:
            log.info(
                "job queued", job=job_id, kind=request.kind, domain=request.domain, source=source
            )
            self._notify(stored)
            self._wake.set()
        if not created:
            stored = await self.get(job_id)  # its live state, if queued or running
        return stored, created

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, a running one as soon as it has undone its work
        (the job returned is then still ``running``); a finished job is a conflict."""
        if job_id in self._queued:
            job = self._queued.pop(job_id)
            await self._finish(
                job, JobState.CANCELLED, code="cancelled", message="cancelled before it started"
            )
            self._wake.set()
            return await self.get(job_id)
        if job_id in self._running:  # running, or being recorded as running
            self._cancel_requested.add(job_id)
            task = self._tasks.get(job_id)
            # A task cancelled before its first step never runs its body (nor the except
            # clause that ends the job): one not started yet sees the request as it starts.
            if task is not None and job_id in self._started:
                task.cancel()
            return self._running[job_id]
        job = await self.get(job_id)
        raise JobConflictError(f"job {job_id} has already ended ({job.state.value})")

    # -- life cycle --------------------------------------------------------------------

    async def start(self, finished: Finished | None = None) -> list[Job]:
        """Take over from the store: running jobs failed (``agent-restarted``), queued ones
        queued again; then start taking jobs. Returns the jobs that were running.

        ``finished`` tells a running job whose work was done all the same (a backup
        published just before the agent died stands): that one succeeded.
        """
        now = self._clock()
        restarted = []
        for job in await self.store.unfinished():
            outcome = await _finished(finished, job) if job.state is JobState.RUNNING else None
            if outcome is not None:
                restarted.append(
                    job.with_state(
                        JobState.SUCCEEDED,
                        now,
                        backup_id=outcome.backup_id,
                        disks=outcome.disks,
                        result=outcome.result,
                        progress_done=job.progress_total,
                    )
                )
            elif job.state is JobState.RUNNING:
                restarted.append(
                    job.with_state(
                        JobState.FAILED,
                        now,
                        error_code=AGENT_RESTARTED,
                        error_message="the agent stopped while the job ran; its libvirt job and "
                        "partial files are cleaned up by the agent's start-up recovery",
                    )
                )
            else:
                self._queued[job.id] = job
        if restarted:
            await self.store.update_many(restarted)
            for job in restarted:
                log.warning(
                    "the agent restarted while a job ran", job=job.id, state=job.state.value
                )
                self._notify(job)
        keep = self._limits.keep_finished_days * 86400
        with contextlib.suppress(AgentError):
            await self.store.forget_finished(now - keep)
        self._accepting = True
        self._scheduler = asyncio.create_task(self._schedule(), name="job-scheduler")
        self._wake.set()
        return restarted

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking jobs; give running ones ``grace`` seconds; cancel what is left."""
        self._accepting = False
        self._stopping = True
        grace = self._limits.shutdown_grace if grace is None else grace
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
        tasks = list(self._tasks.values())
        if tasks:
            log.info("waiting for running jobs", jobs=list(self._tasks), grace=grace)
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "cancelling jobs still running after the grace period",
                    jobs=[t.get_name() for t in pending],
                )
                # Each job undoes its work (libvirt job, checkpoint, staged files) before
                # it ends; bounded, so a stuck undo cannot keep the agent from stopping.
                await asyncio.wait(pending, timeout=max(grace, 60.0))

    # -- scheduling --------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._start_eligible()
            except Exception as exc:  # the scheduler must outlive any one failure
                log.error("could not start queued jobs; retrying", error=str(exc))
                await asyncio.sleep(1)
                self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._next_check())

    def _next_check(self) -> float:
        """Seconds until the scheduler must look again without being woken."""
        wait = 5.0  # libvirt may have come back; the clock may have moved
        now = self._clock()
        for job in self._queued.values():
            if job.request.deadline is not None:
                wait = min(wait, max(0.0, job.request.deadline.timestamp() - now))
        return wait

    async def _start_eligible(self) -> None:
        now = self._clock()
        for job in list(self._queued.values()):
            if job.id not in self._queued:
                continue  # cancelled while this loop awaited the store
            deadline = job.request.deadline
            if deadline is not None and deadline.timestamp() <= now:
                del self._queued[job.id]
                await self._finish(
                    job,
                    JobState.CANCELLED,
                    code="deadline-passed",
                    message=f"still queued at its deadline {deadline.isoformat()}",
                )
                continue
            if self._may_start(job):
                del self._queued[job.id]
                await self._launch(job)

    def _may_start(self, job: Job) -> bool:
        if not self._can_start():
            return False
        if len(self._running) >= self._limits.max_concurrent_jobs:
            return False
        if job.kind is JobKind.BACKUP:
            backups = sum(1 for j in self._running.values() if j.kind is JobKind.BACKUP)
            if backups >= self._limits.max_concurrent_backups:
                return False
        key = self._domain_key(job.domain)
        return all(self._domain_key(j.domain) != key for j in self._running.values())

    async def _launch(self, queued: Job) -> None:
        job = queued.with_state(JobState.RUNNING, self._clock())
        # Counted and cancellable while the store records it (cancel() would find it
        # nowhere otherwise); a cancel requested meanwhile is seen when the job starts.
        self._running[job.id] = job
        try:
            await self.store.update(job)
        except BaseException:
            del self._running[job.id]
            self._queued[job.id] = queued  # try again later
            raise
        self._tasks[job.id] = asyncio.create_task(self._execute(job), name=f"job:{job.id}")
        log.info("job started", job=job.id, kind=job.request.kind, domain=job.domain)
        self._notify(job)

    async def _execute(self, job: Job) -> None:
        self._started.add(job.id)
        try:
            runner = self._runners[job.kind]
            if job.id in self._cancel_requested:
                raise asyncio.CancelledError  # requested before the task started (cancel())
            outcome = await runner(job, lambda done, total: self._progress(job.id, done, total))
        except asyncio.CancelledError:
            requested = job.id in self._cancel_requested
            code = "cancelled" if requested else "agent-stopping"
            message = (
                "cancelled while running; its work was undone"
                if requested
                else "the agent stopped before the job finished; its work was undone"
            )
            await to_completion(self._end(job.id, JobState.CANCELLED, code=code, message=message))
        except JobFailedError as exc:
            done = exc.outcome or JobOutcome()
            await to_completion(
                self._end(
                    job.id,
                    JobState.FAILED,
                    code=exc.code,
                    message=str(exc),
                    result=exc.result,
                    backup_id=done.backup_id,
                    disks=done.disks,
                )
            )
        except Exception as exc:
            if not isinstance(exc, AgentError):
                log.exception("job failed unexpectedly", job=job.id)
            await to_completion(
                self._end(job.id, JobState.FAILED, code=error_code(exc), message=str(exc))
            )
        else:
            await to_completion(
                self._end(
                    job.id,
                    JobState.SUCCEEDED,
                    backup_id=outcome.backup_id,
                    disks=outcome.disks,
                    result=outcome.result,
                )
            )

    def _progress(self, job_id: str, done: int, total: int) -> None:
        job = self._running.get(job_id)
        if job is not None:
            self._running[job_id] = replace(job, progress_done=done, progress_total=total)

    async def _end(self, job_id: str, state: JobState, **changes: Any) -> None:
        job = self._running.pop(job_id)
        self._tasks.pop(job_id, None)
        self._started.discard(job_id)
        self._cancel_requested.discard(job_id)
        code = changes.pop("code", None)
        message = changes.pop("message", None)
        try:
            await self._finish(job, state, code=code, message=message, **changes)
        finally:
            self._wake.set()

    async def _finish(
        self, job: Job, state: JobState, *, code: str | None, message: str | None, **changes: Any
    ) -> None:
        if state is JobState.SUCCEEDED and job.progress_total:
            changes.setdefault("progress_done", job.progress_total)
        done = job.with_state(
            state, self._clock(), error_code=code, error_message=message, **changes
        )
        try:
            # A passing fault (a busy or briefly full state filesystem) must not leave the
            # job "running" and its end unpublished until the next start: a few tries.
            await retry_briefly(
                lambda: self.store.update(done),
                attempts=_END_WRITES,
                backoff=_END_BACKOFF,
                retry_on=(AgentError,),
                on_retry=lambda delay, error: log.warning(
                    "recording the end of a job failed; trying again",
                    job=job.id,
                    retry_in=round(delay, 2),
                    error=str(error),
                ),
            )
        except Exception as exc:
            # The job stays "running" in the store: at the next start it is reported as
            # agent-restarted, which is the truth as far as anyone can tell. Its end is
            # published then (the outbox has no entry now): events follow the store.
            log.error("could not record the end of a job", job=job.id, error=str(exc))
        log.info("job ended", job=job.id, state=state.value, code=code, message=message)
        self._notify(done)
