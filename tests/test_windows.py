"""Window sums (the checksum of new backups and a point's digest), pure logic: one
definition whatever the chunking, zeroes adding nothing, an update from the windows that
changed equal to hashing the new bytes, runs widened to whole windows, and a copy's
point digest equal to the digest of the disk it leaves behind."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.backup.copy import PIECE, PointSums, Run, aligned, blocks_to_read, copy_runs
from agent.nbd.wire import Extent
from agent.repository.windows import (
    WINDOW,
    ZERO,
    WindowDigest,
    updated,
    window_digest,
    window_sum,
)

REPO = Path(__file__).resolve().parents[1]
DATA, ZERO_FLAG = 0, 2  # base:allocation flags: data, and reads as zero


def _disk(rng: random.Random, size: int) -> bytearray:
    """Random windows, some all zero, some zero in part."""
    disk = bytearray(size)
    for start in range(0, size, WINDOW // 4):
        if rng.random() < 0.6:
            disk[start : start + WINDOW // 4] = rng.randbytes(min(WINDOW // 4, size - start))
    return disk


@given(st.integers(0, 2**32), st.integers(1, 5 * WINDOW), st.integers(0, 3 * WINDOW))
def test_one_digest_however_the_bytes_arrive(seed: int, size: int, offset: int) -> None:
    rng = random.Random(seed)
    data = _disk(rng, size)
    want = window_digest(data, offset)
    streamed = WindowDigest(offset)
    position = 0
    while position < size:
        n = rng.choice([1, 511, 4096, WINDOW - 1, WINDOW, 3 * WINDOW])
        chunk = data[position : position + n]
        if not any(chunk) and rng.random() < 0.5:
            streamed.zeros(len(chunk))  # holes, unread
        else:
            streamed.update(chunk)
        position += n
    assert streamed.hexdigest() == want
    # Cut anywhere on a window: the two sums add up to the whole's.
    cut = min(size, (offset // WINDOW + 1) * WINDOW - offset)
    halves = window_sum(data[:cut], offset) + window_sum(data[cut:], offset + cut)
    assert f"{halves % (1 << 128):032x}" == want


def test_zeroes_add_nothing_and_the_place_of_bytes_counts() -> None:
    assert window_digest(bytes(10 * WINDOW + 7), 12345) == ZERO
    block = os.urandom(WINDOW)
    assert window_digest(block, 0) != window_digest(block, WINDOW)  # moved: not the same
    swapped = block[WINDOW // 2 :] + block[: WINDOW // 2]
    assert window_digest(block + swapped, 0) != window_digest(swapped + block, 0)
    one = bytearray(WINDOW)
    one[100] = 1
    assert window_digest(one, 0) != ZERO


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32))
def test_an_update_from_the_changed_windows_equals_hashing_the_new_bytes(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.randrange(1, 12) * WINDOW - rng.choice([0, 512, 4096])
    old = _disk(rng, size)
    new = bytearray(old)
    changed = sorted(
        rng.sample(range(-(-size // WINDOW)), rng.randrange(1, -(-size // WINDOW) + 1))
    )
    for index in changed:
        start = index * WINDOW
        end = min(size, start + WINDOW)
        new[start:end] = rng.choice([bytes(end - start), rng.randbytes(end - start)])
    before = sum(window_sum(old[i * WINDOW : (i + 1) * WINDOW], i * WINDOW) for i in changed)
    after = sum(window_sum(new[i * WINDOW : (i + 1) * WINDOW], i * WINDOW) for i in changed)
    assert updated(window_digest(old, 0), before, after) == window_digest(new, 0)


def test_the_documented_command_recomputes_the_digest(tmp_path: Path) -> None:
    data = _disk(random.Random(7), 9 * WINDOW + 4096)
    image = tmp_path / "disk.raw"
    image.write_bytes(data)
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "point-digest"), str(image)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == window_digest(data, 0)


@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(1, 40), st.booleans()), min_size=1, max_size=8
    ),
    st.integers(0, 3),
)
def test_runs_are_widened_to_whole_windows_and_zero_only_where_all_of_a_window_is(
    pieces: list[tuple[int, int, bool]], tail: int
) -> None:
    unit = WINDOW // 8
    runs, position = [], 0
    for gap, length, zero in pieces:  # sorted and disjoint, in eighths of a window
        position += gap * unit
        runs.append(Run(position, length * unit, zero))
        position += length * unit
    size = -(-position // WINDOW) * WINDOW - tail * 512 if tail else position + 3 * WINDOW
    size = max(size, position)
    out = aligned(runs, size)
    touched = {b // WINDOW for r in runs for b in range(r.offset, r.offset + r.length, unit)}
    covered: set[int] = set()
    for r in out:
        assert r.offset % WINDOW == 0 and (r.length % WINDOW == 0 or r.offset + r.length == size)
        windows = set(range(r.offset // WINDOW, -(-(r.offset + r.length) // WINDOW)))
        covered |= windows
        for w in windows:  # zero only where zero runs cover all of the window
            zeroed = sum(
                max(0, min(q.offset + q.length, (w + 1) * WINDOW, size) - max(q.offset, w * WINDOW))
                for q in runs
                if q.zero
            )
            data = any(
                not q.zero and q.offset < (w + 1) * WINDOW and q.offset + q.length > w * WINDOW
                for q in runs
            )
            whole = zeroed == min(size, (w + 1) * WINDOW) - w * WINDOW and not data
            assert r.zero == whole, (r, w)
    assert covered == touched
    assert all(a.offset + a.length <= b.offset for a, b in itertools.pairwise(out))


class _Disk:
    """An NbdClient's reads and writes on a disk in memory (``max_block`` enough)."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.info = type("Info", (), {"max_block": 1 << 21})()

    async def read_into(self, offset: int, view: memoryview) -> None:
        view[:] = self.data[offset : offset + len(view)]

    async def write(self, offset: int, data: memoryview) -> None:
        self.data[offset : offset + len(data)] = data

    async def write_zeroes(self, offset: int, length: int, *, punch_hole: bool) -> None:
        self.data[offset : offset + length] = bytes(length)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.booleans())
def test_a_copy_leaves_the_digest_of_the_disk_it_writes(seed: int, layered: bool) -> None:
    """An increment (read_old: its target reads the parent point) and a disk stored as
    what changed (its blocks compared): the parent's digest minus the old terms plus the
    new is the digest of the disk the target holds afterwards, byte for byte."""
    rng = random.Random(seed)
    size = rng.randrange(2, 40) * WINDOW - rng.choice([0, 4096])
    parent = _disk(rng, size)
    now = bytearray(parent)
    for _ in range(rng.randrange(1, 6)):
        start = rng.randrange(size)
        end = min(size, start + rng.randrange(1, 3 * WINDOW))
        now[start:end] = rng.choice([bytes(end - start), rng.randbytes(end - start)])
    source, target, sums = _Disk(now), _Disk(parent), PointSums()
    if layered:
        block = 4 * PIECE
        previous = {
            o: window_digest(parent[o : o + block], o)
            for o in range(0, size, block)
            if any(parent[o : o + block])
        }
        runs = blocks_to_read([Extent(0, size, DATA)], size, block)
        kwargs = {"previous": previous, "request_size": block}
    else:  # dirty where it changed (a bitmap's 64 KiB), zero runs where it reads so
        dirty = [
            Run(o, min(WINDOW, size - o), not any(now[o : o + WINDOW]))
            for o in range(0, size, WINDOW)
            if now[o : o + WINDOW] != parent[o : o + WINDOW]
        ]
        runs = aligned(dirty, size)
        # (any request size the configuration allows: 4 KiB multiples from 64 KiB)
        kwargs = {"read_old": True, "request_size": rng.choice([2 * WINDOW, 409600, WINDOW])}

    async def copy() -> None:
        await copy_runs(
            [source], [target], runs, in_flight=3, punch_holes=False, sums=sums, **kwargs
        )

    asyncio.run(copy())
    assert target.data == now
    assert updated(window_digest(parent, 0), sums.old, sums.new) == window_digest(now, 0)
