"""What makes a ledger record sound, shared by writes, imports and what SQLite returns.

Each check returns ``None`` for a sound value or a phrase saying what is wrong with it
("must not be empty", "expected a string, got 5"); the record checks return the first
:data:`Problem` as (field, phrase), and the caller names the record or the export.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence

from agent.chain.records import CheckpointDisk, CheckpointRecord, CheckpointState

Problem = tuple[str, str]  # (field, what is wrong with it)


def show(value: object) -> str:
    """``value`` as a message quotes it: its repr, shortened if long."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def text_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {show(value)}"
    if not value:
        return "must not be empty"
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        return f"{show(value)} contains a control character"
    return None


def blob_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {show(value)}"
    if not value.strip():
        return "must not be empty"
    return "contains a NUL character" if "\0" in value else None


def name_problem(value: object) -> str | None:
    if isinstance(value, str) and "/" in value:
        # libvirt refuses '/' in domain and checkpoint names; such a record cannot be real.
        return f"{show(value)} contains '/'"
    return text_problem(value)


def optional_name_problem(value: object) -> str | None:
    return None if value is None else name_problem(value)


def uuid_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {show(value)}"
    try:
        uuid.UUID(value)
    except ValueError:
        return f"{show(value)} is not a UUID"
    return None


def count_problem(value: object, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    # bool is an int to Python, never to a user reading the export.
    if not isinstance(value, int) or isinstance(value, bool):
        return f"expected an integer{' or null' if optional else ''}, got {show(value)}"
    return None if value >= 0 else f"must not be negative, got {value}"


def time_problem(value: object, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        return f"expected a number{' or null' if optional else ''}, got {show(value)}"
    if not math.isfinite(value) or value < 0:
        return f"must be a finite, non-negative number, got {value}"
    return None


def state_problem(value: object) -> str | None:
    if isinstance(value, CheckpointState):
        return None
    known = ", ".join(s.value for s in CheckpointState)
    return f"unknown state {show(value)} (known: {known})"


def first_problem(checks: Sequence[tuple[str, str | None]]) -> Problem | None:
    """The first (field, problem) of ``checks`` that has a problem."""
    return next(((field, problem) for field, problem in checks if problem is not None), None)


def disk_problem(disks: object) -> Problem | None:
    if not isinstance(disks, tuple):
        return ("disks", f"expected a tuple of CheckpointDisk, got {show(disks)}")
    seen: set[str] = set()
    for i, disk in enumerate(disks):
        if not isinstance(disk, CheckpointDisk):
            return (f"disks[{i}]", f"expected a CheckpointDisk, got {show(disk)}")
        problem = first_problem(
            [
                (f"disks[{i}].target", name_problem(disk.target)),
                (f"disks[{i}].bitmap", blob_problem(disk.bitmap)),
                (f"disks[{i}].identity", blob_problem(disk.identity)),
                (f"disks[{i}].capacity", count_problem(disk.capacity, optional=True)),
            ]
        )
        if problem is None and disk.target in seen:
            problem = (f"disks[{i}].target", "appears twice")
        if problem is not None:
            return problem
        seen.add(disk.target)
    return None


def record_problem(record: CheckpointRecord) -> Problem | None:
    """The first thing wrong with ``record`` as (field, problem), ``None`` if it is sound."""
    return first_problem(
        [
            ("domain", name_problem(record.domain)),
            ("domain_uuid", uuid_problem(record.domain_uuid)),
            ("name", name_problem(record.name)),
            ("parent", optional_name_problem(record.parent)),
            ("parent", "is the checkpoint itself" if record.parent == record.name else None),
            ("born_parent", optional_name_problem(record.born_parent)),
            ("created_at", count_problem(record.created_at)),
            ("xml", blob_problem(record.xml)),
            ("state", state_problem(record.state)),
            ("backed_up_at", time_problem(record.backed_up_at, optional=True)),
        ]
    ) or disk_problem(record.disks)


def chain_problem(valid: object, reason: object, detail: object) -> Problem | None:
    """The first thing wrong with a disk chain's (valid, reason, detail)."""
    if not isinstance(valid, bool):
        return ("valid", f"expected true or false, got {show(valid)}")
    if valid and reason is not None:
        return ("reason", f"a valid chain has no reason, got {show(reason)}")
    if not valid and (problem := text_problem(reason)) is not None:
        return ("reason", f"a broken chain needs a reason: {problem}")
    if not isinstance(detail, str):
        return ("detail", f"expected a string, got {show(detail)}")
    return None


def find_cycle(parents: Mapping[str, str | None]) -> str | None:
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
