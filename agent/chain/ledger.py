"""The checkpoint ledger: the agent's durable record of every checkpoint it created.

libvirt forgets checkpoint metadata when a transient domain stops, after a migration and
when a domain is undefined; the agent then redefines the checkpoints, parents first, from
the XML saved here. The ledger also records, per disk, whether the disk's checkpoint chain
is still usable for incremental backups, and why not when it is broken.

Records are keyed by domain *name*: a transient domain re-created from scratch keeps its
name but may get a new UUID (:meth:`Ledger.set_domain_uuid`).

Storage is one SQLite file in WAL mode with fsync'd commits (``synchronous=FULL``), so the
command line can read and write it while the agent runs, and a crash at any point leaves
the last committed state. Every write is one ``BEGIN IMMEDIATE`` transaction; changes that
belong together go through :meth:`Ledger.transaction` as a list of operations. The schema
version is ``PRAGMA user_version``: :data:`MIGRATIONS` upgrades older files, a newer file
is refused.

Every SQLite call runs in one dedicated worker thread that owns the connection and is
awaited with a timeout, so the event loop never waits for the disk or for another
process's lock. :meth:`Ledger.export_domain` and :meth:`Ledger.import_domain` move one
domain's records between hosts as JSON-able data.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import sqlite3
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

from agent.core.errors import LedgerCorruptError, LedgerError, LedgerImportError
from agent.core.logs import get_logger
from agent.core.sqlite import Cause, Failure, StoreThread
from agent.core.sqlite import read_transaction as _read_transaction
from agent.core.sqlite import write_transaction as _write_transaction

log = get_logger("ledger")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

EXPORT_FORMAT: Final = "libvirt-backup-agent/ledger-export"
EXPORT_VERSION: Final = 1


class CheckpointState(enum.StrEnum):
    PENDING = "pending"  # created in libvirt; the backup based on it has not succeeded yet
    ACTIVE = "active"  # in libvirt's view (or to be redefined there) and usable
    PRUNING = "pruning"  # chosen for pruning; deletion from libvirt may be half done
    PRUNED = "pruned"  # deleted from libvirt by policy; XML kept as history
    DISCARDED = "discarded"  # deleted because its backup failed or it was unusable


@dataclass(frozen=True, slots=True)
class CheckpointDisk:
    target: str  # "vda"
    bitmap: str  # bitmap name in the qcow2 (usually the checkpoint's name)
    identity: str  # agent.virt.inventory.DiskIdentity.key(), opaque here
    capacity: int | None  # bytes at checkpoint time


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    domain: str  # domain name: the key
    domain_uuid: str
    name: str  # unique per domain
    parent: str | None  # the parent libvirt has now (changes when an older one is pruned)
    born_parent: str | None  # the parent at creation; never changes
    created_at: int  # libvirt's creationTime (seconds)
    xml: str  # the full checkpoint XML (with <domain>) as libvirt returned it at creation
    disks: tuple[CheckpointDisk, ...]
    state: CheckpointState
    backed_up_at: float | None = None  # when the backup based on it succeeded
    seq: int = 0  # insertion order, assigned by the ledger (ignored on input)


@dataclass(frozen=True, slots=True)
class DiskChain:
    domain: str
    target: str
    valid: bool
    reason: str | None  # machine-readable when broken: "bitmap-missing", "disk-replaced", ...
    detail: str  # a sentence for humans
    updated_at: float


# --- schema -------------------------------------------------------------------------------

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
SCHEMA_VERSION: Final = len(MIGRATIONS)

_CHECKPOINT_COLUMNS = (
    "seq, domain, name, domain_uuid, parent, born_parent, created_at, xml, state, backed_up_at"
)


# --- validation shared by writes and imports -----------------------------------------------

Problem = tuple[str, str]  # (field, what is wrong with it)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {_show(value)}"
    if not value:
        return "must not be empty"
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        return f"{_show(value)} contains a control character"
    return None


def _blob_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {_show(value)}"
    if not value.strip():
        return "must not be empty"
    return "contains a NUL character" if "\0" in value else None


def _name_problem(value: object) -> str | None:
    if isinstance(value, str) and "/" in value:
        # libvirt refuses '/' in domain and checkpoint names; such a record cannot be real.
        return f"{_show(value)} contains '/'"
    return _text_problem(value)


def _optional_name_problem(value: object) -> str | None:
    return None if value is None else _name_problem(value)


def _uuid_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {_show(value)}"
    try:
        uuid.UUID(value)
    except ValueError:
        return f"{_show(value)} is not a UUID"
    return None


def _count_problem(value: object, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    # bool is an int to Python, never to a user reading the export.
    if not isinstance(value, int) or isinstance(value, bool):
        return f"expected an integer{' or null' if optional else ''}, got {_show(value)}"
    return None if value >= 0 else f"must not be negative, got {value}"


def _time_problem(value: object, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        return f"expected a number{' or null' if optional else ''}, got {_show(value)}"
    if not math.isfinite(value) or value < 0:
        return f"must be a finite, non-negative number, got {value}"
    return None


def _state_problem(value: object) -> str | None:
    if isinstance(value, CheckpointState):
        return None
    known = ", ".join(s.value for s in CheckpointState)
    return f"unknown state {_show(value)} (known: {known})"


def _first(checks: Sequence[tuple[str, str | None]]) -> Problem | None:
    return next(((field, problem) for field, problem in checks if problem is not None), None)


def _disk_problem(disks: object) -> Problem | None:
    if not isinstance(disks, tuple):
        return ("disks", f"expected a tuple of CheckpointDisk, got {_show(disks)}")
    seen: set[str] = set()
    for i, disk in enumerate(disks):
        if not isinstance(disk, CheckpointDisk):
            return (f"disks[{i}]", f"expected a CheckpointDisk, got {_show(disk)}")
        problem = _first(
            [
                (f"disks[{i}].target", _name_problem(disk.target)),
                (f"disks[{i}].bitmap", _blob_problem(disk.bitmap)),
                (f"disks[{i}].identity", _blob_problem(disk.identity)),
                (f"disks[{i}].capacity", _count_problem(disk.capacity, optional=True)),
                (f"disks[{i}].target", "appears twice" if disk.target in seen else None),
            ]
        )
        if problem is not None:
            return problem
        seen.add(disk.target)
    return None


def _record_problem(record: CheckpointRecord) -> Problem | None:
    """The first thing wrong with ``record`` as (field, problem), ``None`` if it is sound."""
    return _first(
        [
            ("domain", _name_problem(record.domain)),
            ("domain_uuid", _uuid_problem(record.domain_uuid)),
            ("name", _name_problem(record.name)),
            ("parent", _optional_name_problem(record.parent)),
            ("parent", "is the checkpoint itself" if record.parent == record.name else None),
            ("born_parent", _optional_name_problem(record.born_parent)),
            ("created_at", _count_problem(record.created_at)),
            ("xml", _blob_problem(record.xml)),
            ("state", _state_problem(record.state)),
            ("backed_up_at", _time_problem(record.backed_up_at, optional=True)),
        ]
    ) or _disk_problem(record.disks)


def _chain_problem(valid: object, reason: object, detail: object) -> Problem | None:
    if not isinstance(valid, bool):
        return ("valid", f"expected true or false, got {_show(valid)}")
    if valid and reason is not None:
        return ("reason", f"a valid chain has no reason, got {_show(reason)}")
    if not valid and (problem := _text_problem(reason)) is not None:
        return ("reason", f"a broken chain needs a reason: {problem}")
    if not isinstance(detail, str):
        return ("detail", f"expected a string, got {_show(detail)}")
    return None


def _find_cycle(parents: Mapping[str, str | None]) -> str | None:
    """A checkpoint on a parent cycle, or ``None``; libvirt's checkpoints form a forest."""
    for start in parents:
        seen = {start}
        node = parents.get(start)
        while node is not None:
            if node in seen:
                return start
            seen.add(node)
            node = parents.get(node)
    return None


def _record_error(record: CheckpointRecord, problem: Problem) -> LedgerError:
    field, what = problem
    return LedgerError(f"checkpoint {record.domain!r}/{record.name!r}: {field}: {what}")


def _text_arg(value: object, what: str) -> None:
    if (problem := _name_problem(value)) is not None:
        raise LedgerError(f"{what}: {problem}")


# --- statements run in the worker thread ---------------------------------------------------


def _exists(db: sqlite3.Connection, domain: str, name: str) -> bool:
    sql = "SELECT 1 FROM checkpoints WHERE domain = ? AND name = ?"
    return db.execute(sql, (domain, name)).fetchone() is not None


def _update_one(db: sqlite3.Connection, sql: str, params: Sequence[object]) -> None:
    """Run an UPDATE whose last two parameters are (domain, name); it must hit a row."""
    if db.execute(sql, params).rowcount == 0:
        domain, name = params[-2], params[-1]
        raise LedgerError(f"no checkpoint {name!r} of domain {domain!r} in the ledger")


def _insert_checkpoint(db: sqlite3.Connection, record: CheckpointRecord) -> int:
    cursor = db.execute(
        "INSERT INTO checkpoints (domain, name, domain_uuid, parent, born_parent, created_at,"
        " xml, state, backed_up_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            record.domain,
            record.name,
            record.domain_uuid,
            record.parent,
            record.born_parent,
            record.created_at,
            record.xml,
            record.state.value,
            record.backed_up_at,
        ),
    )
    seq = cursor.lastrowid
    if seq is None:  # pragma: no cover - an INSERT always sets it
        raise LedgerError("INSERT gave no row id")
    db.executemany(
        "INSERT INTO checkpoint_disks (checkpoint, position, target, bitmap, identity, capacity)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [(seq, i, d.target, d.bitmap, d.identity, d.capacity) for i, d in enumerate(record.disks)],
    )
    return seq


def _upsert_chain(
    db: sqlite3.Connection, domain: str, target: str, chain: tuple[bool, str | None, str], at: float
) -> None:
    valid, reason, detail = chain
    db.execute(
        "INSERT INTO disk_chains (domain, target, valid, reason, detail, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (domain, target) DO UPDATE SET"
        " valid = excluded.valid, reason = excluded.reason, detail = excluded.detail,"
        " updated_at = excluded.updated_at",
        (domain, target, int(valid), reason, detail, at),
    )


def _select_checkpoints(
    db: sqlite3.Connection, where: str, params: Sequence[object]
) -> list[CheckpointRecord]:
    def body() -> list[CheckpointRecord]:
        rows = db.execute(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE {where} ORDER BY seq", params
        ).fetchall()
        disks: dict[int, list[CheckpointDisk]] = {}
        for seq, target, bitmap, identity, capacity in db.execute(
            "SELECT checkpoint, target, bitmap, identity, capacity FROM checkpoint_disks"
            f" WHERE checkpoint IN (SELECT seq FROM checkpoints WHERE {where})"
            " ORDER BY checkpoint, position",
            params,
        ):
            disks.setdefault(seq, []).append(CheckpointDisk(target, bitmap, identity, capacity))
        return [_row_to_record(row, tuple(disks.get(row[0], ()))) for row in rows]

    return _read_transaction(db, body)


def _row_to_record(row: Sequence[Any], disks: tuple[CheckpointDisk, ...]) -> CheckpointRecord:
    seq, domain, name, domain_uuid, parent, born_parent, created_at, xml, state, backed_up = row
    return CheckpointRecord(
        domain=domain,
        domain_uuid=domain_uuid,
        name=name,
        parent=parent,
        born_parent=born_parent,
        created_at=created_at,
        xml=xml,
        disks=disks,
        state=CheckpointState(state),  # the table's CHECK admits only known states
        backed_up_at=backed_up,
        seq=seq,
    )


def _select_chains(db: sqlite3.Connection, domain: str) -> dict[str, DiskChain]:
    rows = db.execute(
        "SELECT target, valid, reason, detail, updated_at FROM disk_chains"
        " WHERE domain = ? ORDER BY target",
        (domain,),
    )
    return {
        target: DiskChain(domain, target, bool(valid), reason, detail, updated_at)
        for target, valid, reason, detail, updated_at in rows
    }


def _domain_parents(db: sqlite3.Connection, domain: str) -> dict[str, str | None]:
    rows = db.execute("SELECT name, parent FROM checkpoints WHERE domain = ?", (domain,))
    return dict(rows.fetchall())


# --- operations: the writes, each applied inside a transaction ------------------------------


class _Op(Protocol[T_co]):
    def apply(self, db: sqlite3.Connection, now: float) -> T_co: ...


@dataclass(frozen=True, slots=True)
class AddCheckpoint:
    """Record a new checkpoint; its parent must already be in the ledger (or ``None``)."""

    record: CheckpointRecord

    def __post_init__(self) -> None:
        if (problem := _record_problem(self.record)) is not None:
            raise _record_error(self.record, problem)

    def apply(self, db: sqlite3.Connection, now: float) -> CheckpointRecord:
        r = self.record
        if _exists(db, r.domain, r.name):
            raise LedgerError(f"checkpoint {r.domain!r}/{r.name!r} is already in the ledger")
        if r.parent is not None and not _exists(db, r.domain, r.parent):
            raise LedgerError(
                f"checkpoint {r.domain!r}/{r.name!r}: parent {r.parent!r} is not in the ledger"
            )
        return dataclasses.replace(r, seq=_insert_checkpoint(db, r))


@dataclass(frozen=True, slots=True)
class SetState:
    """Move checkpoints to ``state``; every name must be in the ledger."""

    domain: str
    names: Collection[str]  # kept as a tuple
    state: CheckpointState

    def __post_init__(self) -> None:
        if isinstance(self.names, str):  # a str is a Collection[str] of its letters
            raise LedgerError(f"set state: names must be a collection, got {self.names!r}")
        object.__setattr__(self, "names", tuple(self.names))
        if (problem := _state_problem(self.state)) is not None:
            raise LedgerError(f"set state: {problem}")

    def apply(self, db: sqlite3.Connection, now: float) -> None:
        for name in self.names:
            _update_one(
                db,
                "UPDATE checkpoints SET state = ? WHERE domain = ? AND name = ?",
                (self.state.value, self.domain, name),
            )


@dataclass(frozen=True, slots=True)
class MarkBackedUp:
    """The backup based on the checkpoint succeeded at ``at``: it becomes ACTIVE."""

    domain: str
    name: str
    at: float

    def __post_init__(self) -> None:
        if (problem := _time_problem(self.at)) is not None:
            raise LedgerError(f"mark backed up: at: {problem}")

    def apply(self, db: sqlite3.Connection, now: float) -> None:
        _update_one(
            db,
            "UPDATE checkpoints SET state = ?, backed_up_at = ? WHERE domain = ? AND name = ?",
            (CheckpointState.ACTIVE.value, self.at, self.domain, self.name),
        )


@dataclass(frozen=True, slots=True)
class SetParents:
    """Set the current parent of each named checkpoint (after libvirt re-parented them)."""

    domain: str
    parents: Mapping[str, str | None]

    def __post_init__(self) -> None:
        object.__setattr__(self, "parents", dict(self.parents))  # the caller may mutate theirs
        for name, parent in self.parents.items():
            if (problem := _optional_name_problem(parent)) is not None:
                raise LedgerError(f"set parents: parent of {name!r}: {problem}")
            if parent == name:
                raise LedgerError(f"set parents: {name!r} cannot be its own parent")

    def apply(self, db: sqlite3.Connection, now: float) -> None:
        for name, parent in self.parents.items():
            if parent is not None and not _exists(db, self.domain, parent):
                raise LedgerError(
                    f"set parents: parent {parent!r} of {self.domain!r}/{name!r}"
                    " is not in the ledger"
                )
            _update_one(
                db,
                "UPDATE checkpoints SET parent = ? WHERE domain = ? AND name = ?",
                (parent, self.domain, name),
            )
        if (cyclic := _find_cycle(_domain_parents(db, self.domain))) is not None:
            raise LedgerError(f"set parents: {self.domain!r}/{cyclic!r} would be its own ancestor")


@dataclass(frozen=True, slots=True)
class SetDomainUuid:
    """The domain was re-created with a new UUID: every record of it gets that UUID."""

    domain: str
    uuid: str

    def __post_init__(self) -> None:
        if (problem := _uuid_problem(self.uuid)) is not None:
            raise LedgerError(f"set domain uuid: {problem}")

    def apply(self, db: sqlite3.Connection, now: float) -> None:
        sql = "UPDATE checkpoints SET domain_uuid = ? WHERE domain = ?"
        db.execute(sql, (self.uuid, self.domain))


@dataclass(frozen=True, slots=True)
class SetDiskChains:
    """Insert or replace the chain state of each target: (valid, reason, detail)."""

    domain: str
    chains: Mapping[str, tuple[bool, str | None, str]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "chains", dict(self.chains))
        for target, (valid, reason, detail) in self.chains.items():
            _text_arg(target, "set disk chains: target")
            if (problem := _chain_problem(valid, reason, detail)) is not None:
                raise LedgerError(f"set disk chains: {target}: {problem[0]}: {problem[1]}")

    def apply(self, db: sqlite3.Connection, now: float) -> None:
        for target, chain in self.chains.items():
            _upsert_chain(db, self.domain, target, chain, now)


@dataclass(frozen=True, slots=True)
class ForgetDiskChain:
    """Drop a target's chain state (the disk is gone); no error if there is none."""

    domain: str
    target: str

    def apply(self, db: sqlite3.Connection, now: float) -> None:
        sql = "DELETE FROM disk_chains WHERE domain = ? AND target = ?"
        db.execute(sql, (self.domain, self.target))


LedgerOp = (
    AddCheckpoint
    | SetState
    | MarkBackedUp
    | SetParents
    | SetDomainUuid
    | SetDiskChains
    | ForgetDiskChain
)


@dataclass(frozen=True, slots=True)
class _ImportDomain:
    domain: str
    records: tuple[CheckpointRecord, ...]
    chains: tuple[DiskChain, ...]
    replace: bool

    def apply(self, db: sqlite3.Connection, now: float) -> int:
        existing = _select_checkpoints(db, "domain = ?", (self.domain,))
        sql = "SELECT 1 FROM disk_chains WHERE domain = ? LIMIT 1"
        has_chains = db.execute(sql, (self.domain,)).fetchone() is not None
        if (existing or has_chains) and not self.replace:
            self._require_identical(existing)
            return 0
        if self.replace:
            db.execute("DELETE FROM checkpoints WHERE domain = ?", (self.domain,))
            db.execute("DELETE FROM disk_chains WHERE domain = ?", (self.domain,))
        for record in self.records:
            _insert_checkpoint(db, record)
        for c in self.chains:
            _upsert_chain(db, self.domain, c.target, (c.valid, c.reason, c.detail), c.updated_at)
        return len(self.records)

    def _require_identical(self, existing: list[CheckpointRecord]) -> None:
        # Importing the same export twice is harmless; anything else would silently mix two
        # histories, so it needs an explicit replace.
        held = {r.name: dataclasses.replace(r, seq=0) for r in existing}
        for i, record in enumerate(self.records):
            mine = held.get(record.name)
            if mine != dataclasses.replace(record, seq=0):
                what = "is not in the ledger" if mine is None else "differs from the ledger's"
                raise LedgerImportError(
                    f"checkpoints[{i}] ({record.name!r}) {what}, and the ledger already holds"
                    f" records of domain {self.domain!r}; import with replace to overwrite them"
                )


# --- opening ---------------------------------------------------------------------------------


def _open_sync(path: Path, busy_timeout: float) -> tuple[sqlite3.Connection, int]:
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
    _refuse_newer(found, path)
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
        _write_transaction(db, lambda: _migrate(db, path))
    return found


def _refuse_newer(version: int, path: Path) -> None:
    if version > SCHEMA_VERSION:
        raise LedgerCorruptError(
            f"ledger {path}: ledger schema version {version} is newer than this agent"
            f" ({SCHEMA_VERSION}); refusing to touch it",
            path=str(path),
        )


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    # Read again under the write lock: another process may have migrated meanwhile.
    current: int = db.execute("PRAGMA user_version").fetchone()[0]
    _refuse_newer(current, path)
    if current == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        raise LedgerCorruptError(
            f"{path} is an SQLite database but not a ledger (tables, no schema version)",
            path=str(path),
        )
    for version in range(current, SCHEMA_VERSION):
        for statement in MIGRATIONS[version]:
            db.execute(statement)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _map_error(exc: sqlite3.Error | OSError, what: str, path: str) -> LedgerError:
    if isinstance(exc, sqlite3.Error) and exc.sqlite_errorcode & 0xFF in (
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_NOTADB,
    ):
        return LedgerCorruptError(f"{what}: ledger {path} is corrupt: {exc}", path=path)
    return LedgerError(f"{what}: ledger {path}: {exc}", path=path)


# --- import parsing ----------------------------------------------------------------------------

_CHECKPOINT_FIELDS = frozenset(
    {"domain", "domain_uuid", "name", "parent", "born_parent", "created_at", "xml", "disks"}
    | {"state", "backed_up_at"}
)
_DISK_FIELDS = frozenset({"target", "bitmap", "identity", "capacity"})
_CHAIN_FIELDS = frozenset({"target", "valid", "reason", "detail", "updated_at"})
_EXPORT_FIELDS = frozenset(
    {"format", "version", "domain", "exported_at", "checkpoints", "disk_chains"}
)


def _bad(field: str, problem: str) -> LedgerImportError:
    return LedgerImportError(f"import: {field}: {problem}")


def _object(
    value: object, field: str, required: frozenset[str], optional: frozenset[str] = frozenset()
) -> Mapping[str, Any]:
    prefix = f"{field}." if field else ""
    if not isinstance(value, Mapping):
        raise _bad(field or "export", f"expected an object, got {_show(value)}")
    for key in value:
        if key not in required | optional:
            raise _bad(f"{prefix}{key}", "unknown field")
    for key in sorted(required):
        if key not in value:
            raise _bad(f"{prefix}{key}", "missing")
    return value


def _array(value: object, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(field, f"expected an array, got {_show(value)}")
    return value


def _parse_checkpoint(value: object, field: str, domain: str) -> CheckpointRecord:
    obj = _object(value, field, _CHECKPOINT_FIELDS, frozenset({"seq"}))
    if obj["domain"] != domain:
        raise _bad(f"{field}.domain", f"{_show(obj['domain'])} is not the export's {domain!r}")
    try:
        state = CheckpointState(obj["state"])
    except ValueError:
        raise _bad(f"{field}.state", _state_problem(obj["state"]) or "") from None
    disks = tuple(
        CheckpointDisk(**_object(d, f"{field}.disks[{i}]", _DISK_FIELDS))
        for i, d in enumerate(_array(obj["disks"], f"{field}.disks"))
    )
    backed_up = obj["backed_up_at"]
    record = CheckpointRecord(
        domain=domain,
        domain_uuid=obj["domain_uuid"],
        name=obj["name"],
        parent=obj["parent"],
        born_parent=obj["born_parent"],
        created_at=obj["created_at"],
        xml=obj["xml"],
        disks=disks,
        state=state,
        # JSON writes 1700000000.0 as 1700000000; keep the record comparable with the ledger's.
        backed_up_at=float(backed_up) if _time_problem(backed_up) is None else backed_up,
    )
    if (problem := _record_problem(record)) is not None:
        raise _bad(f"{field}.{problem[0]}", problem[1])
    return record


def _parse_chain(value: object, field: str, domain: str) -> DiskChain:
    obj = _object(value, field, _CHAIN_FIELDS)
    problem = _first([("target", _name_problem(obj["target"]))]) or _chain_problem(
        obj["valid"], obj["reason"], obj["detail"]
    )
    if problem is None and (what := _time_problem(obj["updated_at"])) is not None:
        problem = ("updated_at", what)
    if problem is not None:
        raise _bad(f"{field}.{problem[0]}", problem[1])
    return DiskChain(
        domain, obj["target"], obj["valid"], obj["reason"], obj["detail"], float(obj["updated_at"])
    )


def _check_references(records: Sequence[CheckpointRecord]) -> None:
    names: set[str] = set()
    for i, record in enumerate(records):
        if record.name in names:
            raise _bad(f"checkpoints[{i}].name", f"{record.name!r} appears twice")
        names.add(record.name)
    for i, record in enumerate(records):
        if record.parent is not None and record.parent not in names:
            raise _bad(f"checkpoints[{i}].parent", f"{record.parent!r} is not in the export")
    if (name := _find_cycle({r.name: r.parent for r in records})) is not None:
        raise _bad("checkpoints", f"{name!r} is its own ancestor")


def _parse_export(data: Mapping[str, Any]) -> _ImportDomain:
    """Validate an export completely (no I/O); raise LedgerImportError naming the field."""
    # The format tag first: a file that is not an export at all should be told so.
    if isinstance(data, Mapping) and data.get("format") != EXPORT_FORMAT:
        raise _bad("format", f"expected {EXPORT_FORMAT!r}, got {_show(data.get('format'))}")
    obj = _object(data, "", _EXPORT_FIELDS)
    if obj["format"] != EXPORT_FORMAT:
        raise _bad("format", f"expected {EXPORT_FORMAT!r}, got {_show(obj['format'])}")
    if type(obj["version"]) is not int or obj["version"] != EXPORT_VERSION:
        raise _bad("version", f"this agent reads version {EXPORT_VERSION}, got {obj['version']!r}")
    domain = obj["domain"]
    if (problem := _name_problem(domain)) is not None:
        raise _bad("domain", problem)
    if (problem := _time_problem(obj["exported_at"])) is not None:
        raise _bad("exported_at", problem)
    records = tuple(
        _parse_checkpoint(c, f"checkpoints[{i}]", domain)
        for i, c in enumerate(_array(obj["checkpoints"], "checkpoints"))
    )
    _check_references(records)
    chains = tuple(
        _parse_chain(c, f"disk_chains[{i}]", domain)
        for i, c in enumerate(_array(obj["disk_chains"], "disk_chains"))
    )
    targets = [c.target for c in chains]
    for i, target in enumerate(targets):
        if target in targets[:i]:
            raise _bad(f"disk_chains[{i}].target", f"{target!r} appears twice")
    return _ImportDomain(domain, records, chains, replace=False)


def _export_checkpoint(record: CheckpointRecord) -> dict[str, Any]:
    fields = dataclasses.asdict(record)  # disks become a list of dicts, in order
    fields["state"] = record.state.value
    fields["disks"] = [dataclasses.asdict(d) for d in record.disks]
    return fields


def _export_chain(chain: DiskChain) -> dict[str, Any]:
    fields = dataclasses.asdict(chain)
    del fields["domain"]
    return fields


# --- the ledger --------------------------------------------------------------------------------


class Ledger:
    """The open ledger file (see the module docstring). Use :meth:`open`, then :meth:`close`."""

    def __init__(
        self,
        path: Path,
        thread: StoreThread,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.path = path
        self._thread = thread
        self._clock = clock

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        # The bound of every later call on this ledger, not a deadline of this one.
        timeout: float = 30.0,
        busy_timeout: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Ledger:
        """Open (creating directories and file) and migrate the ledger at ``path``.

        ``timeout`` bounds every call; ``busy_timeout`` (default half of it) is how long
        SQLite waits for another process's lock, shorter so that a lock shows as "database
        is locked" rather than as a timeout.
        """
        busy = timeout / 2 if busy_timeout is None else busy_timeout
        thread, found = await StoreThread.open(
            "ledger", timeout, lambda: _open_sync(path, busy), _failure(str(path), timeout)
        )
        if found < SCHEMA_VERSION:
            log.info("ledger migrated", path=str(path), old=found, new=SCHEMA_VERSION)
        return cls(path, thread, clock=clock)

    async def close(self) -> None:
        """Close the file; queued calls finish first. Idempotent."""
        await self._thread.close()

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread.closed:
            raise LedgerError(f"{what}: ledger {self.path} is closed", path=str(self.path))
        try:
            return await self._thread.call(what, fn)
        except LedgerError as exc:  # raised by fn itself: name the file
            if exc.path is None:
                exc.path = str(self.path)
            raise

    async def _write(self, what: str, ops: Sequence[_Op[T]]) -> list[T]:
        now = self._clock()
        return await self._call(
            what, lambda db: _write_transaction(db, lambda: [op.apply(db, now) for op in ops])
        )

    # --- checkpoints ---

    async def add_checkpoint(self, record: CheckpointRecord) -> CheckpointRecord:
        """Record a new checkpoint; return it with its ``seq``. Duplicates are refused."""
        [stored] = await self._write("add checkpoint", [AddCheckpoint(record)])
        return stored

    async def checkpoints(
        self, domain: str, *, states: Collection[CheckpointState] | None = None
    ) -> list[CheckpointRecord]:
        """The domain's checkpoints in insertion order, optionally only those in ``states``."""
        if states is None:
            where, params = "domain = ?", [domain]
        else:
            values = sorted({CheckpointState(s).value for s in states})
            where = f"domain = ? AND state IN ({', '.join('?' * len(values))})"
            params = [domain, *values]
        return await self._call("checkpoints", lambda db: _select_checkpoints(db, where, params))

    async def checkpoint(self, domain: str, name: str) -> CheckpointRecord | None:
        found = await self._call(
            "checkpoint",
            lambda db: _select_checkpoints(db, "domain = ? AND name = ?", (domain, name)),
        )
        return found[0] if found else None

    async def set_state(self, domain: str, names: Collection[str], state: CheckpointState) -> None:
        """Move all ``names`` to ``state`` at once; an unknown name changes nothing."""
        await self._write("set state", [SetState(domain, names, state)])

    async def mark_backed_up(self, domain: str, name: str, at: float) -> None:
        """The backup based on ``name`` succeeded at ``at``; the checkpoint becomes ACTIVE."""
        await self._write("mark backed up", [MarkBackedUp(domain, name, at)])

    async def set_parents(self, domain: str, parents: Mapping[str, str | None]) -> None:
        """Set the current parent of each checkpoint in ``parents``, all or none."""
        await self._write("set parents", [SetParents(domain, parents)])

    async def set_domain_uuid(self, domain: str, uuid: str) -> None:
        """Give every record of ``domain`` the UUID of its re-created incarnation."""
        await self._write("set domain uuid", [SetDomainUuid(domain, uuid)])

    async def domains(self) -> list[str]:
        """Every domain with a checkpoint or a disk chain in the ledger, sorted."""
        sql = "SELECT domain FROM checkpoints UNION SELECT domain FROM disk_chains ORDER BY 1"
        rows = await self._call("domains", lambda db: db.execute(sql).fetchall())
        return [domain for (domain,) in rows]

    # --- disk chains ---

    async def disk_chains(self, domain: str) -> dict[str, DiskChain]:
        return await self._call("disk chains", lambda db: _select_chains(db, domain))

    async def set_disk_chains(
        self, domain: str, chains: Mapping[str, tuple[bool, str | None, str]]
    ) -> None:
        """Insert or update each target's (valid, reason, detail), all in one transaction."""
        await self._write("set disk chains", [SetDiskChains(domain, chains)])

    async def break_disk_chains(self, domain: str, reason: str, details: Mapping[str, str]) -> bool:
        """Mark each target's chain broken (``details``: target → what was found), if the
        ledger knows ``domain`` (a repository may be verified on another host); whether
        it did."""
        if not details or domain not in await self.domains():
            return False
        await self.set_disk_chains(domain, {t: (False, reason, d) for t, d in details.items()})
        log.warning("disk chains broken", domain=domain, reason=reason, disks=sorted(details))
        return True

    async def forget_disk_chain(self, domain: str, target: str) -> None:
        await self._write("forget disk chain", [ForgetDiskChain(domain, target)])

    async def transaction(self, ops: Sequence[LedgerOp]) -> None:
        """Apply ``ops`` in order in one transaction: all of them, or none if one fails."""
        checked: Sequence[_Op[object]] = tuple(ops)
        await self._write("transaction", checked)

    # --- portability ---

    async def export_domain(self, domain: str) -> dict[str, Any]:
        """Everything the ledger holds about ``domain``, as JSON-able data."""

        def read(db: sqlite3.Connection) -> tuple[list[CheckpointRecord], dict[str, DiskChain]]:
            return _read_transaction(
                db,
                lambda: (
                    _select_checkpoints(db, "domain = ?", (domain,)),
                    _select_chains(db, domain),
                ),
            )

        records, chains = await self._call("export", read)
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "domain": domain,
            "exported_at": self._clock(),
            "checkpoints": [_export_checkpoint(r) for r in records],
            "disk_chains": [_export_chain(c) for c in chains.values()],
        }

    async def import_domain(self, data: Mapping[str, Any], *, replace: bool = False) -> int:
        """Import an :meth:`export_domain` result; return how many checkpoints were added.

        The export is validated completely before anything is written. If the ledger
        already holds records of the domain, ``replace`` deletes them and imports, in one
        transaction; without it, the import is refused unless every imported checkpoint is
        identical to the one held (then nothing happens and 0 is returned).
        """
        op = dataclasses.replace(_parse_export(data), replace=replace)
        [count] = await self._write("import", [op])
        return count


def _failure(path: str, seconds: float) -> Failure:
    def failed(what: str, cause: Cause) -> LedgerError:
        if cause is not None:
            return _map_error(cause, what, path)
        return LedgerError(
            f"{what}: ledger {path} did not answer within {seconds:g}s"
            " (a write still queued or running may complete later)",
            path=path,
        )

    return failed
