"""The copy engine between real NBD servers: nbdkit as QEMU's export, qemu-nbd as the target.

What a run must get right, checked byte for byte: reads split into ``read_size``
pieces land at the right place of the write buffer (the pieces go to different
connections and complete in any order), writes stay ``request_size`` long, zero runs
become zeroes, and the checksums describe what was written. The source is nbdkit's
``pattern`` plugin (every 8 bytes hold their own offset, big-endian) behind its ``log``
filter, which records every request the copy sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.backup.copy import PIECE, Run, blocks_to_read, copy_runs
from agent.backup.data_plane import DataPlane
from agent.core.errors import ImageError
from agent.nbd.client import connect_many
from agent.nbd.extents import extents
from agent.nbd.wire import BASE_ALLOCATION
from agent.qemu import qemu_nbd
from agent.qemu.qemu_nbd import MALLOC_TUNING, serve_image
from agent.repository.blocks import BLOCK, describe, previous_digests
from agent.repository.manifest import DiskManifest, Manifest, RangeChecksum, digest_of
from tests.test_nbd import QEMU_IMG, QEMU_NBD, _run, nbdkit, running

KiB = 1024
MiB = 1024 * KiB
SIZE = 8 * MiB


def _pattern(offset: int, length: int) -> bytes:
    """What nbdkit's pattern plugin serves at ``offset`` (8-byte aligned here)."""
    assert offset % 8 == 0 and length % 8 == 0
    return b"".join(struct.pack(">Q", o) for o in range(offset, offset + length, 8))


def _qemu_nbd_process(socket: Path) -> tuple[list[str], str]:
    """The command line and environment of the qemu-nbd process serving ``socket``."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if any("qemu-nbd" in a for a in cmdline) and f"--socket={socket}" in cmdline:
                return cmdline, (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
    raise AssertionError(f"no qemu-nbd serving {socket}")


def _qemu_nbd_environment(socket: Path) -> str:
    return _qemu_nbd_process(socket)[1]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for Unix sockets (pytest's tmp_path can exceed sun_path's 108)."""
    with tempfile.TemporaryDirectory(prefix="copy", dir="/tmp") as path:
        yield Path(path)


async def test_split_reads_land_in_place_and_writes_stay_whole(sockdir: Path) -> None:
    """On the test's loop."""
    await _split_copy(sockdir, on_data_plane=False)


async def test_split_reads_on_the_data_plane(sockdir: Path) -> None:
    """Where backups run their copies: a loop in a thread of its own, which also starts
    qemu-nbd."""
    await _split_copy(sockdir, on_data_plane=True)


async def _split_copy(sockdir: Path, *, on_data_plane: bool) -> None:
    source_sock, target_sock = sockdir / "src.sock", sockdir / "dst.sock"
    log = sockdir / "requests.log"
    target = sockdir / "target.qcow2"
    _run(QEMU_IMG, "create", "-q", "-f", "qcow2", target, str(SIZE))
    # Lengths that are not multiples of the read size, a run longer than a write
    # request, one shorter than a read piece, and a zero run over data.
    runs = [
        Run(0, 1 * MiB + 24 * KiB, False),
        Run(2 * MiB, 8 * KiB, False),
        Run(3 * MiB, 512 * KiB, True),
        Run(4 * MiB + 64 * KiB, 2 * MiB + 8, False),
    ]
    read_size, request_size = 64 * KiB, 256 * KiB

    async def copy() -> tuple[int, list[RangeChecksum], bytearray, asyncio.AbstractEventLoop]:
        async with serve_image(target, target_sock, clients=2) as served:
            environment = _qemu_nbd_environment(target_sock)
            # (glibc splits the variable in place as it parses it)
            for tunable in MALLOC_TUNING.split(":"):
                assert tunable in environment
            sources = await connect_many(3, socket_path=source_sock)
            targets = await connect_many(2, socket_path=served)
            try:
                # Data over the zero run's range first: the zero run must replace it.
                await targets[0].write(3 * MiB, b"\xee" * (512 * KiB))
                checksums = await copy_runs(
                    sources,
                    targets,
                    runs,
                    request_size=request_size,
                    read_size=read_size,
                    in_flight=4,
                    punch_holes=False,
                )
                for t in targets:
                    await t.flush()
                copied = bytearray(SIZE)
                for offset in range(0, SIZE, 1 * MiB):
                    await targets[0].read_into(offset, memoryview(copied)[offset : offset + MiB])
            finally:
                for client in [*sources, *targets]:
                    await client.close()
        return len(sources), checksums, copied, asyncio.get_running_loop()

    with nbdkit(source_sock, "--filter=log", "pattern", f"size={SIZE}", f"logfile={log}"):
        if on_data_plane:
            plane = DataPlane()
            try:
                connections, checksums, copied, loop = await plane.run(copy())
            finally:
                await plane.close()
            assert loop is not asyncio.get_running_loop()
        else:
            connections, checksums, copied, loop = await copy()
    assert connections == 3, "nbdkit's pattern plugin allows multi-conn"

    expected = bytearray(SIZE)
    for run in runs:
        if not run.zero:
            start = run.offset - run.offset % 8
            end = -(-(run.offset + run.length) // 8) * 8
            data = _pattern(start, end - start)
            expected[run.offset : run.offset + run.length] = data[
                run.offset - start : run.offset - start + run.length
            ]
    assert copied == expected

    # The checksums cover exactly the write requests, each hashing what was written.
    covered = [(c.offset, c.length) for c in checksums]
    assert covered == sorted(covered)
    assert all(length <= request_size for _, length in covered)
    for c in checksums:
        assert c.digest == digest_of(bytes(expected[c.offset : c.offset + c.length]), c.offset), c
    assert sum(length for _, length in covered) == sum(r.length for r in runs)

    # Every read the source saw was at most read_size, over several connections, and
    # together they read each data byte exactly once.
    reads = [
        (int(m["offset"], 16), int(m["count"], 16), m["conn"])
        for m in re.finditer(
            r"connection=(?P<conn>\d+) Read id=\d+ offset=(?P<offset>0x[0-9a-f]+) "
            r"count=(?P<count>0x[0-9a-f]+)",
            log.read_text(),
        )
    ]
    assert reads and max(count for _, count, _ in reads) == read_size
    assert len({conn for _, _, conn in reads}) == 3
    read_bytes = sorted((offset, count) for offset, count, _ in reads)
    wanted = [(r.offset, r.length) for r in runs if not r.zero]
    merged: list[tuple[int, int]] = []
    for offset, count in read_bytes:
        if merged and merged[-1][0] + merged[-1][1] == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + count)
        else:
            merged.append((offset, count))
    assert merged == wanted


@pytest.fixture
def imagedir() -> Iterator[Path]:
    """A directory on disk (O_DIRECT works there on any kernel; on tmpfs, only on newer)."""
    with tempfile.TemporaryDirectory(prefix="copy", dir="/var/tmp") as path:
        yield Path(path)


@pytest.fixture
def starts(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The I/O mode of every qemu-nbd start, from a clean slate of refused modes."""
    seen: list[str | None] = []
    start = qemu_nbd._start

    async def counted(*args: Any) -> asyncio.subprocess.Process:
        seen.append(args[5])  # the I/O mode
        return await start(*args)

    monkeypatch.setattr(qemu_nbd, "_start", counted)
    monkeypatch.setattr(qemu_nbd, "_refused_aio", set())
    return seen


async def _serves_bytes(served: Path) -> None:
    (client,) = await connect_many(1, socket_path=served)
    try:
        await client.write(64 * KiB, b"\x5a" * (64 * KiB))
        await client.flush()
        back = bytearray(64 * KiB)
        await client.read_into(64 * KiB, memoryview(back))
    finally:
        await client.close()
    assert back == b"\x5a" * (64 * KiB)


async def test_direct_io_goes_through_io_uring_where_the_host_allows_it(
    sockdir: Path, imagedir: Path, starts: list[str | None]
) -> None:
    image, socket = imagedir / "image.qcow2", sockdir / "image.sock"
    _run(QEMU_IMG, "create", "-q", "-f", "qcow2", image, str(SIZE))
    async with serve_image(image, socket) as served:
        cmdline, _ = _qemu_nbd_process(socket)
        await _serves_bytes(served)
    expected = "io_uring" if qemu_nbd._io_uring_usable() else "native"
    assert "--cache=none" in cmdline and f"--aio={expected}" in cmdline
    assert starts == [expected]


async def test_a_host_refusing_io_uring_gets_linux_aio_without_trying_io_uring(
    sockdir: Path, imagedir: Path, starts: list[str | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU 8.2 and later would start with io_uring regardless, then use a thread pool:
    the agent asks the kernel first."""
    monkeypatch.setattr(qemu_nbd, "_io_uring_usable", lambda: False)
    image, socket = imagedir / "image.qcow2", sockdir / "image.sock"
    _run(QEMU_IMG, "create", "-q", "-f", "qcow2", image, str(SIZE))
    async with serve_image(image, socket) as served:
        cmdline, _ = _qemu_nbd_process(socket)
        await _serves_bytes(served)
    assert "--cache=none" in cmdline and "--aio=native" in cmdline
    assert starts == ["native"]
    assert qemu_nbd._refused_aio == {"io_uring"}


async def test_a_mode_qemu_nbd_refuses_falls_back_and_is_not_tried_again(
    sockdir: Path, imagedir: Path, starts: list[str | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu_nbd, "_DIRECT_AIO", ("bogus", "native"))
    image, socket = imagedir / "image.qcow2", sockdir / "image.sock"
    _run(QEMU_IMG, "create", "-q", "-f", "qcow2", image, str(SIZE))
    for _ in range(2):
        async with serve_image(image, socket, clients=1) as served:
            cmdline, _ = _qemu_nbd_process(socket)
            assert "--cache=none" in cmdline and "--aio=native" in cmdline
            await _serves_bytes(served)
    assert starts == ["bogus", "native", "native"]
    assert qemu_nbd._refused_aio == {"bogus"}


async def test_a_failure_that_is_not_about_the_mode_tries_only_the_page_cache_after(
    sockdir: Path, imagedir: Path, starts: list[str | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu_nbd, "_DIRECT_AIO", ("native", "io_uring"))
    monkeypatch.setattr(qemu_nbd, "_io_uring_usable", lambda: True)
    missing = imagedir / "missing.qcow2"
    with pytest.raises(ImageError, match=r"missing\.qcow2"):
        async with serve_image(missing, sockdir / "image.sock"):
            pass
    assert starts == ["native", None]
    assert qemu_nbd._refused_aio == set()


# --- a disk with no bitmap: read whole, stored as what changed ------------------------------

RAW_SIZE = 5 * BLOCK + MiB  # six blocks, the last one half a block


def _raw_source(path: Path, writes: list[tuple[int, bytes]], *, size: int = RAW_SIZE) -> None:
    """Write ``writes`` into the sparse raw file ``path`` (created if missing), which is
    then ``size`` bytes long (a shorter size first cuts its end off: a hole there)."""
    with path.open("r+b" if path.exists() else "wb") as f:
        f.truncate(size)
        for offset, data in writes:
            f.seek(offset)
            f.write(data)


@contextlib.contextmanager
def _serve_raw(path: Path, socket: Path) -> Iterator[int]:
    """qemu-nbd serving the raw file read-only as "vda", as QEMU's export would."""
    argv = [QEMU_NBD, "-f", "raw", "-r", f"--socket={socket}", "-x", "vda", "-t", "-e", "4"]
    with running([*argv, str(path)], socket, socket.with_suffix(".log")) as pid:
        yield pid


async def _copy_whole(
    source: Path,
    image: Path,
    socket: Path,
    previous: dict[int, str],
    *,
    overlay: bool,
) -> tuple[list[RangeChecksum], list[RangeChecksum]]:
    """Copy the raw ``source`` into ``image`` block by block as a backup of a disk with
    no bitmap does: its checksums, and the blocks written in part."""
    in_part: list[RangeChecksum] = []
    with _serve_raw(source, socket.with_name("src.sock")):
        sources = await connect_many(
            2,
            socket_path=socket.with_name("src.sock"),
            export="vda",
            meta_contexts=[BASE_ALLOCATION],
        )
        try:
            allocation = [e async for e in extents(sources[0], BASE_ALLOCATION)]
            runs = blocks_to_read(allocation, RAW_SIZE, BLOCK)
            async with serve_image(
                image, socket, clients=2, backing=overlay, direct=not overlay
            ) as served:
                targets = await connect_many(2, socket_path=served)
                try:
                    if previous:
                        # Requests shorter than a block would cut blocks in two: refused
                        # before anything is read or written.
                        with pytest.raises(ValueError, match="blocks of up to"):
                            await copy_runs(
                                sources,
                                targets,
                                runs,
                                request_size=BLOCK // 2,
                                in_flight=4,
                                punch_holes=False,
                                previous=previous,
                            )
                    checksums = await copy_runs(
                        sources,
                        targets,
                        runs,
                        request_size=BLOCK,
                        read_size=256 * KiB,
                        in_flight=4,
                        punch_holes=not overlay,
                        previous=previous,
                        blocks=in_part,
                    )
                    await targets[0].flush()
                finally:
                    for client in targets:
                        await client.close()
        finally:
            for client in sources:
                await client.close()
    return checksums, in_part


def _alone(image: Path) -> list[dict[str, Any]]:
    """``qemu-img map`` of the qcow2 ``image`` without its backing: what it holds itself,
    as (offset, length, "data" or "zeroes")."""
    spec = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(image)}}
    mapped = json.loads(_run(QEMU_IMG, "map", "--output=json", "json:" + json.dumps(spec)))
    held: list[dict[str, Any]] = []
    for e in mapped:
        if not e["present"]:
            continue
        kind = "data" if e["data"] else "zeroes"
        if held and held[-1]["end"] == e["start"] and held[-1]["kind"] == kind:
            held[-1]["end"] = e["start"] + e["length"]
        else:
            held.append({"start": e["start"], "end": e["start"] + e["length"], "kind": kind})
    return held


def _raw_disk(
    image: str, checksums: list[RangeChecksum], in_part: list[RangeChecksum], backing: str | None
) -> DiskManifest:
    return DiskManifest(
        "vdb",
        image,
        "full",
        "format-raw: no persistent bitmap",
        RAW_SIZE,
        sum(c.length for c in checksums),
        backing,
        tuple(checksums),
        block_size=BLOCK,
        blocks=tuple(in_part),
    )


def _blocks_of(data: bytes) -> dict[int, str]:
    """The digest of each block of ``data`` that is not all zeroes."""
    return {
        o: digest_of(data[o : o + BLOCK], o)
        for o in range(0, len(data), BLOCK)
        if any(data[o : o + BLOCK])
    }


async def test_a_disk_read_whole_writes_only_what_changed_on_top_of_the_previous_point(
    sockdir: Path, imagedir: Path
) -> None:
    source, base, overlay = imagedir / "vdb.raw", imagedir / "base.qcow2", imagedir / "top.qcow2"
    rng = random.Random(22)
    # The previous point: block 1 a hole, the others data.
    _raw_source(
        source,
        [
            (0, rng.randbytes(BLOCK)),
            (2 * BLOCK, rng.randbytes(BLOCK)),
            (3 * BLOCK, rng.randbytes(BLOCK)),
            (4 * BLOCK, rng.randbytes(BLOCK)),
            (5 * BLOCK, rng.randbytes(MiB)),
        ],
    )
    _run(QEMU_IMG, "create", "-q", "-f", "qcow2", base, str(RAW_SIZE))
    first, first_parts = await _copy_whole(source, base, sockdir / "base.sock", {}, overlay=False)
    then = source.read_bytes()
    # Standalone: the blocks that are not zero, each whole; the hole not even written.
    assert [(c.offset, c.length) for c in first] == [
        (0, BLOCK),
        (2 * BLOCK, BLOCK),
        (3 * BLOCK, BLOCK),
        (4 * BLOCK, BLOCK),
        (5 * BLOCK, MiB),
    ]
    assert first_parts == []
    assert {c.offset: c.digest for c in first} == _blocks_of(then)
    _run(QEMU_IMG, "compare", "-q", "-f", "qcow2", "-F", "raw", base, source)
    assert [(h["start"], h["end"]) for h in _alone(base)] == [(0, BLOCK), (2 * BLOCK, RAW_SIZE)]

    # Now: block 0 as it was; a piece of data in block 1 (a hole before); one byte of
    # block 2 changed; block 3 overwritten with zeroes (data, to the block status); a
    # piece of block 4 zeroes; block 5 cut off (a hole: zero by its block status).
    flipped = bytes([then[2 * BLOCK + 200 * KiB] ^ 0xFF])
    _raw_source(
        source,
        [
            (BLOCK + PIECE, rng.randbytes(PIECE)),
            (2 * BLOCK + 200 * KiB, flipped),
            (3 * BLOCK, bytes(BLOCK)),
            (4 * BLOCK + 5 * PIECE, bytes(PIECE)),
        ],
        size=5 * BLOCK,
    )
    _raw_source(source, [], size=RAW_SIZE)
    now = source.read_bytes()
    base_disk = _raw_disk("base.qcow2", first, first_parts, None)
    described = describe([base_disk])
    assert described is not None
    _run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", overlay)
    second, parts = await _copy_whole(
        source, overlay, sockdir / "top.sock", previous_digests(described), overlay=True
    )

    # Only what changed, 64 KiB pieces of data or zeroes; nothing of block 0.
    written = [
        (BLOCK + PIECE, PIECE, "data"),
        (2 * BLOCK + 192 * KiB, PIECE, "data"),
        (3 * BLOCK, BLOCK, "zeroes"),
        (4 * BLOCK + 5 * PIECE, PIECE, "zeroes"),
        (5 * BLOCK, MiB, "zeroes"),
    ]
    assert [(c.offset, c.length) for c in second] == [(o, n) for o, n, _ in written]
    for c in second:
        assert c.digest == digest_of(now[c.offset : c.offset + c.length], c.offset), c
    assert [(h["start"], h["end"] - h["start"], h["kind"]) for h in _alone(overlay)] == written
    # Read through its backing, the layer is the disk now, byte for byte.
    _run(QEMU_IMG, "compare", "-q", "-f", "qcow2", "-F", "raw", overlay, source)
    # The blocks written in part say what all of them hold now, and the two points
    # together describe the disk as it is (block 3 and 5: zeroes, no longer described).
    assert [(c.offset, c.length) for c in parts] == [
        (BLOCK, BLOCK),
        (2 * BLOCK, BLOCK),
        (4 * BLOCK, BLOCK),
    ]
    top_disk = _raw_disk("top.qcow2", second, parts, "../b0/base.qcow2")
    layers = describe([top_disk, base_disk])
    assert layers is not None
    assert {o: c.digest for o, c in layers.items()} == _blocks_of(now)
    assert set(layers) == {0, BLOCK, 2 * BLOCK, 4 * BLOCK}
    # What the copy recorded is what a manifest may hold.
    assert _valid_manifest(top_disk).disks[0] == top_disk

    # Nothing changed since: nothing written at all.
    third = imagedir / "third.qcow2"
    _run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", overlay.name, "-F", "qcow2", third)
    again, again_parts = await _copy_whole(
        source, third, sockdir / "third.sock", previous_digests(layers), overlay=True
    )
    assert (again, again_parts, _alone(third)) == ([], [], [])


def _valid_manifest(disk: DiskManifest) -> Manifest:
    manifest = Manifest(
        backup_id="20260102T000000Z-0a0b0c",
        domain="vm1",
        domain_uuid="6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11",
        created_at=1.0,
        completed_at=2.0,
        parent="20260101T000000Z-0a0b0c",
        checkpoint="cp-1",
        checkpoint_xml="<domaincheckpoint/>",
        domain_xml="<domain/>",
        disks=(disk,),
    )
    return Manifest.from_json(manifest.to_json(), path="m.json")
