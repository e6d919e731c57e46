"""The ledger's writes as operations, each applied inside a transaction.

An operation is checked when it is made (a bad argument fails in the caller, before any
I/O) and applied in the ledger's worker thread; :meth:`agent.chain.ledger.Ledger.transaction`
applies a list of them in one transaction, all or none.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from agent.chain.ledger_sql import (
    domain_parents,
    exists,
    insert_checkpoint,
    update_one,
    upsert_chain,
)
from agent.chain.records import CheckpointRecord, CheckpointState
from agent.chain.validation import (
    Problem,
    chain_problem,
    find_cycle,
    name_problem,
    optional_name_problem,
    record_problem,
    state_problem,
    time_problem,
    uuid_problem,
)
from agent.core.errors import LedgerError

T_co = TypeVar("T_co", covariant=True)


class Op(Protocol[T_co]):
    """A write: ``apply`` runs in the worker thread, inside the transaction."""

    def apply(self, db: sqlite3.Connection, now: float) -> T_co: ...


@dataclass(frozen=True, slots=True)
class AddCheckpoint:
    """Record a new checkpoint; its parent must already be in the ledger (or ``None``)."""

    record: CheckpointRecord

    def __post_init__(self) -> None:
        if (problem := record_problem(self.record)) is not None:
            raise _record_error(self.record, problem)

    def apply(self, db: sqlite3.Connection, now: float) -> CheckpointRecord:
        r = self.record
        if exists(db, r.domain, r.name):
            raise LedgerError(f"checkpoint {r.domain!r}/{r.name!r} is already in the ledger")
        if r.parent is not None and not exists(db, r.domain, r.parent):
            raise LedgerError(
                f"checkpoint {r.domain!r}/{r.name!r}: parent {r.parent!r} is not in the ledger"
            )
        return dataclasses.replace(r, seq=insert_checkpoint(db, r))


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
        if (problem := state_problem(self.state)) is not None:
            raise LedgerError(f"set state: {problem}")

    def apply(self, db: sqlite3.Connection, now: float) -> None:
        for name in self.names:
            update_one(
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
        if (problem := time_problem(self.at)) is not None:
            raise LedgerError(f"mark backed up: at: {problem}")

    def apply(self, db: sqlite3.Connection, now: float) -> None:
        update_one(
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
            if (problem := optional_name_problem(parent)) is not None:
                raise LedgerError(f"set parents: parent of {name!r}: {problem}")
            if parent == name:
                raise LedgerError(f"set parents: {name!r} cannot be its own parent")

    def apply(self, db: sqlite3.Connection, now: float) -> None:
        for name, parent in self.parents.items():
            if parent is not None and not exists(db, self.domain, parent):
                raise LedgerError(
                    f"set parents: parent {parent!r} of {self.domain!r}/{name!r}"
                    " is not in the ledger"
                )
            update_one(
                db,
                "UPDATE checkpoints SET parent = ? WHERE domain = ? AND name = ?",
                (parent, self.domain, name),
            )
        if (cyclic := find_cycle(domain_parents(db, self.domain))) is not None:
            raise LedgerError(f"set parents: {self.domain!r}/{cyclic!r} would be its own ancestor")


@dataclass(frozen=True, slots=True)
class SetDomainUuid:
    """The domain was re-created with a new UUID: every record of it gets that UUID."""

    domain: str
    uuid: str

    def __post_init__(self) -> None:
        if (problem := uuid_problem(self.uuid)) is not None:
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
            if (what := name_problem(target)) is not None:
                raise LedgerError(f"set disk chains: target: {what}")
            if (problem := chain_problem(valid, reason, detail)) is not None:
                raise LedgerError(f"set disk chains: {target}: {problem[0]}: {problem[1]}")

    def apply(self, db: sqlite3.Connection, now: float) -> None:
        for target, chain in self.chains.items():
            upsert_chain(db, self.domain, target, chain, now)


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


def _record_error(record: CheckpointRecord, problem: Problem) -> LedgerError:
    field, what = problem
    return LedgerError(f"checkpoint {record.domain!r}/{record.name!r}: {field}: {what}")
