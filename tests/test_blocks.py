"""A disk stored as what changed: its blocks described along a backing chain (pure logic).

:func:`describe` must give, for the newest image of a chain, exactly the blocks of the
disk that are not all zeroes, each with the checksum of its newest write, or None when
the chain cannot say (a layer without ``block_size``, another block or disk size, a
checksum of another algorithm); :func:`disk_chain` walks the images down their backing
files, or gives None when a backup on the way is missing.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.repository.blocks import BLOCK, describe, disk_chain, previous_digests, zero_digest
from agent.repository.manifest import DiskManifest, Manifest, RangeChecksum, digest_of

MiB = 1 << 20
SIZE = 3 * BLOCK + MiB  # four blocks, the last one half a block
UUID = "6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11"


def _length(offset: int, size: int = SIZE) -> int:
    return min(BLOCK, size - offset)


def _block(offset: int, fill: int, size: int = SIZE) -> RangeChecksum:
    """The checksum of block ``offset`` filled with byte ``fill`` (0: a block of zeroes)."""
    length = _length(offset, size)
    return RangeChecksum(offset, length, digest_of(bytes([fill]) * length, offset))


def _disk(
    checksums: list[RangeChecksum],
    *,
    backing: str | None = None,
    block_size: int | None = BLOCK,
    size: int = SIZE,
    target: str = "vdb",
    blocks: tuple[RangeChecksum, ...] = (),
) -> DiskManifest:
    return DiskManifest(
        target=target,
        image=f"{target}.qcow2",
        mode="full",
        reason="format-raw: no persistent bitmap",
        virtual_size=size,
        bytes_copied=sum(c.length for c in checksums),
        backing=backing,
        checksums=tuple(checksums),
        block_size=block_size,
        blocks=blocks,
    )


def _manifest(index: int, *disks: DiskManifest) -> Manifest:
    return Manifest(
        backup_id=_id(index),
        domain="vm1",
        domain_uuid=UUID,
        created_at=1_700_000_000.0 + index,
        completed_at=1_700_000_000.5 + index,
        parent=_id(index - 1) if index else None,
        checkpoint=f"cp-{index}",
        checkpoint_xml="<domaincheckpoint/>",
        domain_xml="<domain/>",
        disks=disks,
    )


def _id(index: int) -> str:
    return f"20260101T0000{index:02d}Z-0a0b0c"


def _backing(index: int, target: str = "vdb") -> str:
    return f"../{_id(index)}/{target}.qcow2"


# --- zero_digest -----------------------------------------------------------------------


def test_zero_digest_is_the_checksum_of_zeroes_of_any_length_anywhere() -> None:
    """A window sum of zeroes is 0: one digest for every length and place."""
    assert zero_digest(BLOCK) == digest_of(bytes(BLOCK), 0) == "0" * 32
    assert zero_digest(MiB) == digest_of(bytes(MiB), 3 * BLOCK) == zero_digest(BLOCK)
    assert zero_digest(4096) == digest_of(bytes(4096), BLOCK + 12_345) == zero_digest(MiB)
    # Not the checksum of anything else: one byte that is not zero, at either end.
    assert digest_of(bytes(4095) + b"\x01", 0) != zero_digest(4096)
    assert digest_of(b"\x01" + bytes(BLOCK - 1), BLOCK) != zero_digest(BLOCK)


# --- disk_chain ------------------------------------------------------------------------


def _three() -> list[Manifest]:
    """b0 standalone, b1 on b0, b2 on b1; vda (qcow2, incremental) alongside."""
    vda0 = _disk([], target="vda", block_size=None, size=BLOCK)
    vda1 = DiskManifest("vda", "vda.qcow2", "incremental", None, BLOCK, 0, _backing(0, "vda"), ())
    return [
        _manifest(0, vda0, _disk([_block(0, 1)])),
        _manifest(1, vda1, _disk([_block(BLOCK, 2)], backing=_backing(0))),
        _manifest(2, _disk([_block(0, 3)], backing=_backing(1))),
    ]


def test_disk_chain_walks_the_backing_files_newest_first() -> None:
    b = _three()
    by_id = {m.backup_id: m for m in b}
    chain = disk_chain(by_id.get, b[2], "vdb")
    assert chain == [b[2].disks[0], b[1].disks[1], b[0].disks[1]]
    assert disk_chain(by_id.get, b[0], "vdb") == [b[0].disks[1]]  # a standalone image
    # Down vda's own backing, not the manifests' parents (b2 has no vda).
    assert disk_chain(by_id.get, b[1], "vda") == [b[1].disks[0], b[0].disks[0]]


def test_disk_chain_is_none_when_a_backup_on_the_way_is_missing_or_lacks_the_disk() -> None:
    b = _three()
    without_b1 = {m.backup_id: m for m in (b[0], b[2])}
    assert disk_chain(without_b1.get, b[2], "vdb") is None
    by_id = {m.backup_id: m for m in b}
    assert disk_chain(by_id.get, b[2], "vda") is None  # not in the backup asked about
    # A backing into a backup that has no such disk.
    stray = _manifest(3, _disk([], target="vdc", backing=_backing(2, "vdc")))
    assert disk_chain({**by_id, stray.backup_id: stray}.get, stray, "vdc") is None


# --- describe --------------------------------------------------------------------------


def test_the_newest_checksum_of_each_block_wins() -> None:
    b = _three()
    chain = disk_chain({m.backup_id: m for m in b}.get, b[2], "vdb")
    assert chain is not None
    assert describe(chain) == {0: _block(0, 3), BLOCK: _block(BLOCK, 2)}
    assert describe(chain[1:]) == {0: _block(0, 1), BLOCK: _block(BLOCK, 2)}
    assert previous_digests(describe(chain) or {}) == {
        0: _block(0, 3).digest,
        BLOCK: _block(BLOCK, 2).digest,
    }


def test_a_block_that_became_zeroes_is_dropped_and_one_that_became_data_is_kept() -> None:
    last = 3 * BLOCK  # the short block at the end
    old = _disk([_block(0, 1), _block(BLOCK, 1), _block(last, 7)])
    new = _disk([_block(BLOCK, 0), _block(2 * BLOCK, 5), _block(last, 0)], backing=_backing(0))
    assert describe([new, old]) == {0: _block(0, 1), 2 * BLOCK: _block(2 * BLOCK, 5)}
    # Zeroes written over a block of zeroes, newest: still nothing there.
    assert describe([_disk([_block(0, 0)])]) == {}
    # The zeroes of an older layer do not hide a newer write either.
    assert describe([_disk([_block(BLOCK, 9)]), _disk([_block(BLOCK, 0)])]) == {
        BLOCK: _block(BLOCK, 9)
    }


def test_a_chain_that_does_not_describe_its_blocks_gives_none() -> None:
    top = _disk([_block(0, 1)], backing=_backing(0))
    below = _disk([_block(BLOCK, 2)])
    assert describe([top, below]) is not None
    assert describe([]) is None
    # A layer without block_size (a full copy of the runs allocated, say).
    assert describe([top, _disk([_block(BLOCK, 2)], block_size=None)]) is None
    assert describe([_disk([_block(0, 1)], block_size=None)]) is None
    # Another block size, on either layer.
    assert describe([top, _disk([], block_size=BLOCK // 2)]) is None
    assert describe([_disk([], block_size=2 * BLOCK), below]) is None
    # Another disk size: the disk was resized between the two points.
    assert describe([top, _disk([_block(0, 2, SIZE + BLOCK)], size=SIZE + BLOCK)]) is None
    # A checksum of another algorithm (a version 1 manifest's SHA-256).
    sha = RangeChecksum(BLOCK, BLOCK, "f" * 64, "sha256")
    assert describe([top, _disk([sha])]) is None
    assert describe([_disk([_block(0, 1), sha])]) is None
    # Nor plain XXH3-128 (versions 2 and 3): not a window sum, which the copy compares.
    plain = RangeChecksum(BLOCK, BLOCK, "f" * 32, "xxh3-128")
    assert describe([top, _disk([plain])]) is None
    assert describe([_disk([_block(0, 1), plain])]) is None


PIECE = 64 << 10


def _piece(offset: int, length: int, fill: int) -> RangeChecksum:
    return RangeChecksum(offset, length, digest_of(bytes([fill]) * length, offset))


def test_a_block_written_in_part_is_described_by_blocks_not_by_its_pieces() -> None:
    # Block 0 was 0x01; a piece of it is 0x02 now: the pieces' checksums say nothing of
    # the rest of the block, ``blocks`` says what all of it holds.
    now = b"\x01" * PIECE + b"\x02" * PIECE + b"\x01" * (BLOCK - 2 * PIECE)
    whole = RangeChecksum(0, BLOCK, digest_of(now, 0))
    top = _disk([_piece(PIECE, PIECE, 2)], backing=_backing(0), blocks=(whole,))
    below = _disk([_block(0, 1), _block(BLOCK, 1)])
    assert describe([top, below]) == {0: whole, BLOCK: _block(BLOCK, 1)}
    # A piece without a word in ``blocks`` (a block the layer holds in part) is no block.
    assert describe([_disk([_piece(0, PIECE, 2)]), below]) == {
        0: _block(0, 1),
        BLOCK: _block(BLOCK, 1),
    }
    # In the same layer, ``blocks`` wins over a whole checksum of the block.
    assert describe([_disk([_block(0, 5)], blocks=(whole,))]) == {0: whole}
    # A block written in part that is all zeroes now: dropped.
    zero = RangeChecksum(0, BLOCK, zero_digest(BLOCK))
    assert describe([_disk([_piece(0, PIECE, 0)], blocks=(zero,)), below]) == {
        BLOCK: _block(BLOCK, 1)
    }
    # A newer whole write hides an older layer's ``blocks``.
    assert describe([_disk([_block(0, 7)]), top]) == {0: _block(0, 7)}
    # ``blocks`` of another algorithm: the chain does not describe its blocks.
    sha = RangeChecksum(0, BLOCK, "f" * 64, "sha256")
    assert describe([_disk([_piece(0, PIECE, 2)], blocks=(sha,)), below]) is None


_FILLS = st.integers(0, 3)  # 0: zeroes
_OFFSETS = [0, BLOCK, 2 * BLOCK, 3 * BLOCK]


@st.composite
def _layers(draw: st.DrawFn) -> list[dict[int, tuple[int, int | None]]]:
    """Layers, oldest first: per block written, the fill of the whole block (0: zeroes),
    or a fill and the one piece written (the rest of the block as it was)."""
    return draw(
        st.lists(
            st.dictionaries(
                st.sampled_from(_OFFSETS),
                st.tuples(_FILLS, st.one_of(st.none(), st.integers(0, BLOCK // PIECE - 1))),
            ),
            max_size=5,
        )
    )


@given(_layers())
def test_describe_gives_what_replaying_the_layers_oldest_first_leaves(
    layers: list[dict[int, tuple[int, int | None]]],
) -> None:
    """Each layer writes some blocks whole, or a piece of them; the disk at the newest
    point, block by block, is what the writes oldest first leave, zero where none did."""
    disk = {o: bytearray(_length(o)) for o in _OFFSETS}
    chain = []
    for writes in layers:
        checksums, blocks = [], []
        for offset, (fill, piece) in sorted(writes.items()):
            length = _length(offset)
            if piece is None or piece * PIECE >= length:
                disk[offset][:] = bytes([fill]) * length
                checksums.append(_block(offset, fill))
            else:
                disk[offset][piece * PIECE : (piece + 1) * PIECE] = bytes([fill]) * PIECE
                checksums.append(_piece(offset + piece * PIECE, PIECE, fill))
                blocks.append(RangeChecksum(offset, length, digest_of(bytes(disk[offset]), offset)))
        chain.insert(0, _disk(checksums, blocks=tuple(blocks)))
    described = describe(chain)
    if not layers:
        assert described is None
        return
    assert described == {
        o: RangeChecksum(o, _length(o), digest_of(bytes(data), o))
        for o, data in disk.items()
        if any(data)
    }
