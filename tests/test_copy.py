"""What the copy engine reads, zeroes and skips (pure logic), and its rate limit."""

from __future__ import annotations

import pytest

from agent.copy import RateLimit, Run, chunks, runs_to_copy
from agent.nbd import Extent

K = 1024
DATA, HOLE_ZERO, ZERO = 0, 3, 2
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


def test_chunks_respect_the_request_size() -> None:
    cut = list(chunks([Run(0, 10 * K, False), Run(20 * K, 4 * K, True)], 4 * K))
    assert cut == [
        Run(0, 4 * K, False),
        Run(4 * K, 4 * K, False),
        Run(8 * K, 2 * K, False),
        Run(20 * K, 4 * K, True),
    ]


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
