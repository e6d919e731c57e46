"""SQLite transactions shared by the agent's stores (the ledger and the job store).

Both stores keep one connection per file in one dedicated worker thread, opened with
``isolation_level=None`` so transactions are explicit: every write is one
``BEGIN IMMEDIATE`` ... ``COMMIT``, every multi-statement read one snapshot.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
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
