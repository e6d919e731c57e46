"""SQLite transactions shared by the agent's stores (the ledger and the job store).

Both stores keep one connection per file in one dedicated worker thread, opened with
``isolation_level=None`` so transactions are explicit: every write is one
``BEGIN IMMEDIATE`` ... ``COMMIT``, every multi-statement read one snapshot; and
every call into that thread is awaited with a timeout (:func:`run_bounded`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


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
