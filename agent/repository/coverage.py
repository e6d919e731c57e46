"""The checksums of a merged image: every range its layers recorded, newest first.

Retention merges a chain of images (newest first: the kept backup's image, then the
dropped ones below it, down to a standalone one) into one standalone image. Its
manifest must still have a checksum for every byte any of them recorded, so that
``verify`` rereads all of it (:func:`combine`):

- a range of the newest image is kept as it is;
- a range of an older image that no newer range touches is kept as it is (the merged
  image holds those bytes unchanged);
- an older range that newer ones overwrite in part is hashed again, whole, from the
  merged image (``rehash``; the newer ranges inside it are then left out, it covers
  them): the cost of a merge follows what changed, not the disk, and the number of
  checksums does not grow with every merge (ranges are never cut into pieces).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from agent.repository.manifest import RangeChecksum


def combine(
    layers: Sequence[Sequence[RangeChecksum]],
) -> tuple[list[RangeChecksum], list[tuple[int, int, str]]]:
    """``layers``' checksums (newest first; within one layer no two overlap) as those the
    merged image keeps, and the ``(offset, length, algorithm)`` ranges to hash again."""
    kept: list[RangeChecksum] = []
    rehash: list[tuple[int, int, str]] = []
    covered = _Intervals()
    for layer in layers:
        for checksum in layer:
            start, end = checksum.offset, checksum.offset + checksum.length
            free = covered.uncovered(start, end)
            if free == [(start, end)]:
                kept.append(checksum)
            elif free:
                rehash.append((checksum.offset, checksum.length, checksum.algorithm))
        for checksum in layer:  # (after the layer: its own ranges do not overlap)
            covered.add(checksum.offset, checksum.offset + checksum.length)
    again = _Intervals()
    for offset, length, _ in rehash:
        again.add(offset, offset + length)
    # A kept range inside those hashed again says nothing they do not.
    kept = [c for c in kept if again.uncovered(c.offset, c.offset + c.length)]
    kept.sort(key=lambda c: c.offset)
    rehash.sort()
    return kept, rehash


def overwritten_in_part(
    newer: Sequence[Sequence[RangeChecksum]], older: Sequence[RangeChecksum]
) -> list[RangeChecksum]:
    """The ranges of ``older`` that ranges of ``newer`` overwrite in part: what a merge
    hashes again from the older image's bytes (:func:`combine`)."""
    covered = _Intervals()
    for layer in newer:
        for checksum in layer:
            covered.add(checksum.offset, checksum.offset + checksum.length)
    found = []
    for checksum in older:
        start, end = checksum.offset, checksum.offset + checksum.length
        if covered.uncovered(start, end) not in ([], [(start, end)]):
            found.append(checksum)
    return found


class _Intervals:
    """Disjoint, sorted half-open intervals."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def uncovered(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` no interval covers, in order."""
        free: list[tuple[int, int]] = []
        index = max(0, bisect.bisect_right(self._starts, start) - 1)
        position = start
        while index < len(self._starts) and self._starts[index] < end:
            lo, hi = self._starts[index], self._ends[index]
            if hi > position:
                if lo > position:
                    free.append((position, lo))
                position = max(position, hi)
            index += 1
        if position < end:
            free.append((position, end))
        return free

    def add(self, start: int, end: int) -> None:
        """Cover ``[start, end)`` too (merged with the intervals it touches)."""
        left = bisect.bisect_left(self._ends, start)
        right = bisect.bisect_right(self._starts, end)
        if left < right:
            start = min(start, self._starts[left])
            end = max(end, self._ends[right - 1])
        self._starts[left:right] = [start]
        self._ends[left:right] = [end]
