"""Tests for the ledger: round trips, transactions, schemas, export/import, kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import os
import random
import re
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.chain.ledger import Ledger
from agent.chain.ledger_ops import AddCheckpoint, MarkBackedUp, SetDiskChains, SetState
from agent.chain.ledger_schema import SCHEMA_VERSION
from agent.chain.records import CheckpointDisk, CheckpointRecord, CheckpointState, DiskChain
from agent.core.errors import LedgerCorruptError, LedgerError, LedgerImportError
from tests import ledger_writer

ROOT = Path(__file__).resolve().parent.parent
UUID_A = "6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11"
UUID_B = "9d3e7f10-1111-4222-8333-444455556666"
PENDING, ACTIVE, PRUNED = CheckpointState.PENDING, CheckpointState.ACTIVE, CheckpointState.PRUNED
# CRLF, tabs, non-ASCII and trailing blanks: the XML must come back byte for byte.
XML_TAIL = "\r\n\t<!-- caf\u00e9 \u2713 -->  \n  "


class Clock:
    """A settable time source, so ``updated_at`` and ``exported_at`` are predictable."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ckpt(
    name: str,
    parent: str | None = None,
    *,
    domain: str = "d1",
    state: CheckpointState = PENDING,
    targets: tuple[str, ...] = ("vdb", "vda"),  # not sorted: order must be kept
) -> CheckpointRecord:
    xml = f"<domaincheckpoint>\n  <name>{name}</name>\n</domaincheckpoint>{XML_TAIL}"
    return CheckpointRecord(
        domain=domain,
        domain_uuid=UUID_A,
        name=name,
        parent=parent,
        born_parent=parent,
        created_at=1_700_000_000 + len(name),
        xml=xml,
        disks=tuple(
            CheckpointDisk(t, name, f"file:/img/{domain}-{t}.qcow2|serial=S-{t}", 10 << 30)
            for t in targets
        ),
        state=state,
    )


def unseq(records: list[CheckpointRecord]) -> list[CheckpointRecord]:
    return [dataclasses.replace(r, seq=0) for r in records]


def _raw_sync(path: Path, statements: tuple[str, ...]) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        rows: list[tuple[Any, ...]] = []
        for statement in statements:
            rows = db.execute(statement).fetchall()
        return rows
    finally:
        db.close()


async def raw(path: Path, *statements: str) -> list[tuple[Any, ...]]:
    """Run statements on a connection of our own (off the loop); the last one's rows."""
    return await asyncio.to_thread(_raw_sync, path, statements)


class WriteLock:
    """Another process's write transaction on the file, held inside the ``async with``."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    async def __aenter__(self) -> WriteLock:
        await asyncio.to_thread(self._db.execute, "BEGIN IMMEDIATE")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self._release)

    def _release(self) -> None:
        self._db.execute("ROLLBACK")
        self._db.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "nested" / "ledger.db"  # directories do not exist yet


@pytest.fixture
async def ledger(db_path: Path, clock: Clock) -> AsyncIterator[Ledger]:
    opened = await Ledger.open(db_path, timeout=10, clock=clock)
    try:
        yield opened
    finally:
        await opened.close()


async def chain_of_three(ledger: Ledger) -> list[CheckpointRecord]:
    return [
        await ledger.add_checkpoint(ckpt("c1")),
        await ledger.add_checkpoint(ckpt("c2", "c1")),
        await ledger.add_checkpoint(ckpt("c3", "c2")),
    ]


# --- checkpoints -----------------------------------------------------------------------------


async def test_added_checkpoints_read_back_exactly(ledger: Ledger) -> None:
    added = [ckpt("c1"), ckpt("c2", "c1", targets=("sdb", "vda", "sda"))]
    stored = [await ledger.add_checkpoint(r) for r in added]
    assert [s.seq for s in stored] == sorted({s.seq for s in stored})  # assigned, increasing
    assert stored == [dataclasses.replace(r, seq=s.seq) for r, s in zip(added, stored, strict=True)]

    assert await ledger.checkpoints("d1") == stored
    one = await ledger.checkpoint("d1", "c2")
    assert one == stored[1]
    assert one is not None
    assert one.xml.encode() == added[1].xml.encode()
    assert [d.target for d in one.disks] == ["sdb", "vda", "sda"]
    assert await ledger.checkpoint("d1", "nope") is None
    assert await ledger.checkpoint("d2", "c1") is None
    assert await ledger.checkpoints("d2") == []


async def test_checkpoints_are_in_insertion_order_not_name_order(ledger: Ledger) -> None:
    await ledger.add_checkpoint(ckpt("zz"))
    await ledger.add_checkpoint(ckpt("other", domain="d2"))
    await ledger.add_checkpoint(ckpt("aa", "zz"))
    await ledger.add_checkpoint(ckpt("mm", "aa"))
    assert [r.name for r in await ledger.checkpoints("d1")] == ["zz", "aa", "mm"]
    assert [r.name for r in await ledger.checkpoints("d2")] == ["other"]
    assert await ledger.domains() == ["d1", "d2"]


async def test_duplicate_checkpoint_is_refused_and_original_kept(ledger: Ledger) -> None:
    first = await ledger.add_checkpoint(ckpt("c1"))
    with pytest.raises(LedgerError, match="already in the ledger") as info:
        await ledger.add_checkpoint(dataclasses.replace(ckpt("c1"), xml="<other/>"))
    assert info.value.path == str(ledger.path)
    assert await ledger.checkpoints("d1") == [first]
    # The same name in another domain is a different checkpoint.
    await ledger.add_checkpoint(ckpt("c1", domain="d2"))


async def test_parent_must_be_in_the_ledger(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="parent 'ghost' is not in the ledger"):
        await ledger.add_checkpoint(ckpt("c1", "ghost"))
    assert await ledger.checkpoints("d1") == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"domain_uuid": "not-a-uuid"}, "domain_uuid"),
        ({"name": "a/b"}, "name"),
        ({"name": ""}, "name"),
        ({"parent": "c1", "name": "c1"}, "parent"),
        ({"created_at": -1}, "created_at"),
        ({"xml": "  "}, "xml"),
        ({"backed_up_at": float("nan")}, "backed_up_at"),
        ({"state": "zombie"}, "state"),
        (
            {"disks": (CheckpointDisk("vda", "b", "i", 1), CheckpointDisk("vda", "b", "i", 1))},
            "disks[1].target",
        ),
        ({"disks": (CheckpointDisk("vda", "b", "i", -5),)}, "disks[0].capacity"),
    ],
)
async def test_unsound_record_is_refused_naming_the_field(
    ledger: Ledger, change: dict[str, Any], field: str
) -> None:
    with pytest.raises(LedgerError, match=re.escape(f"{field}: ")):
        await ledger.add_checkpoint(dataclasses.replace(ckpt("c1"), **change))
    assert await ledger.domains() == []


async def test_set_state_and_filter_by_state(ledger: Ledger) -> None:
    await chain_of_three(ledger)
    await ledger.set_state("d1", ["c1", "c2"], PRUNED)
    states = {r.name: r.state for r in await ledger.checkpoints("d1")}
    assert states == {"c1": PRUNED, "c2": PRUNED, "c3": PENDING}
    assert [r.name for r in await ledger.checkpoints("d1", states={PENDING})] == ["c3"]
    both = await ledger.checkpoints("d1", states=[PRUNED, PENDING])
    assert [r.name for r in both] == ["c1", "c2", "c3"]
    assert await ledger.checkpoints("d1", states=()) == []
    assert await ledger.checkpoints("d1", states={ACTIVE}) == []


async def test_set_state_with_an_unknown_name_changes_nothing(ledger: Ledger) -> None:
    before = await chain_of_three(ledger)
    # c1 comes first: an implementation without a transaction would already have changed it.
    with pytest.raises(LedgerError, match="no checkpoint 'nope'"):
        await ledger.set_state("d1", ["c1", "nope", "c2"], PRUNED)
    assert await ledger.checkpoints("d1") == before


async def test_set_state_refuses_a_bare_string(ledger: Ledger) -> None:
    await ledger.add_checkpoint(ckpt("c"))
    with pytest.raises(LedgerError, match="collection"):
        await ledger.set_state("d1", "c", PRUNED)


async def test_mark_backed_up_sets_time_and_activates(ledger: Ledger) -> None:
    await chain_of_three(ledger)
    await ledger.mark_backed_up("d1", "c2", 1234.5)
    c2 = await ledger.checkpoint("d1", "c2")
    assert c2 is not None
    assert (c2.state, c2.backed_up_at) == (ACTIVE, 1234.5)
    c1 = await ledger.checkpoint("d1", "c1")
    assert c1 is not None
    assert (c1.state, c1.backed_up_at) == (PENDING, None)
    with pytest.raises(LedgerError, match="no checkpoint 'c9'"):
        await ledger.mark_backed_up("d1", "c9", 1.0)


async def test_set_parents_changes_current_parent_only(ledger: Ledger) -> None:
    await chain_of_three(ledger)
    # c2 pruned: libvirt re-parents c3 onto c1.
    await ledger.set_parents("d1", {"c3": "c1"})
    c3 = await ledger.checkpoint("d1", "c3")
    assert c3 is not None
    assert (c3.parent, c3.born_parent) == ("c1", "c2")
    await ledger.set_parents("d1", {"c2": None, "c3": None})
    assert [r.parent for r in await ledger.checkpoints("d1")] == [None, None, None]
    assert [r.born_parent for r in await ledger.checkpoints("d1")] == [None, "c1", "c2"]


async def test_set_parents_is_all_or_nothing(ledger: Ledger) -> None:
    before = await chain_of_three(ledger)
    with pytest.raises(LedgerError, match="'ghost'"):
        await ledger.set_parents("d1", {"c2": None, "c3": "ghost"})
    with pytest.raises(LedgerError, match="no checkpoint 'c9'"):
        await ledger.set_parents("d1", {"c3": "c1", "c9": "c1"})
    with pytest.raises(LedgerError, match="own ancestor"):
        await ledger.set_parents("d1", {"c1": "c3"})
    with pytest.raises(LedgerError, match="own parent"):
        await ledger.set_parents("d1", {"c1": "c1"})
    assert await ledger.checkpoints("d1") == before


async def test_set_domain_uuid_updates_only_that_domain(ledger: Ledger) -> None:
    await chain_of_three(ledger)
    await ledger.add_checkpoint(ckpt("x", domain="d2"))
    await ledger.set_domain_uuid("d1", UUID_B)
    assert {r.domain_uuid for r in await ledger.checkpoints("d1")} == {UUID_B}
    assert {r.domain_uuid for r in await ledger.checkpoints("d2")} == {UUID_A}
    with pytest.raises(LedgerError, match="not a UUID"):
        await ledger.set_domain_uuid("d1", "garbage")


# --- disk chains -------------------------------------------------------------------------------


async def test_disk_chains_upsert_and_forget(ledger: Ledger, clock: Clock) -> None:
    assert await ledger.disk_chains("d1") == {}
    await ledger.set_disk_chains(
        "d1",
        {
            "vda": (True, None, "chain usable"),
            "vdb": (False, "disk-resized", "vdb grew from 1 GiB to 2 GiB"),
        },
    )
    clock.now = 2000.0
    await ledger.set_disk_chains("d1", {"vdb": (True, None, "new chain")})
    assert await ledger.disk_chains("d1") == {
        "vda": DiskChain("d1", "vda", True, None, "chain usable", 1000.0),
        "vdb": DiskChain("d1", "vdb", True, None, "new chain", 2000.0),
    }
    assert await ledger.domains() == ["d1"]  # a domain with chains only is still known
    await ledger.forget_disk_chain("d1", "vda")
    await ledger.forget_disk_chain("d1", "vdz")  # nothing to forget: no error
    assert list(await ledger.disk_chains("d1")) == ["vdb"]
    assert await ledger.disk_chains("d2") == {}


@pytest.mark.parametrize(
    "chain",
    [(True, "bitmap-missing", "valid, yet a reason"), (False, None, "broken without reason")],
)
async def test_disk_chain_reason_matches_validity(
    ledger: Ledger, chain: tuple[bool, str | None, str]
) -> None:
    with pytest.raises(LedgerError, match="reason"):
        await ledger.set_disk_chains("d1", {"vda": (True, None, "ok"), "vdb": chain})
    assert await ledger.disk_chains("d1") == {}


# --- transactions --------------------------------------------------------------------------------


async def test_transaction_applies_all_operations_or_none(ledger: Ledger) -> None:
    await ledger.add_checkpoint(ckpt("c1"))
    await ledger.transaction(
        [
            AddCheckpoint(ckpt("c2", "c1")),
            MarkBackedUp("d1", "c2", 50.0),
            SetState("d1", ("c1",), PRUNED),
            SetDiskChains("d1", {"vda": (True, None, "ok")}),
        ]
    )
    before = await ledger.checkpoints("d1")
    assert [(r.name, r.state) for r in before] == [("c1", PRUNED), ("c2", ACTIVE)]
    assert list(await ledger.disk_chains("d1")) == ["vda"]

    with pytest.raises(LedgerError, match="already in the ledger"):
        await ledger.transaction(
            [
                AddCheckpoint(ckpt("c3", "c2")),
                SetDiskChains("d1", {"vda": (False, "bitmap-missing", "gone")}),
                AddCheckpoint(ckpt("c2", "c1")),  # duplicate: fails last
            ]
        )
    assert await ledger.checkpoints("d1") == before
    assert (await ledger.disk_chains("d1"))["vda"].valid


async def test_failure_inside_sqlite_mid_write_leaves_nothing(
    ledger: Ledger, db_path: Path
) -> None:
    # A trigger makes SQLite itself fail on the second disk row, after the checkpoint row
    # and the first disk row were written in the same transaction.
    await raw(
        db_path,
        "CREATE TRIGGER boom BEFORE INSERT ON checkpoint_disks WHEN NEW.target = 'boom'"
        " BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
    )
    with pytest.raises(LedgerError, match="injected failure") as info:
        await ledger.add_checkpoint(ckpt("c1", targets=("vda", "boom")))
    assert isinstance(info.value.__cause__, sqlite3.Error)
    assert not isinstance(info.value, LedgerCorruptError)
    assert await raw(db_path, "SELECT count(*) FROM checkpoints") == [(0,)]
    assert await raw(db_path, "SELECT count(*) FROM checkpoint_disks") == [(0,)]
    stored = await ledger.add_checkpoint(ckpt("c1"))  # the ledger is still usable
    assert await ledger.checkpoints("d1") == [stored]


# --- the file ----------------------------------------------------------------------------------


async def test_reopen_keeps_everything_with_wal_and_schema_version(
    db_path: Path, clock: Clock
) -> None:
    async with await Ledger.open(db_path, clock=clock) as first:
        records = await chain_of_three(first)
        await first.set_disk_chains("d1", {"vda": (False, "disk-replaced", "new image")})
        chains = await first.disk_chains("d1")
        settings = await first._call(
            "pragmas",
            lambda db: [
                db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("synchronous", "foreign_keys")
            ],
        )
    assert settings == [2, 1]  # FULL, ON
    async with await Ledger.open(db_path) as second:
        assert await second.checkpoints("d1") == records
        assert await second.disk_chains("d1") == chains
        # AUTOINCREMENT: seq keeps growing across opens, never reusing a number.
        assert (await second.add_checkpoint(ckpt("c4", "c3"))).seq > records[-1].seq
    assert await raw(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert await raw(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


async def test_closed_ledger_refuses_calls(db_path: Path) -> None:
    ledger = await Ledger.open(db_path)
    await ledger.close()
    await ledger.close()  # idempotent
    with pytest.raises(LedgerError, match="closed"):
        await ledger.checkpoints("d1")


async def test_newer_schema_version_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    await raw(path, "CREATE TABLE future (x)", f"PRAGMA user_version = {SCHEMA_VERSION + 7}")
    newer = SCHEMA_VERSION + 7
    with pytest.raises(
        LedgerCorruptError,
        match=f"ledger schema version {newer} is newer than this agent \\({SCHEMA_VERSION}\\)",
    ):
        await Ledger.open(path)
    assert await raw(path, "PRAGMA journal_mode") == [("delete",)]  # not even switched to WAL


async def test_random_bytes_are_not_a_ledger(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    await asyncio.to_thread(path.write_bytes, random.Random(7).randbytes(16384))
    with pytest.raises(LedgerCorruptError) as info:
        await Ledger.open(path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)


async def test_other_sqlite_database_is_not_a_ledger(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    await raw(path, "CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    with pytest.raises(LedgerCorruptError, match="not a ledger"):
        await Ledger.open(path)
    assert await raw(path, "SELECT name FROM sqlite_master") == [("photos",)]


async def test_damaged_pages_are_reported_corrupt(db_path: Path) -> None:
    async with await Ledger.open(db_path) as ledger:
        for i in range(40):
            await ledger.add_checkpoint(ckpt(f"c{i}"))
    await raw(db_path, "PRAGMA wal_checkpoint(TRUNCATE)")

    def damage() -> None:
        with db_path.open("r+b") as f:
            f.seek(4096 * 3)
            f.write(random.Random(3).randbytes(4096 * 2))

    await asyncio.to_thread(damage)
    with pytest.raises(LedgerCorruptError) as info:
        await Ledger.open(db_path)
    assert str(db_path) in str(info.value)


async def test_locked_file_fails_without_blocking_the_loop(db_path: Path) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    locked = await Ledger.open(db_path, timeout=1.0)  # busy timeout: 0.5 s
    task = asyncio.create_task(ticker())
    try:
        async with WriteLock(db_path):
            started = time.monotonic()
            with pytest.raises(LedgerError, match="locked"):
                await locked.add_checkpoint(ckpt("c1"))
            waited = time.monotonic() - started
            assert await locked.checkpoints("d1") == []  # readers are not blocked by WAL
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await locked.close()
    assert 0.4 < waited < 1.0
    assert ticks >= 20  # the loop ran all along: SQLite waited in the worker thread


async def test_call_timeout_is_reported_and_later_calls_still_work(db_path: Path) -> None:
    ledger = await Ledger.open(db_path, timeout=0.5, busy_timeout=5.0)
    try:
        async with WriteLock(db_path):
            with pytest.raises(LedgerError, match=r"did not answer within 0\.5s"):
                await ledger.add_checkpoint(ckpt("c1"))
        # As documented, the timed-out write was not undone: it commits once the lock goes.
        names: list[str] = []
        for _ in range(50):
            with contextlib.suppress(LedgerError):
                names = [r.name for r in await ledger.checkpoints("d1")]
            if names:
                break
            await asyncio.sleep(0.1)
        assert names == ["c1"]
    finally:
        await ledger.close()


# --- export and import ---------------------------------------------------------------------------


async def populated(ledger: Ledger, clock: Clock) -> dict[str, Any]:
    await chain_of_three(ledger)
    await ledger.mark_backed_up("d1", "c1", 1700000100.25)
    await ledger.set_state("d1", ["c2"], PRUNED)
    await ledger.set_parents("d1", {"c3": "c1"})
    await ledger.set_domain_uuid("d1", UUID_B)
    await ledger.set_disk_chains(
        "d1", {"vda": (True, None, "ok"), "vdb": (False, "bitmap-missing", "no bitmap c3")}
    )
    await ledger.add_checkpoint(ckpt("elsewhere", domain="d2"))
    clock.now = 5000.0
    # Through JSON text: the export must survive the trip to a file and back.
    exported: dict[str, Any] = json.loads(json.dumps(await ledger.export_domain("d1")))
    return exported


async def test_export_has_every_field(ledger: Ledger, clock: Clock) -> None:
    data = await populated(ledger, clock)
    assert {k: data[k] for k in ("format", "version", "domain", "exported_at")} == {
        "format": "libvirt-backup-agent/ledger-export",
        "version": 1,
        "domain": "d1",
        "exported_at": 5000.0,
    }
    c3 = data["checkpoints"][2]
    assert c3["name"] == "c3"
    assert (c3["parent"], c3["born_parent"], c3["domain_uuid"]) == ("c1", "c2", UUID_B)
    assert c3["xml"] == ckpt("c3").xml
    assert c3["disks"][0] == {
        "target": "vdb",
        "bitmap": "c3",
        "identity": "file:/img/d1-vdb.qcow2|serial=S-vdb",
        "capacity": 10 << 30,
    }
    assert data["disk_chains"][1] == {
        "target": "vdb",
        "valid": False,
        "reason": "bitmap-missing",
        "detail": "no bitmap c3",
        "updated_at": 1000.0,
    }


async def test_export_import_round_trip(ledger: Ledger, clock: Clock, tmp_path: Path) -> None:
    data = await populated(ledger, clock)
    async with await Ledger.open(tmp_path / "other.db") as fresh:
        assert await fresh.import_domain(data) == 3
        assert unseq(await fresh.checkpoints("d1")) == unseq(await ledger.checkpoints("d1"))
        assert await fresh.disk_chains("d1") == await ledger.disk_chains("d1")
        assert await fresh.domains() == ["d1"]
        again = await fresh.export_domain("d1")
        for exported in (again, data):
            exported.pop("exported_at")
            for c in exported["checkpoints"]:
                c.pop("seq")
        assert again == data


async def test_import_of_the_same_export_twice_is_a_no_op(ledger: Ledger, clock: Clock) -> None:
    data = await populated(ledger, clock)
    before = await ledger.checkpoints("d1")
    assert await ledger.import_domain(data) == 0
    assert await ledger.import_domain(copy.deepcopy(data)) == 0
    assert await ledger.checkpoints("d1") == before  # same seqs: nothing re-inserted


async def test_conflicting_import_needs_replace(ledger: Ledger, clock: Clock) -> None:
    data = await populated(ledger, clock)
    await ledger.add_checkpoint(ckpt("c4", "c3"))  # only in the ledger
    before = await ledger.checkpoints("d1")
    data["checkpoints"][0]["state"] = "discarded"
    data["disk_chains"] = data["disk_chains"][:1]
    with pytest.raises(LedgerImportError, match=r"checkpoints\[0\] \('c1'\) differs") as info:
        await ledger.import_domain(data)
    assert info.value.path == str(ledger.path)
    assert await ledger.checkpoints("d1") == before

    assert await ledger.import_domain(data, replace=True) == 3
    after = await ledger.checkpoints("d1")
    assert [(r.name, r.state) for r in after] == [
        ("c1", CheckpointState.DISCARDED),
        ("c2", PRUNED),
        ("c3", PENDING),
    ]
    assert list(await ledger.disk_chains("d1")) == ["vda"]
    assert [r.name for r in await ledger.checkpoints("d2")] == ["elsewhere"]


async def test_import_with_a_new_checkpoint_is_refused_without_replace(
    ledger: Ledger, clock: Clock
) -> None:
    data = await populated(ledger, clock)
    extra = copy.deepcopy(data["checkpoints"][2])
    extra.update(name="c9", parent="c3")
    data["checkpoints"].append(extra)
    with pytest.raises(LedgerImportError, match=r"checkpoints\[3\] \('c9'\) is not in the ledger"):
        await ledger.import_domain(data)
    assert await ledger.checkpoint("d1", "c9") is None


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change to an export: set (or, with ``...``, delete) the item at a dotted path."""

    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is ...:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


MALFORMED: list[tuple[Callable[[dict[str, Any]], None], str]] = [
    (_set("format", "something-else"), "format"),
    (_set("version", 2), "version"),
    (_set("version", True), "version"),
    (_set("domain", ...), "domain"),
    (_set("checkpoints", {}), "checkpoints"),
    (_set("surprise", 1), "surprise"),
    (_set("checkpoints.0.xml", ...), "checkpoints[0].xml"),
    (_set("checkpoints.1.created_at", "yesterday"), "checkpoints[1].created_at"),
    (_set("checkpoints.1.created_at", True), "checkpoints[1].created_at"),
    (_set("checkpoints.0.state", "zombie"), "checkpoints[0].state"),
    (_set("checkpoints.2.parent", "ghost"), "checkpoints[2].parent"),
    (_set("checkpoints.2.name", "c2"), "checkpoints[2].name"),
    (_set("checkpoints.0.domain", "d2"), "checkpoints[0].domain"),
    (_set("checkpoints.0.domain_uuid", "nope"), "checkpoints[0].domain_uuid"),
    (_set("checkpoints.0.colour", "red"), "checkpoints[0].colour"),
    (_set("checkpoints.0.backed_up_at", "noon"), "checkpoints[0].backed_up_at"),
    (_set("checkpoints.2.disks.0.capacity", "1G"), "checkpoints[2].disks[0].capacity"),
    (_set("checkpoints.2.disks.1.target", ...), "checkpoints[2].disks[1].target"),
    (_set("checkpoints.2.disks", "vda"), "checkpoints[2].disks"),
    (_set("checkpoints.0.parent", "c3"), "checkpoints"),  # a cycle: c1 -> c3 -> c1
    (_set("disk_chains.0.valid", "yes"), "disk_chains[0].valid"),
    (_set("disk_chains.1.reason", None), "disk_chains[1].reason"),
    (_set("disk_chains.1.target", "vda"), "disk_chains[1].target"),
]


@pytest.mark.parametrize(("change", "field"), MALFORMED)
async def test_malformed_export_is_refused_naming_the_field_and_changes_nothing(
    ledger: Ledger, clock: Clock, change: Callable[[dict[str, Any]], None], field: str
) -> None:
    data = await populated(ledger, clock)
    before = (await ledger.export_domain("d1"), await ledger.export_domain("d2"))
    change(data)
    with pytest.raises(LedgerImportError, match=rf"^import: {re.escape(field)}: "):
        # replace=True: an importer that deleted before validating would lose the records.
        await ledger.import_domain(data, replace=True)
    assert (await ledger.export_domain("d1"), await ledger.export_domain("d2")) == before


# With several mistakes, the one reported is the first in the order an export is checked in:
# per object unknown fields, then missing ones by name, then values in order; a checkpoint's
# disk values after its other fields; the checkpoints before the disk chains.
SEVERAL_MISTAKES: list[tuple[list[Callable[[dict[str, Any]], None]], str]] = [
    ([_set("surprise", 1), _set("domain", ...)], "import: surprise: unknown field"),
    ([_set("exported_at", ...), _set("domain", ...)], "import: domain: missing"),
    (
        [_set("version", 2), _set("domain", "")],
        "import: version: this agent reads version 1, got 2",
    ),
    (
        [_set("checkpoints.1.colour", 1), _set("checkpoints.0.name", "")],
        "import: checkpoints[0].name: must not be empty",
    ),
    (
        [_set("checkpoints.0.disks.1.capacity", -1), _set("checkpoints.0.created_at", "x")],
        "import: checkpoints[0].created_at: expected an integer, got 'x'",
    ),
    (
        [_set("checkpoints.0.disks", 3), _set("checkpoints.0.domain_uuid", "nope")],
        "import: checkpoints[0].disks: expected an array, got 3",
    ),
    (
        [_set("checkpoints.2.name", "c2"), _set("disk_chains", 5)],
        "import: checkpoints[2].name: 'c2' appears twice",
    ),
    (
        [_set("checkpoints.0.xml", ...), _set("checkpoints.0.colour", 1)],
        "import: checkpoints[0].colour: unknown field",
    ),
    (  # a target that is not a string used to fail with TypeError (unhashable)
        [_set("checkpoints.0.disks.0.target", {}), _set("checkpoints.1.state", "zombie")],
        "import: checkpoints[0].disks[0].target: expected a string, got {}",
    ),
]


@pytest.mark.parametrize(("changes", "message"), SEVERAL_MISTAKES)
async def test_of_several_mistakes_the_first_checked_is_reported(
    ledger: Ledger, clock: Clock, changes: list[Callable[[dict[str, Any]], None]], message: str
) -> None:
    data = await populated(ledger, clock)
    for change in changes:
        change(data)
    with pytest.raises(LedgerImportError) as info:
        await ledger.import_domain(data, replace=True)
    assert str(info.value) == message


# --- kill -9 -------------------------------------------------------------------------------------


async def run_writer_and_kill(path: Path, round_: int, commits: int, delay: float) -> list[str]:
    """Start the writer, let it commit ``commits`` checkpoints, wait ``delay``, SIGKILL it.

    Returns the names it reported as committed, including lines still in the pipe.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.ledger_writer",
        str(path),
        str(round_),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    lines: list[bytes] = []
    try:
        assert proc.stdout is not None
        while len(lines) < commits:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not line:
                break
            lines.append(line)
        await asyncio.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        rest, errors = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL, errors.decode()
    lines += rest.splitlines(keepends=True)
    # A line cut short by the kill was not completely reported; only whole lines count.
    return [line.split()[2].decode() for line in lines if line.endswith(b"\n")]


async def check_after_kill(path: Path, reported: dict[int, list[str]]) -> None:
    assert await raw(path, "PRAGMA integrity_check") == [("ok",)]
    orphans = "SELECT count(*) FROM checkpoints c WHERE NOT EXISTS"
    orphans += " (SELECT 1 FROM checkpoint_disks d WHERE d.checkpoint = c.seq)"
    assert await raw(path, orphans) == [(0,)]
    async with await Ledger.open(path) as ledger:
        records = await ledger.checkpoints(ledger_writer.DOMAIN)
    parent = None
    for record in records:  # complete, in order, each the child of the one before
        assert record == dataclasses.replace(
            ledger_writer.make_record(record.name, parent), seq=record.seq
        )
        parent = record.name
    names = [r.name for r in records]
    for round_, printed in reported.items():
        held = [n for n in names if n.startswith(f"r{round_}-")]
        assert held[: len(printed)] == printed  # every reported commit survived
        # At most the one add that committed before the kill stopped its report.
        assert len(held) - len(printed) in (0, 1)
        assert held == [ledger_writer.round_name(round_, i) for i in range(len(held))]


async def test_kill_9_mid_write_loses_no_commit_and_leaves_nothing_partial(
    tmp_path: Path,
) -> None:
    path = tmp_path / "crash" / "ledger.db"
    reported: dict[int, list[str]] = {}
    # Three kills on the same file, at different moments; each later writer starts on the
    # file the previous kill left (WAL not checkpointed, maybe a torn last frame).
    for round_, (commits, delay) in enumerate([(30, 0.0), (35, 0.004), (40, 0.017)]):
        printed = await run_writer_and_kill(path, round_, commits, delay)
        assert len(printed) >= commits
        reported[round_] = printed
        await check_after_kill(path, reported)
