"""What the ledger records: checkpoints, the disks they cover, and each disk's chain.

Plain frozen data, shared by the ledger, the chain's rules and everything that reads the
ledger; :mod:`agent.chain.validation` says what makes a record sound.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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
