"""SQLite transactions shared by the agent's stores (the ledger and the job store).

Both stores keep one connection per file in one dedicated worker thread, opened with
``isolation_level=None`` so transactions are explicit: every write is one
``BEGIN IMMEDIATE`` ... ``COMMIT``, every multi-statement read one snapshot; and
every call into that thread is awaited with a timeout (:class:`StoreThread`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

Cause = sqlite3.Error | OSError | None
# The store's own error for a failed call: ``cause`` is the SQLite or OS error, or None
# when the thread did not answer in time (the call may still complete there).
Failure = Callable[[str, Cause], Exception]


def write_transaction(db: sqlite3.Connection, body: Callable[[], T]) -> T:
    # IMMEDIATE takes the write lock up front, so a concurrent writer (the CLI) makes us wait
    # at BEGIN (busy timeout) instead of failing half-way with SQLITE_BUSY.
    db.execute("BEGIN IMMEDIATE")
    try:
        result = body()
        db.execute("COMMIT")  # deferred foreign keys are checked here
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return result


@dataclass(frozen=True, slots=True)
class Schema:
    """A store's schema: ``migrations[v]`` takes a file from version ``v`` to ``v + 1``
    (``PRAGMA user_version``). ``refuse`` makes the store's own error from a message."""

    migrations: Sequence[Sequence[str]]
    refuse: Callable[[str, Path], Exception]
    newer: str  # "<what> {path}: <which> version {found} is newer than this agent..."
    foreign: str  # "{path} is an SQLite database but not <what>"

    @property
    def version(self) -> int:
        return len(self.migrations)

    def refuse_newer(self, found: int, path: Path) -> None:
        if found > self.version:
            message = self.newer.format(path=path, found=found, version=self.version)
            raise self.refuse(message, path)

    def migrate(self, db: sqlite3.Connection, path: Path) -> None:
        """Bring the file up to date; run inside a write transaction."""
        # Read again under the write lock: another process may have migrated meanwhile.
        current: int = db.execute("PRAGMA user_version").fetchone()[0]
        self.refuse_newer(current, path)
        if current == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise self.refuse(self.foreign.format(path=path), path)
        for version in range(current, self.version):
            for statement in self.migrations[version]:
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {self.version}")


def read_transaction(db: sqlite3.Connection, body: Callable[[], T]) -> T:
    # One snapshot for several SELECTs, so a concurrent writer cannot be seen half-way.
    if db.in_transaction:  # already inside one (a write, or an outer read)
        return body()
    db.execute("BEGIN")
    try:
        return body()
    finally:
        db.execute("COMMIT")


async def run_bounded(
    executor: ThreadPoolExecutor,
    fn: Callable[[], T],
    seconds: float,
    failed: Callable[[sqlite3.Error | OSError | None], Exception],
) -> T:
    """Run ``fn`` in the store's worker thread, waiting at most ``seconds``.

    ``failed(cause)`` builds the store's own error: ``cause`` is the SQLite or OS error,
    or None when the thread did not answer in time (the call may still complete there).
    """
    future = asyncio.get_running_loop().run_in_executor(executor, fn)
    try:
        return await asyncio.wait_for(future, seconds)
    except TimeoutError as exc:
        raise failed(None) from exc
    except (sqlite3.Error, OSError) as exc:
        raise failed(exc) from exc


class StoreThread:
    """A store's one SQLite connection, used only in its own worker thread.

    Every call into the thread (open, each operation, close) is awaited with the same
    bound, and fails with the store's own error (``failed(what, cause)``).
    """

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        db: sqlite3.Connection,
        timeout: float,
        failed: Failure,
    ) -> None:
        self._executor = executor
        self._db = db
        self._timeout = timeout
        self._failed = failed
        self.closed = False

    @classmethod
    async def open(
        cls,
        name: str,
        timeout: float,
        opener: Callable[[], tuple[sqlite3.Connection, R]],
        failed: Failure,
    ) -> tuple[StoreThread, R]:
        """Run ``opener`` (connect, check, migrate) in a new thread named ``name``;
        returns the thread and what ``opener`` returned besides the connection."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        try:
            db, found = await run_bounded(
                executor, opener, timeout, lambda cause: failed("open", cause)
            )
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        return cls(executor, db, timeout, failed), found

    async def call(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(connection)`` in the thread; the caller checks :attr:`closed` first."""
        db = self._db
        return await run_bounded(
            self._executor, lambda: fn(db), self._timeout, lambda cause: self._failed(what, cause)
        )

    async def close(self) -> None:
        """Close the connection once the calls queued before have run. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            await run_bounded(
                self._executor,
                self._db.close,
                self._timeout,
                lambda cause: self._failed("close", cause),
            )
        finally:
            self._executor.shutdown(wait=False)
