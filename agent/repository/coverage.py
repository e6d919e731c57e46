"""The checksums of a merged image: every range its layers recorded, newest first.

Retention merges a chain of images (newest first: the kept backup's image, then the
dropped ones below it, down to a standalone one) into one standalone image. Its
manifest must still have a checksum for every byte any of them recorded, so that
``verify`` rereads all of it (:func:`combine`):

- a range of the newest image is kept as it is;
- a range of an older image that no newer range touches is kept as it is (the merged
  image holds those bytes unchanged);
- an older range that newer ones overwrite in part (a :class:`Partial`) keeps its extent
  and gets a new checksum. A window sum (:mod:`agent.repository.windows`) is updated:
  minus the terms of the 64 KiB windows that changed, read from the older image before
  the merge, plus their terms in the merged image; so a merge reads what changed (and
  at most a window more at each end of a change), never the rest of the older range.
  A range with an older algorithm (plain XXH3-128, SHA-256) is hashed again, whole, from
  the merged image, and from then on has a window sum. The newer ranges inside it are
  left out (it covers them): the number of checksums does not grow with every merge.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from agent.repository.manifest import RangeChecksum
from agent.repository.windows import ALGORITHM, WINDOW


@dataclass(frozen=True, slots=True)
class Partial:
    """An older range that newer ones overwrite in part: ``layer`` (its index in the
    layers, newest first) wrote it; ``windows`` are the runs of its 64 KiB windows (cut
    to the range) that newer ranges touch, in order, adjacent ones joined."""

    checksum: RangeChecksum
    layer: int
    windows: tuple[tuple[int, int], ...]

    @property
    def updatable(self) -> bool:
        """A window sum, updated from the windows that changed; else hashed whole."""
        return self.checksum.algorithm == ALGORITHM

    def untouched(self) -> list[tuple[int, int]]:
        """The runs of the range outside its windows that changed."""
        c = self.checksum
        return _complement(c.offset, c.offset + c.length, self.windows)


def combine(
    layers: Sequence[Sequence[RangeChecksum]], *, all_newest: bool = False
) -> tuple[list[RangeChecksum], list[Partial]]:
    """``layers``' checksums (newest first) as those the merged image keeps as they are,
    and the older ranges overwritten in part. A range inside another one that gets a new
    checksum is left out (the outer one covers its bytes), so nested ranges never pile
    up; with ``all_newest`` every range no newer one touches, and every range overwritten
    in part, is returned all the same (what a merge proves it wrote). A merged image may
    hold ranges that overlap (those kept beside an updated one): each is checked against
    the newer layers on its own."""
    kept: list[RangeChecksum] = []
    partial: list[Partial] = []
    covered = _Intervals()
    for index, layer in enumerate(layers):
        for checksum in layer:
            start, end = checksum.offset, checksum.offset + checksum.length
            free = covered.uncovered(start, end)
            if free == [(start, end)]:
                kept.append(checksum)
            elif free:
                windows = _windows(start, end, _complement(start, end, free))
                partial.append(Partial(checksum, index, windows))
        for checksum in layer:  # (after the layer: its own ranges do not overlap)
            covered.add(checksum.offset, checksum.offset + checksum.length)
    # Widest first: a range inside one already taken says nothing it does not.
    partial.sort(key=lambda p: (p.checksum.offset, -p.checksum.length, p.layer))
    # In offset order, a range lies inside one taken before it iff one of them reaches
    # as far as it does.
    again = _Intervals()
    outer: list[Partial] = []
    reach = -1
    for p in partial:
        start, end = p.checksum.offset, p.checksum.offset + p.checksum.length
        if end > reach or all_newest:
            outer.append(p)
            again.add(start, end)
            reach = end
    if not all_newest:
        kept = [c for c in kept if again.uncovered(c.offset, c.offset + c.length)]
    kept.sort(key=lambda c: c.offset)
    return kept, outer


def _complement(start: int, end: int, free: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``[start, end)`` outside ``free`` (sorted, disjoint, inside it)."""
    parts, position = [], start
    for lo, hi in free:
        if lo > position:
            parts.append((position, lo))
        position = hi
    if position < end:
        parts.append((position, end))
    return parts


def _windows(
    start: int, end: int, touched: Sequence[tuple[int, int]]
) -> tuple[tuple[int, int], ...]:
    """The windows of ``[start, end)`` that ``touched`` reaches, cut to it, joined."""
    runs: list[tuple[int, int]] = []
    for first, last in touched:
        lo, hi = max(start, first // WINDOW * WINDOW), min(end, -(-last // WINDOW) * WINDOW)
        if runs and lo <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], hi))
        else:
            runs.append((lo, hi))
    return tuple(runs)


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
