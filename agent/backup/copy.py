"""Where bytes are copied: from QEMU's backup export into the repository image.

:func:`runs_to_copy` turns the export's block status into the ranges to copy:

- full backup: every range ``base:allocation`` does not report as reading zero (the new
  image reads zero everywhere else, so zero ranges are skipped);
- incremental: the ranges the ``qemu:dirty-bitmap`` context reports dirty; where they
  read as zero the target gets explicit zeroes (without punching a hole, which on an
  overlay would let the older backup's data show through).

:func:`blocks_to_read` does the same for a disk with no bitmap (read in full, stored as
what changed, :mod:`agent.repository.blocks`): the disk cut into whole blocks, each
either zero by its block status (not read) or read. :func:`copy_runs` given the
``previous`` point's digests then skips every block whose digest is the same; of a
block that changed it reads the previous point's data (through the layer being written,
which is served with its backing) and writes only the 64 KiB pieces that differ, zeroes
as zeroes (a block device reports everything allocated: its zeroes are found by their
digest).

:func:`copy_runs` copies them with a fixed pool of workers (``in_flight``), each owning
one reusable buffer: read into the buffer, hash it (XXH3-128, a tenth of a millisecond
per 2 MiB), write it out. Source requests are spread over the
connections the export allows. A :class:`RateLimit` caps the bytes per second.

Reads may be smaller than writes (``read_size``), several at once into one buffer.
QEMU's NBD server allocates a buffer per request and frees it when it has replied; a
buffer above glibc's mmap threshold is a fresh mmap each time, whose pages the kernel
faults in and zeroes. With 2 MiB reads that was half a million page faults and 0.8
CPU-seconds of QEMU's per 2 GiB (``perf stat -e page-faults`` on the domain's QEMU);
with 256 KiB reads, a few thousand. The writes stay large: the local qemu-nbd the agent
starts is told to keep such buffers (:mod:`agent.qemu.qemu_nbd`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.nbd.client import NbdClient
from agent.nbd.wire import STATE_DIRTY, STATE_ZERO, Extent
from agent.repository.blocks import zero_digest
from agent.repository.manifest import RangeChecksum, digest_of
from agent.repository.windows import WINDOW, window_sum

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Run:
    """A range to copy; ``zero`` means write zeroes instead of reading."""

    offset: int
    length: int
    zero: bool


def runs_to_copy(allocation: Sequence[Extent], dirty: Sequence[Extent] | None) -> list[Run]:
    """The runs to copy (see the module docstring); adjacent runs of one kind are merged.

    One pass over both lists (each sorted, non-overlapping): a disk may report tens of
    thousands of extents, and clipping every wanted range against every extent was
    quadratic (a quarter of a second for 1,200 extents).
    """
    alloc = sorted(allocation, key=lambda e: e.offset)
    runs: list[Run] = []
    if dirty is None:
        for e in alloc:
            if not e.flags & STATE_ZERO:
                _append(runs, Run(e.offset, e.length, False))
        return runs
    wanted = sorted((e.offset, e.offset + e.length) for e in dirty if e.flags & STATE_DIRTY)
    first = 0
    for start, end in wanted:
        while first < len(alloc) and alloc[first].offset + alloc[first].length <= start:
            first += 1
        index = first
        while index < len(alloc) and alloc[index].offset < end:
            e = alloc[index]
            lo, hi = max(e.offset, start), min(e.offset + e.length, end)
            if lo < hi:
                _append(runs, Run(lo, hi - lo, bool(e.flags & STATE_ZERO)))
            index += 1
    return runs


def aligned(runs: Sequence[Run], size: int, window: int = WINDOW) -> list[Run]:
    """``runs`` (sorted, disjoint) widened to whole windows (the last cut at the disk's
    end, ``size``): a window any run touches is read whole, unless zero runs cover all
    of it (then it is written as zeroes). So every checksum's range starts and ends on a
    window, and a point's digest is the sum of its ranges' (:mod:`agent.repository.windows`).
    What a window holds beyond its runs is read from the export as it is at this point:
    on an increment, the bytes that did not change, written again unchanged."""
    out: list[Run] = []
    current: list[int] | None = None  # [window index, bytes of zero runs in it, any data]

    def flush() -> None:
        assert current is not None
        start = current[0] * window
        length = min(size, start + window) - start
        _append(out, Run(start, length, not current[2] and current[1] == length))

    for run in runs:
        start, end = run.offset, run.offset + run.length
        first, last = start // window, (end - 1) // window
        if current is not None and current[0] != first:
            flush()
            current = None
        if current is None:
            current = [first, 0, 0]
        in_first = min(end, (first + 1) * window) - start
        current[1] += in_first if run.zero else 0
        current[2] |= not run.zero
        if first == last:
            continue
        flush()
        if last > first + 1:  # whole windows, all of them this run's
            _append(out, Run((first + 1) * window, (last - first - 1) * window, run.zero))
        in_last = end - last * window
        current = [last, in_last if run.zero else 0, int(not run.zero)]
    if current is not None:
        flush()
    return out


@dataclass
class PointSums:
    """What a copy changes in the point's digest: the terms of the windows it wrote,
    as they were before (``old``: read from the layer being written, through its
    backing; 0 on a standalone image) and as written (``new``)."""

    old: int = 0
    new: int = 0
    whole: int = 0  # a disk read in full: the terms of all its blocks, changed or not


def blocks_to_read(allocation: Sequence[Extent], size: int, block: int) -> list[Run]:
    """The disk ``[0, size)`` in whole blocks (the last may be shorter), each ``zero`` when
    the export's block status says all of it reads as zero, else to be read."""
    zero_ends: list[tuple[int, int]] = []  # merged runs of zero extents, in order
    for e in sorted(allocation, key=lambda e: e.offset):
        if not e.flags & STATE_ZERO:
            continue
        if zero_ends and zero_ends[-1][1] == e.offset:
            zero_ends[-1] = (zero_ends[-1][0], e.offset + e.length)
        else:
            zero_ends.append((e.offset, e.offset + e.length))
    runs: list[Run] = []
    index = 0
    for start in range(0, size, block):
        end = min(start + block, size)
        while index < len(zero_ends) and zero_ends[index][1] <= start:
            index += 1
        zero = (
            index < len(zero_ends) and zero_ends[index][0] <= start and zero_ends[index][1] >= end
        )
        runs.append(Run(start, end - start, zero))
    return runs


def _append(runs: list[Run], run: Run) -> None:
    last = runs[-1] if runs else None
    if last is not None and last.zero == run.zero and last.offset + last.length == run.offset:
        runs[-1] = Run(last.offset, last.length + run.length, last.zero)
    else:
        runs.append(run)


# The virtual range one L2 table maps in a qcow2 with 64 KiB clusters (qemu-img's
# default, which the repository's images use): 8192 entries of 64 KiB.
QCOW2_L2_RANGE = 512 << 20


def table_openers_first(runs: Sequence[Run], region: int = QCOW2_L2_RANGE) -> list[Run]:
    """``runs`` with the first run of each ``region`` moved to the front.

    For a qcow2 written through the page cache (an increment's overlay): the write that
    needs a new L2 table makes qcow2 write its L1 entry synchronously, and that
    fdatasync also writes every page of the file dirtied so far, while every other
    allocating write waits. In offset order those syncs fall in the middle of the copy
    with megabytes dirty (1 % of a 2 GiB disk: 60-90 ms); with the tables' first writes
    first, they find nothing dirty yet (45-50 ms). The same writes, in another order.
    """
    seen: set[int] = set()
    first: list[Run] = []
    rest: list[Run] = []
    for run in runs:
        index = run.offset // region
        (rest if index in seen else first).append(run)
        seen.add(index)
    return first + rest


def chunks(runs: Sequence[Run], size: int) -> Iterator[Run]:
    """Runs cut into requests of at most ``size`` bytes (zero runs too: servers cap them)."""
    for run in runs:
        for offset in range(run.offset, run.offset + run.length, size):
            yield Run(offset, min(size, run.offset + run.length - offset), run.zero)


class RateLimit:
    """A token bucket: at most ``rate`` bytes per second, bursts of one second."""

    def __init__(
        self,
        rate: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._rate = rate
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(rate)
        self._last = clock()
        self._lock = asyncio.Lock()

    async def take(self, amount: int) -> None:
        async with self._lock:
            now = self._clock()
            self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate)
            self._last = now
            self._tokens -= amount
            if self._tokens < 0:
                await self._sleep(-self._tokens / self._rate)


@dataclass
class CopyProgress:
    total: int
    done: int = 0


async def copy_runs(
    sources: Sequence[NbdClient],
    targets: NbdClient | Sequence[NbdClient],
    runs: Sequence[Run],
    *,
    request_size: int,
    in_flight: int,
    punch_holes: bool,
    read_size: int | None = None,
    limit: RateLimit | None = None,
    progress: Callable[[int], None] | None = None,
    previous: Mapping[int, str] | None = None,
    blocks: list[RangeChecksum] | None = None,
    sums: PointSums | None = None,
    read_old: bool = False,
) -> list[RangeChecksum]:
    """Copy ``runs`` from ``sources`` to ``targets`` (each: one export, one or more connections).

    Returns the checksum of every range written, in offset order. With ``previous`` (the
    digest of each block the previous point holds, by offset; a block not in it is
    zero), ``runs`` are whole blocks (:func:`blocks_to_read`), and only the pieces whose
    content differs are written; the digest of each block written only in part is
    appended to ``blocks`` (a block written whole has its checksum). ``sums`` gets the
    old and new terms of what is written (runs must be whole windows, :func:`aligned`);
    with ``read_old`` the old bytes are read from the target first (an increment, whose
    target reads its parent's data where it has none of its own). A failure of any
    worker cancels the others and is raised; nothing is retried here.
    """
    sinks = [targets] if isinstance(targets, NbdClient) else list(targets)
    size = min(request_size, *(c.info.max_block for c in [*sources, *sinks]))
    if size >= WINDOW:  # requests of whole windows: a checksum never cuts one in two
        size -= size % WINDOW
    if previous is not None and any(r.length > size for r in runs):
        # A block cut in two would be compared, and recorded, as two other blocks.
        raise ValueError(f"blocks of up to {max(r.length for r in runs)} bytes, requests {size}")
    # Buffers as large as the largest data chunk: an incremental's scattered 64 KiB
    # runs need no 2 MiB buffers (whose zeroing alone costs page faults).
    # (With read_old a zero run's old bytes are read too.)
    longest = max(
        (r.length for r in runs if not r.zero or previous is not None or read_old), default=0
    )
    workers = (_Workers if previous is None else _BlockWorkers)(
        sources,
        sinks,
        chunks(runs, size),
        piece=min(size, read_size or size, *(c.info.max_block for c in sources)),
        buffer_size=min(size, longest),
        punch_holes=punch_holes,
        limit=limit,
        progress=progress,
        previous=previous,
        read_old=read_old,
    )
    await together([workers.work(index) for index in range(max(1, in_flight))])
    if sums is not None:
        sums.old += workers.old_sum
        sums.new += workers.new_sum
        sums.whole += workers.whole_sum
    workers.checksums.sort(key=lambda c: c.offset)
    if blocks is not None:
        blocks += sorted(workers.blocks, key=lambda c: c.offset)
    return workers.checksums


class _Workers:
    """The workers of one :func:`copy_runs`, each with a buffer of its own; they share
    the chunks left to copy and the checksums of those written."""

    def __init__(
        self,
        sources: Sequence[NbdClient],
        sinks: Sequence[NbdClient],
        pending: Iterator[Run],
        *,
        piece: int,
        buffer_size: int,
        punch_holes: bool,
        limit: RateLimit | None,
        progress: Callable[[int], None] | None,
        previous: Mapping[int, str] | None = None,
        read_old: bool = False,
    ) -> None:
        self._previous = previous
        self._read_old = read_old
        self.old_sum = 0
        self.new_sum = 0
        self.whole_sum = 0
        self._sources = sources
        self._sinks = sinks
        self._pending = pending
        self._piece = piece
        self._buffer_size = buffer_size
        self._punch_holes = punch_holes
        self._limit = limit
        self._progress = progress
        self.checksums: list[RangeChecksum] = []
        self.blocks: list[RangeChecksum] = []
        self._turn = 0  # the source connection the next piece of a split read goes to

    async def work(self, index: int) -> None:
        source = self._sources[index % len(self._sources)]
        target = self._sinks[index % len(self._sinks)]
        buffer = memoryview(bytearray(self._buffer_size))
        old = memoryview(bytearray(self._buffer_size if self._read_old else 0))
        for run in self._pending:  # a shared iterator: each chunk goes to exactly one worker
            if self._limit is not None:
                await self._limit.take(run.length)
            if self._read_old:  # what the point's digest loses: the parent's bytes here
                was = old[: run.length]
                await target.read_into(run.offset, was)
                self.old_sum += window_sum(was, run.offset)
            if run.zero:
                await target.write_zeroes(run.offset, run.length, punch_hole=self._punch_holes)
                digest = zero_digest(run.length)
            else:
                view = buffer[: run.length]
                await self._read(view, run.offset, source)
                # XXH3 hashes a 2 MiB chunk in about a tenth of a millisecond: on the
                # copy's own loop, cheaper than any hop to a worker thread.
                digest = digest_of(view, run.offset)
                await target.write(run.offset, view)
            self.new_sum += int(digest, 16)
            self.checksums.append(RangeChecksum(run.offset, run.length, digest))
            if self._progress is not None:
                self._progress(run.length)

    async def _read(self, view: memoryview, offset: int, first: NbdClient) -> None:
        """Into ``view``: from ``first`` in one request, or in pieces spread over the
        source connections."""
        if len(view) <= self._piece:
            await first.read_into(offset, view)
            return
        reads = []
        for start in range(0, len(view), self._piece):
            self._turn += 1
            source = self._sources[self._turn % len(self._sources)]
            reads.append(source.read_into(offset + start, view[start : start + self._piece]))
        await together(reads)


PIECE = 64 << 10  # what a changed block is compared and written in: a qcow2 cluster


class _BlockWorkers(_Workers):
    """The workers of a disk read whole and stored as what changed (``previous``: the
    digest of each block the previous point holds; a block not in it is zero)."""

    async def work(self, index: int) -> None:
        source = self._sources[index % len(self._sources)]
        target = self._sinks[index % len(self._sinks)]
        new = memoryview(bytearray(self._buffer_size))
        old = memoryview(bytearray(self._buffer_size))
        assert self._previous is not None
        for run in self._pending:  # whole blocks; a shared iterator, as above
            if self._limit is not None:
                await self._limit.take(run.length)
            view = new[: run.length]
            if run.zero:
                digest = zero_digest(run.length)
            else:
                await self._read(view, run.offset, source)
                digest = digest_of(view, run.offset)
            self.whole_sum += int(digest, 16)
            before = self._previous.get(run.offset)
            if digest != (before or zero_digest(run.length)):
                if run.zero:
                    view[:] = _zeroes(run.length)
                was = None
                if before is not None:  # the previous point's data: the layer reads through
                    was = old[: run.length]
                    await target.read_into(run.offset, was)
                await self._write_changes(target, run, view, was, digest)
            if self._progress is not None:
                self._progress(run.length)

    async def _write_changes(
        self,
        target: NbdClient,
        run: Run,
        view: memoryview,
        was: memoryview | None,
        digest: str,
    ) -> None:
        """Write the pieces of the block that differ from ``was`` (None: zeroes), in runs."""
        changed: list[tuple[int, int, bool]] = []  # (start, end, zero) within the block
        for start in range(0, run.length, PIECE):
            end = min(start + PIECE, run.length)
            at = run.offset + start
            now = digest_of(view[start:end], at)
            then = zero_digest(end - start) if was is None else digest_of(was[start:end], at)
            if now == then:
                continue
            self.old_sum += int(then, 16)
            self.new_sum += int(now, 16)
            zero = now == zero_digest(end - start)
            if changed and changed[-1][1] == start and changed[-1][2] == zero:
                changed[-1] = (changed[-1][0], end, zero)
            else:
                changed.append((start, end, zero))
        for start, end, zero in changed:
            offset, length = run.offset + start, end - start
            if zero:  # (not a hole: on a layer, a hole would show the older data)
                await target.write_zeroes(offset, length, punch_hole=False)
                self.checksums.append(RangeChecksum(offset, length, zero_digest(length)))
            else:
                await target.write(offset, view[start:end])
                digest_written = digest_of(view[start:end], offset)
                self.checksums.append(RangeChecksum(offset, length, digest_written))
        if [(start, end) for start, end, _ in changed] != [(0, run.length)]:
            # Written in part (or, were the layer below not what its manifest says, not
            # at all): what the block holds now is said beside the pieces' checksums.
            self.blocks.append(RangeChecksum(run.offset, run.length, digest))


_ZEROES: dict[int, bytes] = {}


def _zeroes(length: int) -> bytes:
    found = _ZEROES.get(length)
    if found is None:
        found = _ZEROES[length] = bytes(length)
    return found


async def together(calls: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Await ``calls`` together, each in a task of its own, and return their results;
    the first failure cancels the rest and is raised (:func:`first_cause`)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]
    except BaseExceptionGroup as failed:
        # One broken connection fails every worker; the first error is the story.
        raise first_cause(failed) from failed
    return [task.result() for task in tasks]


def first_cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error in a task group's failure that is not a cancellation."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_cause(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]
