"""What the copy engine reads, zeroes and skips (pure logic, and once from the extents a
real qemu-nbd reports for a dirty bitmap), and its rate limit."""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.backup.copy import (
    PIECE,
    QCOW2_L2_RANGE,
    RateLimit,
    Run,
    blocks_to_read,
    chunks,
    copy_runs,
    runs_to_copy,
    table_openers_first,
)
from agent.nbd.client import NbdClient
from agent.nbd.extents import extents
from agent.nbd.wire import BASE_ALLOCATION, Extent
from agent.repository.manifest import RangeChecksum, digest_of
from tests.test_nbd import (
    DIRTY_BITMAP,
    DIRTY_RANGES,
    _coalesce,
    _map_extents,
    dirty_image,
    serve_dirty_image,
)

K = 1024
MiB = 1024 * K
DATA, HOLE, HOLE_ZERO, ZERO = 0, 1, 3, 2
DIRTY, CLEAN = 1, 0


def test_full_copies_what_does_not_read_as_zero() -> None:
    allocation = [
        Extent(0, 64 * K, DATA),
        Extent(64 * K, 128 * K, HOLE_ZERO),
        Extent(192 * K, 64 * K, DATA),
        Extent(256 * K, 64 * K, DATA),
    ]
    assert runs_to_copy(allocation, None) == [
        Run(0, 64 * K, False),
        Run(192 * K, 128 * K, False),
    ]  # adjacent data merged


def test_incremental_copies_dirty_data_and_zeroes_dirty_holes() -> None:
    allocation = [
        Extent(0, 128 * K, DATA),
        Extent(128 * K, 128 * K, ZERO),
        Extent(256 * K, 256 * K, DATA),
    ]
    dirty = [
        Extent(0, 64 * K, CLEAN),
        Extent(64 * K, 128 * K, DIRTY),
        Extent(192 * K, 128 * K, CLEAN),
        Extent(320 * K, 64 * K, DIRTY),
    ]
    assert runs_to_copy(allocation, dirty) == [
        Run(64 * K, 64 * K, False),  # dirty data
        Run(128 * K, 64 * K, True),  # dirty, reads as zero: explicit zeroes, no hole
        Run(320 * K, 64 * K, False),
    ]


def test_nothing_dirty_nothing_to_copy() -> None:
    assert runs_to_copy([Extent(0, 1 << 20, DATA)], [Extent(0, 1 << 20, CLEAN)]) == []


def test_incremental_keeps_exactly_the_dirty_ranges_split_by_allocation() -> None:
    allocation = [
        Extent(0, 4096, DATA),
        Extent(4096, 4096, HOLE_ZERO),
        Extent(8192, 4096, ZERO),
        Extent(12288, 4096, HOLE),  # a hole without ZERO does not read as zero: copy it
        Extent(16384, 8192, DATA),
    ]
    dirty = [
        Extent(0, 2048, CLEAN),  # clean: ignored
        Extent(2048, 12288, DIRTY),  # data, then HOLE|ZERO, ZERO and HOLE
        Extent(14336, 2048, CLEAN),
        Extent(16384, 4096, DIRTY),
        Extent(20480, 4096, CLEAN),
        Extent(24576, 4096, DIRTY),  # beyond what allocation describes: not copied
    ]
    assert runs_to_copy(allocation, dirty) == [
        Run(2048, 2048, False),
        Run(4096, 8192, True),  # HOLE|ZERO and ZERO coalesced
        Run(12288, 2048, False),
        Run(16384, 4096, False),
    ]
    assert runs_to_copy(allocation, []) == []
    # Only what allocation describes is copied. (In a backup both lists come from
    # extents() over the whole export, so allocation describes every dirty byte.)
    assert runs_to_copy([], [Extent(0, 10, DIRTY)]) == []


def test_incremental_coalesces_adjacent_dirty_extents_with_the_same_decision() -> None:
    allocation = [Extent(0, 1 << 20, DATA)]
    dirty = [Extent(0, 65536, DIRTY), Extent(65536, 65536, DIRTY)]
    assert runs_to_copy(allocation, dirty) == [Run(0, 131072, False)]


async def test_runs_from_a_real_dirty_bitmap_match_a_sector_by_sector_model() -> None:
    """runs_to_copy of the extents qemu-nbd reports, against a model built from what
    ``qemu-img map`` says and the ranges the image's writes dirtied."""
    with tempfile.TemporaryDirectory(prefix="copy", dir="/tmp") as tmp:
        image, sock = Path(tmp) / "dirty.qcow2", Path(tmp) / "d.sock"
        dirty_image(image)
        allocation = _map_extents(image)
        with serve_dirty_image(image, sock):
            async with await NbdClient.connect(
                socket_path=sock, export="vda", meta_contexts=[BASE_ALLOCATION, DIRTY_BITMAP]
            ) as client:
                dirty = [e async for e in extents(client, DIRTY_BITMAP)]
                alloc = [e async for e in extents(client, BASE_ALLOCATION)]
    runs = runs_to_copy(alloc, dirty)
    assert runs == _sector_model(allocation, DIRTY_RANGES)
    assert Run(30 * MiB, 64 * K, True) in runs  # written zeroes: write zeroes, do not read
    assert sum(run.length for run in runs) == sum(n for _, n in DIRTY_RANGES)


def _sector_model(
    allocation: list[tuple[int, int, int]], dirty: list[tuple[int, int]]
) -> list[Run]:
    """runs_to_copy() done the slow way: one decision per 512-byte sector (zero where
    the allocation says ZERO), then coalesced."""
    zero = {}
    for offset, length, flags in allocation:
        for sector in range(offset // 512, (offset + length) // 512):
            zero[sector] = bool(flags & ZERO)
    sectors = sorted(s for off, n in dirty for s in range(off // 512, (off + n) // 512))
    runs = [(s * 512, 512, int(zero[s])) for s in sectors]
    return [Run(o, n, bool(z)) for o, n, z in _coalesce(runs)]


def test_chunks_respect_the_request_size() -> None:
    cut = list(chunks([Run(0, 10 * K, False), Run(20 * K, 4 * K, True)], 4 * K))
    assert cut == [
        Run(0, 4 * K, False),
        Run(4 * K, 4 * K, False),
        Run(8 * K, 2 * K, False),
        Run(20 * K, 4 * K, True),
    ]


def test_the_first_run_of_each_l2_range_goes_first_the_rest_keep_their_order() -> None:
    region = QCOW2_L2_RANGE
    runs = [
        Run(0, 64 * K, False),
        Run(1 * region - 64 * K, 64 * K, False),  # still the first table's
        Run(1 * region + 128 * K, 64 * K, True),  # opens the second (zeroes allocate too)
        Run(1 * region + 512 * K, 64 * K, False),
        Run(3 * region, 64 * K, False),  # opens the fourth; no run in the third
        Run(3 * region + 64 * K, 64 * K, False),
    ]
    ordered = table_openers_first(runs)
    assert ordered == [runs[0], runs[2], runs[4], runs[1], runs[3], runs[5]]
    assert sorted(ordered, key=lambda r: r.offset) == runs  # the same runs, reordered
    assert table_openers_first([]) == []


async def test_rate_limit_sleeps_for_what_exceeds_the_budget() -> None:
    now = [100.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limit = RateLimit(1000, clock=lambda: now[0], sleep=fake_sleep)
    await limit.take(1000)  # the first second's budget
    assert slept == []
    await limit.take(500)
    assert slept == [pytest.approx(0.5)]
    now[0] += 10  # idle time refills at most one second's worth
    await limit.take(1500)
    assert slept[-1] == pytest.approx(0.5)


def _tiling(draw: st.DrawFn, size: int, flags: list[int]) -> list[Extent]:
    """Extents covering [0, size) in order, each with one of ``flags``."""
    cuts = sorted(draw(st.sets(st.integers(1, size - 1), max_size=30)))
    edges = [0, *cuts, size]
    return [Extent(a, b - a, draw(st.sampled_from(flags))) for a, b in itertools.pairwise(edges)]


@st.composite
def _status(draw: st.DrawFn) -> tuple[list[Extent], list[Extent] | None]:
    size = draw(st.integers(2, 4096))
    allocation = _tiling(draw, size, [DATA, HOLE_ZERO, ZERO])
    dirty = draw(st.one_of(st.none(), st.just(_tiling(draw, size, [DIRTY, CLEAN]))))
    return allocation, dirty


def _byte_model(allocation: list[Extent], dirty: list[Extent] | None) -> list[str]:
    """Per byte: what must happen to it ("copy", "zero" or "skip"), from first principles."""
    size = allocation[-1].offset + allocation[-1].length
    wanted = [dirty is None] * size
    for e in dirty or []:
        for b in range(e.offset, e.offset + e.length):
            wanted[b] = bool(e.flags & DIRTY)
    plan = ["skip"] * size
    for e in allocation:
        for b in range(e.offset, e.offset + e.length):
            if wanted[b]:
                reads_zero = bool(e.flags & ZERO)
                plan[b] = ("skip" if dirty is None else "zero") if reads_zero else "copy"
    return plan


@given(_status())
def test_runs_do_exactly_what_each_byte_needs(
    status: tuple[list[Extent], list[Extent] | None],
) -> None:
    allocation, dirty = status
    runs = runs_to_copy(allocation, dirty)
    size = allocation[-1].offset + allocation[-1].length
    plan = ["skip"] * size
    for run in runs:
        for b in range(run.offset, run.offset + run.length):
            assert plan[b] == "skip", "runs overlap"
            plan[b] = "zero" if run.zero else "copy"
    assert plan == _byte_model(allocation, dirty)
    # Merged: no two adjacent runs of the same kind.
    for a, b in itertools.pairwise(runs):
        assert not (a.zero == b.zero and a.offset + a.length == b.offset)


# --- a disk with no bitmap: whole blocks ---------------------------------------------------


def test_blocks_cover_the_disk_and_only_wholly_zero_blocks_are_zero() -> None:
    block = 64 * K
    allocation = [
        Extent(0, 64 * K, ZERO),  # block 0: zero
        Extent(64 * K, 32 * K, HOLE_ZERO),  # block 1: zero in two extents
        Extent(96 * K, 32 * K, ZERO),
        Extent(128 * K, 96 * K, HOLE_ZERO),  # block 2 zero, block 3 half zero...
        Extent(224 * K, 32 * K, DATA),  # ... half data
        Extent(256 * K, 64 * K, HOLE),  # a hole that does not read as zero: read it
        Extent(320 * K, 40 * K, DATA),  # the last block, short
    ]
    assert blocks_to_read(allocation, 360 * K, block) == [
        Run(0, block, True),
        Run(64 * K, block, True),
        Run(128 * K, block, True),
        Run(192 * K, block, False),
        Run(256 * K, block, False),
        Run(320 * K, 40 * K, False),
    ]
    # Not merged: one run per block, whatever the status.
    assert blocks_to_read([Extent(0, 360 * K, HOLE_ZERO)], 360 * K, block) == [
        Run(o, min(block, 360 * K - o), True) for o in range(0, 360 * K, block)
    ]
    # A block status that says nothing (or stops short) means: read it.
    assert blocks_to_read([], 2 * block, block) == [Run(0, block, False), Run(block, block, False)]
    short = [Extent(0, block + 4 * K, ZERO)]
    assert blocks_to_read(short, 2 * block, block) == [
        Run(0, block, True),
        Run(block, block, False),
    ]
    assert blocks_to_read([Extent(0, 4 * K, DATA)], 0, block) == []


def test_blocks_take_the_extents_in_any_order() -> None:
    allocation = [Extent(8, 8, ZERO), Extent(0, 8, HOLE_ZERO), Extent(16, 8, DATA)]
    assert blocks_to_read(allocation, 24, 16) == [Run(0, 16, True), Run(16, 8, False)]


@st.composite
def _blocked(draw: st.DrawFn) -> tuple[list[Extent], int, int]:
    size = draw(st.integers(2, 2048))
    allocation = draw(st.permutations(_tiling(draw, size, [DATA, HOLE, HOLE_ZERO, ZERO])))
    return allocation, size, draw(st.integers(1, 300))


@given(_blocked())
def test_each_block_is_zero_exactly_when_every_byte_of_it_reads_as_zero(
    case: tuple[list[Extent], int, int],
) -> None:
    allocation, size, block = case
    zero = [False] * size
    for e in allocation:
        for b in range(e.offset, e.offset + e.length):
            zero[b] = bool(e.flags & ZERO)
    runs = blocks_to_read(allocation, size, block)
    assert [(r.offset, r.length) for r in runs] == [
        (o, min(block, size - o)) for o in range(0, size, block)
    ]
    assert [r.zero for r in runs] == [all(zero[r.offset : r.offset + r.length]) for r in runs]


# --- copy_runs with the previous point's digests (an in-memory disk on each side) -------------


@dataclass
class _Info:
    max_block: int


class _Memory:
    """Enough of an NbdClient for copy_runs: a disk in memory, and what was written to it."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.info = _Info(max_block=1 << 20)
        self.writes: list[tuple[int, int, str]] = []

    async def read_into(self, offset: int, view: memoryview) -> None:
        view[:] = self.data[offset : offset + len(view)]

    async def write(self, offset: int, data: memoryview) -> None:
        self.data[offset : offset + len(data)] = data
        self.writes.append((offset, len(data), "data"))

    async def write_zeroes(self, offset: int, length: int, *, punch_hole: bool) -> None:
        assert not punch_hole, "a hole in an overlay shows the older point through"
        self.data[offset : offset + length] = bytes(length)
        self.writes.append((offset, length, "zeroes"))


_FILL = st.sampled_from([0, 1, 2])  # a piece's byte; 0: zeroes


@st.composite
def _two_points(draw: st.DrawFn) -> tuple[int, bytes, bytes]:
    """A block size (whole pieces), and the disk at the previous point and now, piece by
    piece one fill byte; the disk's end anywhere in its last block."""
    block = PIECE * draw(st.integers(1, 4))
    count = draw(st.integers(1, 4))
    size = block * count - draw(
        st.sampled_from([0, 512, PIECE, PIECE + 4096]).filter(lambda n: n < block)
    )
    old, new = bytearray(), bytearray()
    for offset in range(0, size, PIECE):
        length = min(PIECE, size - offset)
        before = draw(_FILL)
        after = before if draw(st.booleans()) else draw(_FILL)
        old += bytes([before]) * length
        new += bytes([after]) * length
    return block, bytes(old), bytes(new)


def _changed_runs(old: bytes, new: bytes, offset: int) -> list[tuple[int, int, str]]:
    """The pieces of the block at ``offset`` that differ, adjacent ones of one kind
    (data, or zeroes) as one write."""
    runs: list[tuple[int, int, str]] = []
    for start in range(0, len(new), PIECE):
        piece, was = new[start : start + PIECE], old[start : start + PIECE]
        if piece == was:
            continue
        kind = "data" if any(piece) else "zeroes"
        if runs and runs[-1][0] + runs[-1][1] == offset + start and runs[-1][2] == kind:
            runs[-1] = (runs[-1][0], runs[-1][1] + len(piece), kind)
        else:
            runs.append((offset + start, len(piece), kind))
    return runs


@settings(max_examples=60, deadline=None)
@given(_two_points(), st.booleans())
def test_only_the_pieces_that_changed_are_written_and_the_layers_read_as_now(
    case: tuple[int, bytes, bytes], statused: bool
) -> None:
    block, old, new = case
    size = len(new)
    starts = range(0, size, block)
    # The previous point's digests: its blocks that are not zero.
    previous = {o: digest_of(old[o : o + block], o) for o in starts if any(old[o : o + block])}
    # The block status of now: zero where it reads so (if the export says; a block
    # device says everything is data).
    allocation = [
        Extent(o, min(block, size - o), ZERO if statused and not any(new[o : o + block]) else DATA)
        for o in starts
    ]
    runs = blocks_to_read(allocation, size, block)
    source, layer = _Memory(new), _Memory(old)  # the layer reads through to the old point
    in_part: list[RangeChecksum] = []

    async def copy() -> list[RangeChecksum]:
        return await copy_runs(
            [source],
            [layer],
            runs,
            request_size=block,
            in_flight=3,
            punch_holes=False,
            previous=previous,
            blocks=in_part,
        )

    checksums = asyncio.run(copy())
    assert layer.data == new
    expected = [w for o in starts for w in _changed_runs(old[o : o + block], new[o : o + block], o)]
    assert sorted(layer.writes) == expected
    assert [(c.offset, c.length, c.digest) for c in checksums] == [
        (o, n, digest_of(new[o : o + n], o)) for o, n, _ in expected
    ]
    # Each block written in part: what all of it holds now.
    whole = {(o, min(block, size - o)) for o in starts}
    parts = sorted({o - o % block for o, n, _ in expected if (o - o % block, n) not in whole})
    assert [(c.offset, c.length, c.digest) for c in in_part] == [
        (o, min(block, size - o), digest_of(new[o : o + block], o)) for o in parts
    ]
