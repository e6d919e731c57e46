"""The ledger's SQL statements: reading and writing records, run in its worker thread.

Each function takes the thread's connection; the caller (an operation of
:mod:`agent.chain.ledger_ops`, or :class:`agent.chain.ledger.Ledger`) holds the
transaction. Multi-statement reads run as one snapshot.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from agent.chain.records import CheckpointDisk, CheckpointRecord, CheckpointState, DiskChain
from agent.core.errors import LedgerError
from agent.core.sqlite import read_transaction

_CHECKPOINT_COLUMNS = (
    "seq, domain, name, domain_uuid, parent, born_parent, created_at, xml, state, backed_up_at"
)


def exists(db: sqlite3.Connection, domain: str, name: str) -> bool:
    sql = "SELECT 1 FROM checkpoints WHERE domain = ? AND name = ?"
    return db.execute(sql, (domain, name)).fetchone() is not None


def update_one(db: sqlite3.Connection, sql: str, params: Sequence[object]) -> None:
    """Run an UPDATE whose last two parameters are (domain, name); it must hit a row."""
    if db.execute(sql, params).rowcount == 0:
        domain, name = params[-2], params[-1]
        raise LedgerError(f"no checkpoint {name!r} of domain {domain!r} in the ledger")


def insert_checkpoint(db: sqlite3.Connection, record: CheckpointRecord) -> int:
    """Insert ``record`` and its disks; return its ``seq``."""
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


def upsert_chain(
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


def select_checkpoints(
    db: sqlite3.Connection, where: str, params: Sequence[object]
) -> list[CheckpointRecord]:
    """The checkpoints matching ``where`` (over the checkpoints table), in insertion order."""

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

    return read_transaction(db, body)


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


def select_chains(db: sqlite3.Connection, domain: str) -> dict[str, DiskChain]:
    rows = db.execute(
        "SELECT target, valid, reason, detail, updated_at FROM disk_chains"
        " WHERE domain = ? ORDER BY target",
        (domain,),
    )
    return {
        target: DiskChain(domain, target, bool(valid), reason, detail, updated_at)
        for target, valid, reason, detail, updated_at in rows
    }


def domain_parents(db: sqlite3.Connection, domain: str) -> dict[str, str | None]:
    rows = db.execute("SELECT name, parent FROM checkpoints WHERE domain = ?", (domain,))
    return dict(rows.fetchall())
