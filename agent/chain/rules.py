"""The rules of a checkpoint chain, as pure functions (no libvirt, no I/O).

- **Names** (:func:`new_checkpoint_name`): ``lba-<UTC time>-<random>``, sortable for
  humans, unique per domain, and recognisably the agent's own (:func:`is_own`), so a
  checkpoint the agent created but never recorded (it died in between) can be told
  from one an operator made.
- **Order** (:func:`order_chain`): parents first, by the ledger's parent links, never
  by name or time.
- **Redefine XML** (:func:`redefine_xml`): the XML saved at creation with ``<parent>``
  set to the parent libvirt must have *now* (pruning re-parents), and without
  ``<domain>`` when the domain's UUID changed (libvirt refuses the old one).
- **Disk verdicts** (:func:`disk_verdicts`): whether each disk of a checkpoint is still
  the image it was, by identity and size; the reasons are the machine-readable strings
  listed in :data:`REASONS`.
- **Pruning** (:func:`prune_plan`): which checkpoints libvirt no longer needs.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from lxml import etree

from agent.chain.records import CheckpointDisk, CheckpointRecord, CheckpointState
from agent.core.errors import ChainError, InventoryError
from agent.virt.inventory import Disk, DiskIdentity

OWN_PREFIX = "lba-"
_OWN_NAME = re.compile(r"^lba-\d{8}T\d{6}Z-[0-9a-f]{6}$")

#: Why a disk's chain cannot be trusted; the next backup of that disk is full.
REASONS = {
    "bitmap-missing": "a bitmap of the chain is not in the image (or has a gap in its layers)",
    "bitmap-inconsistent": "QEMU stopped without writing the bitmap back (crash, kill)",
    "bitmap-disabled": "the bitmap is not recording",
    "disk-replaced": "another image is on this target than at the checkpoint",
    "disk-resized": "the disk's size changed since the checkpoint",
    "disk-added": "the disk is not part of any checkpoint yet",
    "disk-removed": "the disk was unplugged",
    "uuid-changed": "the domain was re-created and the disk could not be matched",
    "migrated-away": "the domain left this host; its chain continues elsewhere",
    "no-checkpoint": "the agent holds no checkpoint for this domain",
    "image-not-qcow2": "only qcow2 images hold persistent bitmaps",
    "backup-corrupt": "verify found damage in a backup the newest restore of the disk reads",
}

LIVE_STATES = frozenset({CheckpointState.ACTIVE, CheckpointState.PENDING})


@dataclass(frozen=True, slots=True)
class Verdict:
    """One disk's chain: trusted, or broken with a reason from :data:`REASONS`."""

    valid: bool
    reason: str | None = None
    detail: str = ""

    @classmethod
    def broken(cls, reason: str, detail: str) -> Verdict:
        if reason not in REASONS:
            raise ValueError(f"unknown chain reason {reason!r}")
        return cls(False, reason, detail)


VALID = Verdict(True, None, "")


def new_checkpoint_name(now: datetime | None = None) -> str:
    """A fresh name: ``lba-20261125T183301Z-1a2b3c``."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{OWN_PREFIX}{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def is_own(name: str) -> bool:
    """Whether a checkpoint name is one the agent makes."""
    return bool(_OWN_NAME.match(name))


def order_chain(records: Iterable[CheckpointRecord]) -> list[CheckpointRecord]:
    """Records parents first. A parent outside the set (pruned) makes a record a root.

    Raises ChainError for a cycle or for two records claiming the same parent's place
    twice in a way that makes no tree (a name appearing twice).
    """
    by_name: dict[str, CheckpointRecord] = {}
    for record in records:
        if record.name in by_name:
            raise ChainError(f"checkpoint {record.name} appears twice", domain=record.domain)
        by_name[record.name] = record
    children: dict[str | None, list[CheckpointRecord]] = {}
    for record in by_name.values():
        parent = record.parent if record.parent in by_name else None
        children.setdefault(parent, []).append(record)
    ordered: list[CheckpointRecord] = []
    queue = sorted(children.get(None, []), key=lambda r: r.seq)
    while queue:
        record = queue.pop(0)
        ordered.append(record)
        queue.extend(sorted(children.get(record.name, []), key=lambda r: r.seq))
    if len(ordered) != len(by_name):
        stuck = sorted(set(by_name) - {r.name for r in ordered})
        raise ChainError(f"checkpoint parent links form a cycle: {', '.join(stuck)}")
    return ordered


_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, remove_blank_text=False)


def redefine_xml(record: CheckpointRecord, *, keep_domain: bool) -> str:
    """The XML to redefine ``record`` with: its saved XML, today's parent, maybe no domain."""
    try:
        root = etree.fromstring(record.xml.encode(), _PARSER)
    except etree.XMLSyntaxError as exc:
        raise ChainError(
            f"saved XML of checkpoint {record.name} is not XML: {exc}",
            domain=record.domain,
            checkpoint=record.name,
        ) from exc
    for old in root.findall("parent"):
        root.remove(old)
    if record.parent is not None:
        parent = etree.Element("parent")
        etree.SubElement(parent, "name").text = record.parent
        name = root.find("name")
        root.insert(root.index(name) + 1 if name is not None else 0, parent)
    if not keep_domain:
        for domain in root.findall("domain"):
            root.remove(domain)
    return etree.tostring(root, encoding="unicode")


def _root(xml: str) -> etree._Element:
    try:
        return etree.fromstring(xml.encode(), _PARSER)
    except etree.XMLSyntaxError as exc:
        raise ChainError(f"checkpoint XML cannot be parsed: {exc}") from exc


def domain_uuid_in_xml(xml: str) -> str | None:
    """The UUID of the ``<domain>`` saved inside a checkpoint XML, or None."""
    return _root(xml).findtext("domain/uuid")


def restrict_disks(xml: str, targets: Iterable[str]) -> str:
    """The checkpoint XML with every disk not in ``targets`` marked ``checkpoint='no'``."""
    keep = set(targets)
    root = _root(xml)
    for disk in root.findall("disks/disk"):
        if disk.get("name") not in keep and disk.get("checkpoint") == "bitmap":
            disk.set("checkpoint", "no")
            if "bitmap" in disk.attrib:
                del disk.attrib["bitmap"]
    return etree.tostring(root, encoding="unicode")


def parent_in_xml(xml: str) -> str | None:
    """The ``<parent><name>`` of a checkpoint XML, or None."""
    return _root(xml).findtext("parent/name")


def checkpoint_xml(name: str, disks: Sequence[Disk]) -> str:
    """The XML to create a checkpoint: a bitmap on every backup-capable disk, none elsewhere."""
    root = etree.Element("domaincheckpoint")
    etree.SubElement(root, "name").text = name
    listed = etree.SubElement(root, "disks")
    for disk in disks:
        attrs = {"name": disk.target, "checkpoint": "bitmap" if disk.backup_capable else "no"}
        if disk.backup_capable:
            attrs["bitmap"] = name
        etree.SubElement(listed, "disk", attrs)
    return etree.tostring(root, encoding="unicode")


def bitmap_disks(xml: str) -> dict[str, str]:
    """target -> bitmap name, for the disks of a checkpoint XML that have a bitmap."""
    root = _root(xml)
    return {
        d.get("name", ""): d.get("bitmap") or root.findtext("name") or ""
        for d in root.findall("disks/disk")
        if d.get("checkpoint") == "bitmap"
    }


def disk_verdicts(base: CheckpointRecord | None, current: Sequence[Disk]) -> dict[str, Verdict]:
    """Each backup-capable disk of today against checkpoint ``base``: same image, same size?

    Only identity and size are judged here; whether the bitmaps are usable is for the
    caller to find out from libvirt or qemu-img.
    """
    verdicts: dict[str, Verdict] = {}
    recorded: Mapping[str, CheckpointDisk] = {d.target: d for d in base.disks} if base else {}
    for disk in current:
        if not disk.backup_capable or disk.identity is None:
            continue
        saved = recorded.get(disk.target)
        if base is None:
            verdicts[disk.target] = Verdict.broken("no-checkpoint", "no checkpoint recorded")
        elif saved is None:
            verdicts[disk.target] = Verdict.broken(
                "disk-added", f"{disk.target} is not in checkpoint {base.name}"
            )
        else:
            verdicts[disk.target] = _same_disk(base.name, saved, disk)
    for target in recorded.keys() - {d.target for d in current}:
        verdicts[target] = Verdict.broken("disk-removed", f"{target} is no longer attached")
    return verdicts


def _same_disk(checkpoint: str, saved: CheckpointDisk, disk: Disk) -> Verdict:
    assert disk.identity is not None
    try:
        then = DiskIdentity.from_key(saved.identity)
    except InventoryError:
        return Verdict.broken("disk-replaced", f"unreadable identity {saved.identity!r}")
    if not then.same_image(disk.identity):
        return Verdict.broken(
            "disk-replaced",
            f"{disk.target} was {then.key()} at {checkpoint}, is {disk.identity.key()} now",
        )
    if saved.capacity is not None and disk.capacity is not None and saved.capacity != disk.capacity:
        return Verdict.broken(
            "disk-resized",
            f"{disk.target} was {saved.capacity} bytes at {checkpoint}, is {disk.capacity} now",
        )
    return VALID


def base_checkpoint(records: Sequence[CheckpointRecord]) -> CheckpointRecord | None:
    """The checkpoint the next incremental starts from.

    The newest (in chain order) with a successful backup; while none has one, the newest
    live checkpoint (so a chain can be checked before its first backup completes).
    """
    live = order_chain(r for r in records if r.state in LIVE_STATES)
    backed_up = [r for r in live if r.backed_up_at is not None]
    if backed_up:
        return backed_up[-1]
    return live[-1] if live else None


@dataclass(frozen=True, slots=True)
class PrunePlan:
    """Checkpoints to delete from libvirt, and the parents the remaining ones get."""

    delete: tuple[str, ...]
    parents: Mapping[str, str | None]


def prune_plan(records: Sequence[CheckpointRecord], keep: int = 1) -> PrunePlan:
    """Keep the ``keep`` newest checkpoints with a successful backup and all newer ones."""
    live = order_chain(r for r in records if r.state in LIVE_STATES)
    backed_up = [i for i, r in enumerate(live) if r.backed_up_at is not None]
    if len(backed_up) < keep or keep < 1:
        return PrunePlan((), {})
    first_kept = backed_up[-keep]
    doomed = live[:first_kept]
    kept = live[first_kept:]
    gone = {r.name for r in doomed}
    parents = {r.name: None for r in kept if r.parent in gone}
    return PrunePlan(tuple(r.name for r in doomed), parents)
