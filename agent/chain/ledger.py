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
belong together go through :meth:`Ledger.transaction` as a list of operations
(:mod:`agent.chain.ledger_ops`). The schema version is ``PRAGMA user_version``:
:data:`~agent.chain.ledger_schema.MIGRATIONS` upgrades older files, a newer file is refused.

Every SQLite call runs in one dedicated worker thread that owns the connection and is
awaited with a timeout, so the event loop never waits for the disk or for another
process's lock. :meth:`Ledger.export_domain` and :meth:`Ledger.import_domain` move one
domain's records between hosts as JSON-able data (:mod:`agent.chain.ledger_export`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from agent.chain.ledger_export import export_document, parse_export
from agent.chain.ledger_ops import (
    AddCheckpoint,
    ForgetDiskChain,
    LedgerOp,
    MarkBackedUp,
    Op,
    SetDiskChains,
    SetDomainUuid,
    SetParents,
    SetState,
)
from agent.chain.ledger_schema import SCHEMA_VERSION, map_error, open_sync
from agent.chain.ledger_sql import select_chains, select_checkpoints
from agent.chain.records import CheckpointRecord, CheckpointState, DiskChain
from agent.core.errors import LedgerError
from agent.core.logs import get_logger
from agent.core.sqlite import Cause, Failure, StoreThread, read_transaction, write_transaction

log = get_logger("ledger")

T = TypeVar("T")


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
            "ledger", timeout, lambda: open_sync(path, busy), _failure(str(path), timeout)
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

    async def _write(self, what: str, ops: Sequence[Op[T]]) -> list[T]:
        now = self._clock()
        return await self._call(
            what, lambda db: write_transaction(db, lambda: [op.apply(db, now) for op in ops])
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
        return await self._call("checkpoints", lambda db: select_checkpoints(db, where, params))

    async def checkpoint(self, domain: str, name: str) -> CheckpointRecord | None:
        found = await self._call(
            "checkpoint",
            lambda db: select_checkpoints(db, "domain = ? AND name = ?", (domain, name)),
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

    async def has_backups(self) -> bool:
        """Whether any checkpoint of any domain ever had a successful backup."""
        states = (CheckpointState.ACTIVE, CheckpointState.PRUNING, CheckpointState.PRUNED)
        sql = f"SELECT 1 FROM checkpoints WHERE state IN ({', '.join('?' * len(states))}) LIMIT 1"
        row = await self._call("any backup", lambda db: db.execute(sql, states).fetchone())
        return row is not None

    # --- disk chains ---

    async def disk_chains(self, domain: str) -> dict[str, DiskChain]:
        return await self._call("disk chains", lambda db: select_chains(db, domain))

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
        checked: Sequence[Op[object]] = tuple(ops)
        await self._write("transaction", checked)

    # --- portability ---

    async def export_domain(self, domain: str) -> dict[str, Any]:
        """Everything the ledger holds about ``domain``, as JSON-able data."""

        def read(db: sqlite3.Connection) -> tuple[list[CheckpointRecord], dict[str, DiskChain]]:
            return read_transaction(
                db,
                lambda: (
                    select_checkpoints(db, "domain = ?", (domain,)),
                    select_chains(db, domain),
                ),
            )

        records, chains = await self._call("export", read)
        return export_document(domain, self._clock(), records, list(chains.values()))

    async def import_domain(self, data: Mapping[str, Any], *, replace: bool = False) -> int:
        """Import an :meth:`export_domain` result; return how many checkpoints were added.

        The export is validated completely before anything is written. If the ledger
        already holds records of the domain, ``replace`` deletes them and imports, in one
        transaction; without it, the import is refused unless every imported checkpoint is
        identical to the one held (then nothing happens and 0 is returned).
        """
        op = parse_export(data, replace=replace)
        [count] = await self._write("import", [op])
        return count


def _failure(path: str, seconds: float) -> Failure:
    def failed(what: str, cause: Cause) -> LedgerError:
        if cause is not None:
            return map_error(cause, what, path)
        return LedgerError(
            f"{what}: ledger {path} did not answer within {seconds:g}s"
            " (a write still queued or running may complete later)",
            path=path,
        )

    return failed
