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

A disk with no bitmap (a raw image or block device, a network disk:
:attr:`~agent.virt.inventory.Disk.full_only`) is read in full every time, with the reason
``<why>: no persistent bitmap`` (e.g. ``format-raw: no persistent bitmap``), and stored
as what changed on top of the repository's newest image of it (``layered``) when that
image describes its blocks (:mod:`agent.repository.blocks`), is the disk's size and is
not damaged; else as a standalone image. Every other disk is left out, and the plan
says why (``excluded``): the inventory's reason, or ``excluded-by-config`` for a disk
``[backup] exclude`` names.

Modes: ``auto`` falls back to full per disk; ``incremental`` refuses (BackupError with
code ``chain-broken``, naming each disk and reason) rather than silently copying
everything (a disk with no bitmap, always read in full, does not count); ``full`` copies
everything and starts a new chain.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from agent.chain.records import CheckpointRecord, DiskChain
from agent.chain.rules import Verdict, base_checkpoint, disk_verdicts
from agent.core.errors import BackupError
from agent.core.logs import get_logger
from agent.repository.blocks import describe, disk_chain, previous_digests
from agent.repository.manifest import ExcludedDisk, Manifest
from agent.virt.inventory import Disk, DomainInfo

log = get_logger("backup")


class BackupMode(enum.StrEnum):
    AUTO = "auto"
    FULL = "full"
    INCREMENTAL = "incremental"


@dataclass(frozen=True, slots=True)
class DiskPlan:
    """One disk of a backup: ``since`` is the checkpoint an incremental starts from;
    ``bitmap``: the new checkpoint gets a bitmap of it; ``layered``: read in full, stored
    as what changed on top of the parent backup's image."""

    target: str
    size: int
    full: bool
    reason: str | None
    since: str | None
    bitmap: bool = True
    layered: bool = False

    @property
    def mode(self) -> str:
        return "full" if self.full else "incremental"


@dataclass(frozen=True, slots=True)
class BackupPlan:
    domain: str
    uuid: str
    base: str | None  # checkpoint the incrementals start from
    parent_backup: str | None  # repository backup the incremental (or layered) images sit on
    disks: tuple[DiskPlan, ...]
    excluded: tuple[ExcludedDisk, ...] = ()

    @property
    def any_incremental(self) -> bool:
        return any(not d.full for d in self.disks)


REPOSITORY_DAMAGED: Final = "repository-damaged"  # the reason a damaged repository gives
EXCLUDED_BY_CONFIG: Final = "excluded-by-config"  # a disk [backup] exclude leaves out
NO_BITMAP: Final = "no persistent bitmap"  # why a disk is read in full every time


@dataclass(frozen=True, slots=True)
class RepositoryTip:
    """What the plan needs of the repository's newest backup of the domain (whose
    manifest reads): ``broken`` names its disks whose chain is damaged, and why."""

    backup_id: str
    checkpoint: str
    targets: frozenset[str]
    broken: Mapping[str, str] = field(default_factory=dict)
    # Its disks whose images describe their blocks (a layer can go on top): their sizes.
    layerable: Mapping[str, int] = field(default_factory=dict)


def plan_backup(
    info: DomainInfo,
    records: Sequence[CheckpointRecord],
    chains: Mapping[str, DiskChain],
    tip: RepositoryTip | None,
    mode: BackupMode,
    *,
    damaged: str | None = None,
    exclude: Collection[str] = (),
) -> BackupPlan:
    """The plan; ``damaged`` says why no disk may be incremental on ``tip`` (a backup at
    least as new is damaged), if that is so; ``exclude``: targets configuration leaves out."""
    excluded = tuple(
        ExcludedDisk(d.target, EXCLUDED_BY_CONFIG if d.target in exclude else reason)
        for d in info.disks
        if (reason := d.excluded_reason or (EXCLUDED_BY_CONFIG if d.target in exclude else None))
    )
    left_out = {x.target for x in excluded}
    disks = [d for d in info.disks if d.backup_capable and d.target not in left_out]
    whole = [d for d in info.disks if d.full_only and d.target not in left_out]
    if not disks and not whole:
        raise BackupError(
            f"domain {info.name} has no disk that can be backed up "
            + ", ".join(f"{x.target}: {x.reason}" for x in excluded),
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
    wholes = [_whole(d, tip, mode, damaged, chains.get(d.target)) for d in whole]
    layered = any(p.layered for p in wholes)
    return BackupPlan(
        domain=info.name,
        uuid=info.uuid,
        base=base.name if base is not None and incremental else None,
        parent_backup=tip.backup_id if tip is not None and (incremental or layered) else None,
        disks=tuple(sorted([*plans, *wholes], key=_document_order(info))),
        excluded=excluded,
    )


def _whole(
    disk: Disk,
    tip: RepositoryTip | None,
    mode: BackupMode,
    damaged: str | None,
    chain: DiskChain | None,
) -> DiskPlan:
    """A disk with no bitmap: read in full; layered on the tip's image if it can be (not
    on an image verify found damaged: the ledger's chain of the disk is broken then)."""
    size = disk.capacity or 0
    broken = chain is not None and not chain.valid
    layered = (
        mode is not BackupMode.FULL
        and not broken
        and damaged is None
        and tip is not None
        and disk.target not in tip.broken
        and size > 0
        and tip.layerable.get(disk.target) == size
    )
    if mode is BackupMode.FULL:
        reason = "full-requested"
    elif broken and chain is not None:  # e.g. backup-corrupt: a standalone image again
        reason = chain.reason or "chain-broken"
    else:
        reason = f"{disk.unsupported_reason}: {NO_BITMAP}"
    return DiskPlan(
        target=disk.target,
        size=size,
        full=True,
        reason=reason,
        since=None,
        bitmap=False,
        layered=layered,
    )


@dataclass(frozen=True, slots=True)
class DiskCoverage:
    """How backups treat one disk of a domain today: ``how`` is ``incremental`` (it has a
    bitmap), ``full`` (read in full each time, ``reason`` says why) or ``excluded``
    (``reason`` says why); ``silent`` when it is excluded though the guest can write it
    and configuration did not ask for that: data that is in no backup. ``size``: its
    capacity, as libvirt reports it (0 if it did not)."""

    target: str
    how: str
    reason: str | None
    silent: bool = False
    size: int = field(default=0, compare=False)  # (how it is covered is what compares)


def disk_coverage(info: DomainInfo, exclude: Collection[str] = ()) -> tuple[DiskCoverage, ...]:
    """Every disk of ``info`` (``exclude``: the targets configuration leaves out)."""
    covered = []
    for disk in info.disks:
        size = disk.capacity or 0
        if disk.target in exclude:
            covered.append(DiskCoverage(disk.target, "excluded", EXCLUDED_BY_CONFIG, size=size))
        elif (reason := disk.excluded_reason) is not None:
            covered.append(
                DiskCoverage(disk.target, "excluded", reason, silent=disk.writable, size=size)
            )
        elif disk.full_only:
            why = f"{disk.unsupported_reason}: {NO_BITMAP}"
            covered.append(DiskCoverage(disk.target, "full", why, size=size))
        else:
            covered.append(DiskCoverage(disk.target, "incremental", None, size=size))
    return tuple(covered)


def partial(coverage: Sequence[DiskCoverage]) -> bool:
    """Whether a writable disk of the domain is in no backup, not on purpose."""
    return any(c.silent for c in coverage)


def layer_on(
    plan: BackupPlan, parent: Manifest, manifests: Sequence[Manifest]
) -> tuple[BackupPlan, dict[str, dict[int, str]]]:
    """For each layered disk, the digests of the blocks ``parent`` holds
    (:mod:`agent.repository.blocks`); a disk whose chain there does not describe its
    blocks is copied into a standalone image instead (the plan, changed so)."""
    by_id = {m.backup_id: m for m in manifests}
    blocks: dict[str, dict[int, str]] = {}
    disks = []
    for disk in plan.disks:
        chain = disk_chain(by_id.get, parent, disk.target) if disk.layered else None
        described = describe(chain) if chain is not None else None
        if described is not None:
            blocks[disk.target] = previous_digests(described)
        elif disk.layered:
            log.warning("the previous point does not describe its blocks", disk=disk.target)
        disks.append(dataclasses.replace(disk, layered=described is not None))
    # (no longer on the parent at all: every layer became standalone, nothing incremental)
    on_parent = any(not d.full or d.layered for d in disks)
    parent_backup = plan.parent_backup if on_parent else None
    return dataclasses.replace(plan, disks=tuple(disks), parent_backup=parent_backup), blocks


def _document_order(info: DomainInfo) -> Callable[[DiskPlan], int]:
    order = {d.target: i for i, d in enumerate(info.disks)}
    return lambda p: order[p.target]


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
    chain = chains.get(target)
    if chain is not None and not chain.valid:  # (verify's backup-corrupt says more)
        return chain.reason or "chain-broken"
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
