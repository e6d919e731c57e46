"""What a merged image's manifest keeps of its layers' checksums, and how a range
overwritten in part gets its new checksum from the windows that changed (pure logic)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.repository.coverage import combine
from agent.repository.manifest import RangeChecksum, digest_of
from agent.repository.windows import ALGORITHM, WINDOW, updated, window_sum

KIB, MIB = 1 << 10, 1 << 20
UNIT = 16 << 10  # ranges start and end on 16 KiB: windows (64 KiB) are cut at their edges
SIZE = 24 * UNIT


@st.composite
def _layers(draw: st.DrawFn) -> list[list[RangeChecksum]]:
    layers = []
    for index in range(draw(st.integers(1, 4))):
        position, layer = 0, []
        while position < SIZE:
            position += draw(st.integers(0, 6)) * UNIT
            length = draw(st.integers(1, 8)) * UNIT
            if position + length > SIZE:
                break
            layer.append(RangeChecksum(position, length, f"{index:02}{position:030x}", ALGORITHM))
            position += length
        layers.append(layer)
    return layers


def _owners(layers: list[list[RangeChecksum]]) -> list[RangeChecksum | None]:
    """The newest range over each unit of the disk."""
    owner: list[RangeChecksum | None] = [None] * (SIZE // UNIT)
    for layer in reversed(layers):
        for c in layer:
            for unit in range(c.offset // UNIT, (c.offset + c.length) // UNIT):
                owner[unit] = c
    return owner


@given(_layers())
def test_every_byte_a_layer_recorded_stays_covered_and_changed_windows_are_named(
    layers: list[list[RangeChecksum]],
) -> None:
    kept, partial = combine(layers)
    owner = _owners(layers)
    covered = [False] * len(owner)
    for c in kept:  # a kept range: its own layer's bytes everywhere (none overwritten)
        units = range(c.offset // UNIT, (c.offset + c.length) // UNIT)
        assert all(owner[u] is c for u in units), c
        covered[units.start : units.stop] = [True] * len(units)
    for p in partial:  # a whole older range, partly overwritten
        c = p.checksum
        assert c in layers[p.layer]
        units = range(c.offset // UNIT, (c.offset + c.length) // UNIT)
        assert any(owner[u] is not c for u in units) and any(owner[u] is c for u in units)
        covered[units.start : units.stop] = [True] * len(units)
        # Its windows: inside it, cut at its edges, each touched by a newer range, and
        # every newer byte inside it in one of them.
        inside = set()
        for start, end in p.windows:
            assert c.offset <= start < end <= c.offset + c.length
            assert start % WINDOW == 0 or start == c.offset
            assert end % WINDOW == 0 or end == c.offset + c.length
            inside |= set(range(start // UNIT, end // UNIT))
        changed = {u for u in units if owner[u] is not c}
        assert changed <= inside
        for unit in inside:  # no window named that nothing newer touched
            window = range(
                unit * UNIT // WINDOW * WINDOW // UNIT, (unit * UNIT // WINDOW + 1) * WINDOW // UNIT
            )
            assert any(u in changed for u in window if u in units)
    assert covered == [o is not None for o in owner]
    again = {
        u
        for p in partial
        for u in range(p.checksum.offset // UNIT, (p.checksum.offset + p.checksum.length) // UNIT)
    }
    assert not any(
        set(range(c.offset // UNIT, (c.offset + c.length) // UNIT)) <= again for c in kept
    )


@settings(max_examples=60, deadline=None)
@given(_layers(), st.integers(0, 2**32))
def test_an_updated_checksum_is_that_of_the_merged_bytes(
    layers: list[list[RangeChecksum]], seed: int
) -> None:
    """The whole scheme on real bytes: each layer's ranges get data (some all zero) and
    their real checksums; the merged disk is the newest data of each byte; every range
    the merge keeps or updates (old windows' sum from its own layer's bytes, new from the
    merged ones) equals the checksum of the merged bytes there."""
    rng = random.Random(seed)
    data: list[bytearray] = []
    real: list[list[RangeChecksum]] = []
    for layer in layers:
        image, checksums = bytearray(SIZE), []
        for c in layer:
            if rng.random() < 0.8:
                image[c.offset : c.offset + c.length] = rng.randbytes(c.length)
            end = c.offset + c.length
            checksums.append(
                RangeChecksum(c.offset, c.length, digest_of(image[c.offset : end], c.offset))
            )
        data.append(image)
        real.append(checksums)
    merged = bytearray(SIZE)
    for image, layer in zip(reversed(data), reversed(real), strict=True):
        for c in layer:
            merged[c.offset : c.offset + c.length] = image[c.offset : c.offset + c.length]
    kept, partial = combine(real)
    for c in kept:
        assert c.digest == digest_of(merged[c.offset : c.offset + c.length], c.offset)
    for p in partial:
        c = p.checksum
        old = sum(window_sum(data[p.layer][a:b], a) for a, b in p.windows)
        new = sum(window_sum(merged[a:b], a) for a, b in p.windows)
        assert updated(c.digest, old, new) == digest_of(
            merged[c.offset : c.offset + c.length], c.offset
        )


def test_an_older_range_overwritten_in_part_is_updated_from_the_windows_touched() -> None:
    mib = 1 << 20
    full = [
        RangeChecksum(0, 2 * mib, "a" * 32, ALGORITHM),
        RangeChecksum(2 * mib, 2 * mib, "b" * 32, "xxh3-128"),
    ]
    newer = [RangeChecksum(100_000, 4096, "c" * 32), RangeChecksum(2 * mib - 4096, 8192, "d" * 32)]
    kept, partial = combine([newer, full])
    assert kept == []  # both newer ranges lie inside what gets a new checksum
    assert [(p.checksum, p.layer, p.windows, p.updatable) for p in partial] == [
        (full[0], 1, ((65536, 131072), (2 * mib - 65536, 2 * mib)), True),
        (full[1], 1, ((2 * mib, 2 * mib + 65536),), False),  # an older algorithm: whole
    ]


def test_a_range_inside_one_that_gets_a_new_checksum_is_left_out() -> None:
    """full [0, 2 MiB), then [0, 256 KiB), then [64 KiB, 128 KiB): only the full's range
    gets a new checksum (it covers the others' bytes); merged again and again, the
    checksums do not pile up."""
    full = [RangeChecksum(0, 2 * MIB, "a" * 32)]
    first = [RangeChecksum(0, 256 * KIB, "b" * 32)]
    second = [RangeChecksum(64 * KIB, 64 * KIB, "c" * 32)]
    kept, partial = combine([second, first, full])
    assert kept == []
    assert [(p.checksum, p.layer) for p in partial] == [(full[0], 2)]
    assert partial[0].windows == ((0, 256 * KIB),)
    # What a merge proves it wrote: every range of the layers above no newer one touches.
    kept, partial = combine([second, first], all_newest=True)
    assert kept == second and [p.checksum for p in partial] == first
    _, partial = combine([second, first, full], all_newest=True)
    assert [p.checksum for p in partial] == [*full, *first]  # nested ones too
