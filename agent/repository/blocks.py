"""A disk stored as what changed: the checksums of its blocks, along a backing chain.

A disk with no persistent bitmap (a raw image, a block device, a network disk) is read
in full at every backup. It is still stored as what changed: the copy hashes each
:data:`BLOCK` of the disk as it streams, compares it with the checksum the previous
point has for that block, and writes only the blocks that differ, into an image on top
of the previous point's (:mod:`agent.backup.copy`).

What "the checksum the previous point has" is comes from the manifests (their
``block_size``, :class:`~agent.repository.manifest.DiskManifest`): each image of such a
disk records the checksum of each block it wrote whole (a block that became zero is
written as zeroes, with the zero checksum) and, for a block it wrote only in part (the
64 KiB pieces that changed), the checksum of the whole block in ``blocks``; the chain's
images taken newest first, the first checksum of each block, give every block of the
disk at that point that is not all zeroes (:func:`describe`). A standalone image (the
first copy, or one retention merged) records every block that is not zero. A chain
that does not describe its blocks that way (an image without ``block_size``, another
block size or disk size, a missing backup) gives ``None``: the next copy is then
standalone again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

from agent.repository.manifest import (
    BACKING_RE,
    CHECKSUM,
    DiskManifest,
    Manifest,
    RangeChecksum,
)
from agent.repository.windows import ZERO

BLOCK: Final = 2 << 20  # bytes per compared block: one checksum per 2 MiB, as a full's


def zero_digest(length: int) -> str:
    """The checksum of ``length`` zero bytes: 0, whatever the length (a window sum)."""
    return ZERO


def disk_chain(
    lookup: Callable[[str], Manifest | None], manifest: Manifest, target: str
) -> list[DiskManifest] | None:
    """Disk ``target`` of ``manifest`` and the images below it (newest first), or None
    if a backup the chain passes through is not found (``lookup`` by id)."""
    chain: list[DiskManifest] = []
    current: Manifest | None = manifest
    while current is not None:
        disk = current.disk(target)
        if disk is None:
            return None
        chain.append(disk)
        below = BACKING_RE.fullmatch(disk.backing) if disk.backing is not None else None
        if below is None:
            return chain
        current = lookup(below["id"])
    return None


def describe(chain: list[DiskManifest]) -> dict[int, RangeChecksum] | None:
    """Every block that is not all zeroes of the disk at the newest image of ``chain``
    (newest first), by offset; None if the chain does not describe its blocks (see the
    module docstring)."""
    if not chain:
        return None
    size = chain[0].virtual_size
    if any(d.block_size != BLOCK or d.virtual_size != size for d in chain):
        return None
    blocks: dict[int, RangeChecksum] = {}
    for disk in chain:
        whole = [
            c
            for c in disk.checksums
            if c.offset % BLOCK == 0 and c.length == min(BLOCK, size - c.offset)
        ]
        for checksum in [*disk.blocks, *whole]:  # (a block in both: blocks wins, first)
            if checksum.algorithm != CHECKSUM:
                return None
            blocks.setdefault(checksum.offset, checksum)
    return {o: c for o, c in blocks.items() if c.digest != zero_digest(c.length)}


def previous_digests(blocks: Mapping[int, RangeChecksum]) -> dict[int, str]:
    """What the copy compares with: block offset to digest (a block not in it is zero)."""
    return {offset: c.digest for offset, c in blocks.items()}
