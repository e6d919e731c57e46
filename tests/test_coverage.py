"""What a merged image's manifest keeps of its layers' checksums (pure logic)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.repository.coverage import combine, overwritten_in_part
from agent.repository.manifest import RangeChecksum

SIZE = 96


@st.composite
def _layers(draw: st.DrawFn) -> list[list[RangeChecksum]]:
    layers = []
    for index in range(draw(st.integers(1, 4))):
        position, layer = 0, []
        while position < SIZE:
            position += draw(st.integers(0, 12))
            length = draw(st.integers(1, 16))
            if position + length > SIZE:
                break
            layer.append(RangeChecksum(position, length, f"{index}-{position}"))
            position += length
        layers.append(layer)
    return layers


@given(_layers())
def test_every_byte_a_layer_recorded_stays_covered_and_nothing_stale_is_kept(
    layers: list[list[RangeChecksum]],
) -> None:
    kept, rehash = combine(layers)
    owner: list[RangeChecksum | None] = [None] * SIZE  # the newest range over each byte
    for layer in reversed(layers):
        for c in layer:
            for byte in range(c.offset, c.offset + c.length):
                owner[byte] = c
    covered = [False] * SIZE
    for c in kept:  # a kept range: its own layer's bytes everywhere (none overwritten)
        assert all(owner[b] is c for b in range(c.offset, c.offset + c.length)), c
        covered[c.offset : c.offset + c.length] = [True] * c.length
    older = [c for layer in layers[1:] for c in layer]
    for offset, length, _ in rehash:  # hashed again: a whole older range, partly overwritten
        source = next(c for c in older if (c.offset, c.length) == (offset, length))
        assert any(owner[b] is not source for b in range(offset, offset + length))
        assert any(owner[b] is source for b in range(offset, offset + length))
        covered[offset : offset + length] = [True] * length
    assert covered == [o is not None for o in owner]
    inside = {b for offset, length, _ in rehash for b in range(offset, offset + length)}
    assert not any(set(range(c.offset, c.offset + c.length)) <= inside for c in kept)


def test_an_older_range_overwritten_in_part_is_hashed_again_whole_once() -> None:
    full = [RangeChecksum(0, 64, "full"), RangeChecksum(64, 64, "full-2")]
    newer = [RangeChecksum(10, 4, "new"), RangeChecksum(60, 8, "across")]
    kept, rehash = combine([newer, full])
    assert rehash == [(0, 64, "xxh3-128"), (64, 64, "xxh3-128")]
    assert kept == []  # both newer ranges lie inside what is hashed again
    assert overwritten_in_part([newer], full) == full
    assert overwritten_in_part([[RangeChecksum(0, 64, "whole")]], full) == []
