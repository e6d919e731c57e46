"""The ledger file: its schema, the migrations of older files, opening and checking it.

The schema version is ``PRAGMA user_version``: :data:`MIGRATIONS` upgrades older files, a
newer file is refused, and so is an SQLite file that is not a ledger or fails its integrity
check. The file is kept in WAL mode with ``synchronous=FULL``, so a committed checkpoint
survives a crash and power loss. Everything here runs in the ledger's worker thread.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Final

from agent.core.errors import LedgerCorruptError, LedgerError
from agent.core.sqlite import Schema, write_transaction

# MIGRATIONS[i] takes a file from schema version i to i + 1. Python's executescript()
# commits on its own, so each migration is a list of single statements run inside the
# migrating transaction. A migration that rebuilds a table must mind foreign_keys=ON.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE checkpoints (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            domain TEXT NOT NULL,
            name TEXT NOT NULL,
            domain_uuid TEXT NOT NULL,
            parent TEXT CHECK (parent IS NULL OR parent <> name),
            born_parent TEXT,
            created_at INTEGER NOT NULL,
            xml TEXT NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('pending', 'active', 'pruning', 'pruned', 'discarded')),
            backed_up_at REAL,
            UNIQUE (domain, name),
            FOREIGN KEY (domain, parent) REFERENCES checkpoints (domain, name)
                DEFERRABLE INITIALLY DEFERRED
        ) STRICT
        """,
        "CREATE INDEX checkpoints_by_parent ON checkpoints (domain, parent)",
        """
        CREATE TABLE checkpoint_disks (
            checkpoint INTEGER NOT NULL REFERENCES checkpoints (seq) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            target TEXT NOT NULL,
            bitmap TEXT NOT NULL,
            identity TEXT NOT NULL,
            capacity INTEGER CHECK (capacity IS NULL OR capacity >= 0),
            PRIMARY KEY (checkpoint, position),
            UNIQUE (checkpoint, target)
        ) STRICT
        """,
        """
        CREATE TABLE disk_chains (
            domain TEXT NOT NULL,
            target TEXT NOT NULL,
            valid INTEGER NOT NULL CHECK (valid IN (0, 1)),
            reason TEXT,
            detail TEXT NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (domain, target)
        ) STRICT
        """,
    ),
)
SCHEMA: Final = Schema(
    MIGRATIONS,
    lambda message, path: LedgerCorruptError(message, path=str(path)),
    newer="ledger {path}: ledger schema version {found} is newer than this agent "
    "({version}); refusing to touch it",
    foreign="{path} is an SQLite database but not a ledger (tables, no schema version)",
)
SCHEMA_VERSION: Final = SCHEMA.version


def open_sync(path: Path, busy_timeout: float) -> tuple[sqlite3.Connection, int]:
    """Open, check and migrate the file; return the connection and the version found."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        return db, _prepare(db, path)
    except BaseException:
        db.close()
        raise


def _prepare(db: sqlite3.Connection, path: Path) -> int:
    found: int = db.execute("PRAGMA user_version").fetchone()[0]
    SCHEMA.refuse_newer(found, path)
    problems = [row[0] for row in db.execute("PRAGMA quick_check")]
    if problems != ["ok"]:
        raise LedgerCorruptError(
            f"ledger {path} fails its integrity check: {'; '.join(problems[:3])}", path=str(path)
        )
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise LedgerError(
            f"ledger {path}: cannot use WAL journal mode (got {mode!r})", path=str(path)
        )
    # FULL syncs the WAL at every commit: a committed checkpoint survives power loss too.
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA foreign_keys = ON")  # per connection, and only outside a transaction
    if found < SCHEMA_VERSION:
        write_transaction(db, lambda: SCHEMA.migrate(db, path))
    return found


def map_error(exc: sqlite3.Error | OSError, what: str, path: str) -> LedgerError:
    """The ledger's error for a failed SQLite or OS call: corrupt files have their own."""
    if isinstance(exc, sqlite3.Error) and exc.sqlite_errorcode & 0xFF in (
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_NOTADB,
    ):
        return LedgerCorruptError(f"{what}: ledger {path} is corrupt: {exc}", path=path)
    return LedgerError(f"{what}: ledger {path}: {exc}", path=path)
