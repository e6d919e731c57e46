"""Deciding, per disk, whether a backup is full or incremental, and why (pure logic).

A disk is copied incrementally only when every link holds: the ledger has a base
checkpoint with a successful backup; the repository's newest backup was made with
that very checkpoint (else the repository and the libvirt chain have drifted apart);
the disk's chain is valid in the ledger; the disk is in the base checkpoint and in the
repository's newest backup; and it is still the image and the size it was at the base
checkpoint (judged here too: no event tells of a disk grown while the domain runs).
Anything else makes that disk full, with the reason, while the other disks of the same
backup stay incremental.

A damaged repository (:mod:`agent.repository.listing`) makes disks full with the reason
``repository-damaged``: every disk when a backup at least as new as the tip is damaged
(its manifest does not read: the tip is then not the newest backup), and otherwise each
disk of the tip whose chain is broken (its image missing, or a backup its restore reads
damaged). An increment is never based on a damaged image.

Modes: ``auto`` falls back to full per disk; ``incremental`` refuses (BackupError with
code ``chain-broken``, naming each disk and reason) rather than silently copying
everything; ``full`` copies everything and starts a new chain.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from agent.chain.records import CheckpointRecord, DiskChain
from agent.chain.rules import Verdict, base_checkpoint, disk_verdicts
from agent.core.errors import BackupError
from agent.virt.inventory import DomainInfo


class BackupMode(enum.StrEnum):
    AUTO = "auto"
    FULL = "full"
    INCREMENTAL = "incremental"


@dataclass(frozen=True, slots=True)
class DiskPlan:
    """One disk of a backup: ``since`` is the checkpoint an incremental starts from."""

    target: str
    size: int
    full: bool
    reason: str | None
    since: str | None

    @property
    def mode(self) -> str:
        return "full" if self.full else "incremental"


@dataclass(frozen=True, slots=True)
class BackupPlan:
    domain: str
    uuid: str
    base: str | None  # checkpoint the incrementals start from
    parent_backup: str | None  # repository backup the incremental images sit on
    disks: tuple[DiskPlan, ...]

    @property
    def any_incremental(self) -> bool:
        return any(not d.full for d in self.disks)


REPOSITORY_DAMAGED: Final = "repository-damaged"  # the reason a damaged repository gives


@dataclass(frozen=True, slots=True)
class RepositoryTip:
    """What the plan needs of the repository's newest backup of the domain (whose
    manifest reads): ``broken`` names its disks whose chain is damaged, and why."""

    backup_id: str
    checkpoint: str
    targets: frozenset[str]
    broken: Mapping[str, str] = field(default_factory=dict)


def plan_backup(
    info: DomainInfo,
    records: Sequence[CheckpointRecord],
    chains: Mapping[str, DiskChain],
    tip: RepositoryTip | None,
    mode: BackupMode,
    *,
    damaged: str | None = None,
) -> BackupPlan:
    """The plan; ``damaged`` says why no disk may be incremental on ``tip`` (a backup at
    least as new is damaged), if that is so."""
    disks = [d for d in info.disks if d.backup_capable]
    if not disks:
        raise BackupError(
            f"domain {info.name} has no disk that can be backed up "
            + ", ".join(f"{d.target}: {d.unsupported_reason}" for d in info.disks),
            code="no-disks",
            domain=info.name,
        )
    base = base_checkpoint(records)
    if base is not None and base.backed_up_at is None:
        base = None  # a checkpoint without a backup behind it is no base for an increment
    verdicts = disk_verdicts(base, disks) if base is not None else {}
    plans = []
    for disk in disks:
        size = disk.capacity or 0
        reason = (
            REPOSITORY_DAMAGED
            if mode is not BackupMode.FULL and damaged is not None
            else _why_full(disk.target, base, chains, verdicts.get(disk.target), tip, mode)
        )
        plans.append(
            DiskPlan(
                target=disk.target,
                size=size,
                full=reason is not None,
                reason=reason,
                since=None if reason is not None or base is None else base.name,
            )
        )
    if mode is BackupMode.INCREMENTAL and any(p.full for p in plans):
        reasons = ", ".join(f"{p.target}: {p.reason}" for p in plans if p.full)
        raise BackupError(
            f"an incremental backup of {info.name} is not possible ({reasons})",
            code="chain-broken",
            domain=info.name,
        )
    incremental = any(not p.full for p in plans)
    return BackupPlan(
        domain=info.name,
        uuid=info.uuid,
        base=base.name if base is not None and incremental else None,
        parent_backup=tip.backup_id if tip is not None and incremental else None,
        disks=tuple(plans),
    )


def _why_full(
    target: str,
    base: CheckpointRecord | None,
    chains: Mapping[str, DiskChain],
    verdict: Verdict | None,
    tip: RepositoryTip | None,
    mode: BackupMode,
) -> str | None:
    """None when the disk can be incremental; else why it must be full."""
    if mode is BackupMode.FULL:
        return "full-requested"
    if base is None or tip is None:
        return "first-backup"
    if target in tip.broken:
        return REPOSITORY_DAMAGED
    if tip.checkpoint != base.name:
        return "repository-drift"
    return _why_disk_full(target, base, chains, verdict, tip)


def _why_disk_full(
    target: str,
    base: CheckpointRecord,
    chains: Mapping[str, DiskChain],
    verdict: Verdict | None,
    tip: RepositoryTip,
) -> str | None:
    """The disk's own reasons, once the base and the repository's tip agree."""
    chain = chains.get(target)
    if chain is not None and not chain.valid:
        return chain.reason or "chain-broken"
    if target not in {d.target for d in base.disks} or target not in tip.targets:
        return "disk-added"
    return None if verdict is None or verdict.valid else verdict.reason or "chain-broken"
