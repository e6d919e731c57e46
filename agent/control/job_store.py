"""The job store: every job the agent was asked to run, durably, in SQLite.

A job is recorded before anyone is told it exists (HTTP 201, a NATS acknowledgement),
so a job the agent accepted survives its death: at the next start, jobs that were
running are reported failed (``agent-restarted``) and queued ones run. Ids are unique:
:meth:`JobStore.insert_or_get` returns the job already stored under an id, which is
what makes a request submitted twice (an HTTP retry, a NATS redelivery) one job.

Every job's end is also put in the store's *outbox*, in the transaction that records the
finished state (succeeded, failed, cancelled, an ``agent-restarted`` failure included):
the scheduler messages (:mod:`agent.control.messages`) publish what the outbox holds and
remove an entry only once JetStream has acknowledged its event, so the end of a job is
announced even when the agent died before it could publish it, or NATS was away. The
outbox is bounded with the jobs: an entry goes when :meth:`JobStore.forget_finished`
drops its job.

The store also remembers, per local schedule, the last slot it handled.

One file (``<state_dir>/jobs.sqlite``, WAL, ``synchronous=FULL``), one connection owned
by one worker thread; every call is awaited with a timeout, so the event loop never
waits for the disk.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from agent.control.job_requests import Job, JobDisk, JobRequest, JobState
from agent.core.errors import JobConflictError, JobStoreError
from agent.core.sqlite import (
    Cause,
    Failure,
    Schema,
    StoreThread,
    read_transaction,
    write_transaction,
)

T = TypeVar("T")

# MIGRATIONS[i] takes a file from schema version i to i + 1, inside one transaction.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            request TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            domain TEXT NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            source TEXT NOT NULL,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            progress_done INTEGER NOT NULL DEFAULT 0,
            progress_total INTEGER NOT NULL DEFAULT 0,
            backup_id TEXT,
            disks TEXT NOT NULL DEFAULT '[]',
            error_code TEXT,
            error_message TEXT,
            result TEXT NOT NULL DEFAULT '{}'
        ) STRICT
        """,
        "CREATE INDEX jobs_by_state ON jobs (state)",
        "CREATE INDEX jobs_by_domain ON jobs (domain)",
        "CREATE TABLE schedule_slots (name TEXT PRIMARY KEY, last_slot REAL NOT NULL) STRICT",
        "CREATE TABLE health (id INTEGER PRIMARY KEY CHECK (id = 1), probed_at REAL) STRICT",
    ),
    (
        # Jobs whose end is not published yet; oldest first by seq. Jobs that ended
        # before this version are not added: their events went out (or not) back then.
        """
        CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL UNIQUE,
            queued_at REAL NOT NULL
        ) STRICT
        """,
    ),
    (
        # Listings filter by domain or state and page newest first: one index each.
        "DROP INDEX IF EXISTS jobs_by_state",
        "DROP INDEX IF EXISTS jobs_by_domain",
        "CREATE INDEX IF NOT EXISTS jobs_by_state_seq ON jobs (state, seq)",
        "CREATE INDEX IF NOT EXISTS jobs_by_domain_seq ON jobs (domain, seq)",
    ),
)
SCHEMA: Final = Schema(
    MIGRATIONS,
    lambda message, path: JobStoreError(message, path=str(path)),
    newer="job store {path}: schema version {found} is newer than this agent's ({version}); "
    "refusing to touch it",
    foreign="{path} is an SQLite database but not a job store",
)
SCHEMA_VERSION: Final = SCHEMA.version

_COLUMNS: Final = (
    "id, request, state, source, created_at, started_at, finished_at, progress_done,"
    " progress_total, backup_id, disks, error_code, error_message, result"
)


def _open_sync(path: Path, busy_timeout: float) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        version: int = db.execute("PRAGMA user_version").fetchone()[0]
        SCHEMA.refuse_newer(version, path)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        if version < SCHEMA_VERSION:
            write_transaction(db, lambda: SCHEMA.migrate(db, path))
    except BaseException:
        db.close()
        raise
    return db


def _row(job: Job) -> tuple[Any, ...]:
    return (
        job.id,
        job.request.model_dump_json(),
        job.state.value,
        job.source,
        job.created_at,
        job.started_at,
        job.finished_at,
        job.progress_done,
        job.progress_total,
        job.backup_id,
        json.dumps([[d.target, d.mode, d.reason, d.bytes_copied] for d in job.disks]),
        job.error_code,
        job.error_message,
        json.dumps(dict(job.result)),
    )


def _job(row: Sequence[Any]) -> Job:
    return Job(
        id=row[0],
        request=JobRequest.model_validate_json(row[1], strict=False),
        state=JobState(row[2]),
        source=row[3],
        created_at=row[4],
        started_at=row[5],
        finished_at=row[6],
        progress_done=row[7],
        progress_total=row[8],
        backup_id=row[9],
        disks=tuple(JobDisk(*d) for d in json.loads(row[10])),
        error_code=row[11],
        error_message=row[12],
        result=json.loads(row[13]),
    )


def _select(db: sqlite3.Connection, where: str = "", params: Sequence[Any] = ()) -> list[Job]:
    sql = f"SELECT {_COLUMNS} FROM jobs {where}"
    return [_job(row) for row in db.execute(sql, params)]


def _to_outbox(db: sqlite3.Connection, job: Job) -> None:
    """Queue ``job``'s end for publishing (in the caller's transaction), once per job."""
    sql = "INSERT OR IGNORE INTO outbox (job_id, queued_at) VALUES (?, ?)"
    db.execute(sql, (job.id, job.finished_at if job.finished_at is not None else time.time()))


def _unpublished(db: sqlite3.Connection, limit: int) -> list[Job]:
    columns = ", ".join(f"jobs.{c.strip()}" for c in _COLUMNS.split(","))
    sql = (
        f"SELECT {columns} FROM outbox JOIN jobs ON jobs.id = outbox.job_id "
        f"ORDER BY outbox.seq LIMIT {int(limit)}"
    )
    return [_job(row) for row in db.execute(sql)]


def _insert_or_get(db: sqlite3.Connection, job: Job) -> tuple[Job, bool]:
    found = _select(db, "WHERE id = ?", (job.id,))
    if found:
        existing = found[0]
        if existing.request.fingerprint() != job.request.fingerprint():
            raise JobConflictError(
                f"job id {job.id!r} is taken by a different request "
                f"({existing.request.kind} of {existing.domain})"
            )
        return existing, False
    placeholders = ", ".join("?" * 14)
    db.execute(
        f"INSERT INTO jobs ({_COLUMNS}, fingerprint, domain) VALUES ({placeholders}, ?, ?)",
        (*_row(job), job.request.fingerprint(), job.domain),
    )
    if job.state.finished:
        _to_outbox(db, job)
    return job, True


def _update(db: sqlite3.Connection, job: Job) -> None:
    found = db.execute("SELECT state FROM jobs WHERE id = ?", (job.id,)).fetchone()
    if found is None:
        raise JobStoreError(f"job {job.id} is not in the store")
    columns = _COLUMNS.replace(" ", "").split(",")[1:]
    sets = ", ".join(f"{c} = ?" for c in columns)
    db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*_row(job)[1:], job.id))
    # Only the step into a finished state is an end to announce (a finished job is
    # never rewritten by the runner, but a second write must not announce it twice).
    if job.state.finished and not JobState(found[0]).finished:
        _to_outbox(db, job)


class JobStore:
    """The open job store (see the module docstring). Use :meth:`open`, then :meth:`close`."""

    def __init__(self, path: Path, thread: StoreThread) -> None:
        self.path = path
        self._thread = thread

    @classmethod
    async def open(cls, path: Path, *, timeout: float = 30.0) -> JobStore:
        thread, _ = await StoreThread.open(
            "jobstore",
            timeout,
            lambda: (_open_sync(path, timeout / 2), None),
            _failure(path, timeout),
        )
        return cls(path, thread)

    async def close(self) -> None:
        await self._thread.close()

    async def _call(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread.closed:
            raise JobStoreError(f"{what}: job store {self.path} is closed", path=str(self.path))
        return await self._thread.call(what, fn)

    # --- jobs ---

    async def insert_or_get(self, job: Job) -> tuple[Job, bool]:
        """Store a new job; or return the one stored under its id (``created`` False).

        The same id with a different request raises JobConflictError.
        """
        return await self._call(
            "record job", lambda db: write_transaction(db, lambda: _insert_or_get(db, job))
        )

    async def update(self, job: Job) -> None:
        await self._call("update job", lambda db: write_transaction(db, lambda: _update(db, job)))

    async def update_many(self, jobs: Sequence[Job]) -> None:
        def body(db: sqlite3.Connection) -> None:
            for job in jobs:
                _update(db, job)

        await self._call("update jobs", lambda db: write_transaction(db, lambda: body(db)))

    async def get(self, job_id: str) -> Job | None:
        found = await self._call("read job", lambda db: _select(db, "WHERE id = ?", (job_id,)))
        return found[0] if found else None

    async def find(
        self,
        *,
        domain: str | Sequence[str] | None = None,
        state: JobState | None = None,
        limit: int = 1000,
        before: str | None = None,
    ) -> list[Job]:
        """Newest first, at most ``limit``: of ``domain`` (a name, or the names and UUIDs a
        domain's jobs may give), in ``state``, older than the job ``before`` (a page's
        last); filtered here, in SQL, with an index each, not after the limit."""
        clauses: list[str] = []
        params: list[Any] = []
        if domain is not None:
            names = [domain] if isinstance(domain, str) else list(domain)
            clauses.append(f"domain IN ({', '.join('?' * len(names))})")
            params += names
        if state is not None:
            clauses.append("state = ?")
            params.append(state.value)
        if before is not None:
            # An id no job has (any more): an error, not an empty last page.
            clauses.append("seq < coalesce((SELECT seq FROM jobs WHERE id = ?), -1)")
            params.append(before)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        sql = f"{where} ORDER BY seq DESC LIMIT {int(limit)}"
        return await self._call(
            "list jobs", lambda db: read_transaction(db, lambda: _select(db, sql, params))
        )

    async def unfinished(self) -> list[Job]:
        """Queued and running jobs, oldest first."""
        return await self._call(
            "read unfinished jobs",
            lambda db: _select(db, "WHERE state IN ('queued', 'running') ORDER BY seq"),
        )

    async def forget_finished(self, before: float) -> int:
        """Drop finished jobs that ended before ``before``, and their outbox entries
        (published or not: the outbox is bounded like the jobs); how many jobs."""

        def body(db: sqlite3.Connection) -> int:
            sql = "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') "
            dropped = db.execute(sql + "AND finished_at < ?", (before,)).rowcount
            db.execute("DELETE FROM outbox WHERE job_id NOT IN (SELECT id FROM jobs)")
            return dropped

        return await self._call(
            "forget old jobs", lambda db: write_transaction(db, lambda: body(db))
        )

    # --- the outbox of job ends ---

    async def unpublished(self, limit: int = 100) -> list[Job]:
        """Finished jobs whose end is not published yet, in the order they ended."""
        return await self._call(
            "read unpublished job ends",
            lambda db: read_transaction(db, lambda: _unpublished(db, limit)),
        )

    async def mark_published(self, job_id: str) -> None:
        """``job_id``'s end was published (JetStream acknowledged it): out of the outbox."""
        sql = "DELETE FROM outbox WHERE job_id = ?"
        await self._call(
            "mark a job end published",
            lambda db: write_transaction(db, lambda: db.execute(sql, (job_id,))),
        )

    # --- schedules (agent.control.schedules.ScheduleStore) ---

    async def last_slot(self, name: str) -> float | None:
        def body(db: sqlite3.Connection) -> float | None:
            row = db.execute("SELECT last_slot FROM schedule_slots WHERE name = ?", (name,))
            found = row.fetchone()
            return None if found is None else float(found[0])

        return await self._call("read schedule", body)

    async def set_last_slot(self, name: str, slot: float) -> None:
        sql = "INSERT OR REPLACE INTO schedule_slots (name, last_slot) VALUES (?, ?)"
        await self._call(
            "write schedule",
            lambda db: write_transaction(db, lambda: db.execute(sql, (name, slot))),
        )

    # --- health ---

    async def probe(self) -> None:
        """A real write (for /readyz): raises JobStoreError if the store cannot be written."""
        sql = "INSERT OR REPLACE INTO health (id, probed_at) VALUES (1, ?)"
        now = time.time()
        await self._call("probe", lambda db: write_transaction(db, lambda: db.execute(sql, (now,))))


def _failure(path: Path, seconds: float) -> Failure:
    def failed(what: str, cause: Cause) -> JobStoreError:
        if cause is None:
            return JobStoreError(
                f"{what}: job store {path} did not answer within {seconds:g}s", path=str(path)
            )
        return JobStoreError(f"{what}: job store {path}: {cause}", path=str(path))

    return failed
