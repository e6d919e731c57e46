"""What the copy engine reads, zeroes and skips (pure logic, and once from the extents a
real qemu-nbd reports for a dirty bitmap), and its rate limit."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.backup.copy import (
    QCOW2_L2_RANGE,
    RateLimit,
    Run,
    chunks,
    runs_to_copy,
    table_openers_first,
)
from agent.nbd.client import NbdClient
from agent.nbd.extents import extents
from agent.nbd.wire import BASE_ALLOCATION, Extent
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
