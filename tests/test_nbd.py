"""Tests for agent.nbd against real NBD servers (qemu-nbd, nbdkit) and scripted fakes.

Real peers are started per test on a Unix socket in a short temporary directory and
stopped by their own pid afterwards, even when the test fails; a peer that cannot be
started fails the test. Expected data comes from oracles independent of the client:
the raw file an image was converted from, ``qemu-img map``, ``nbdinfo``, and nbdkit's
``pattern`` plugin (every 8-byte word holds its own offset).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from agent.core.errors import NbdConnectionError, NbdProtocolError, NbdServerError, NbdTimeoutError
from agent.nbd.client import NbdClient, connect_many
from agent.nbd.extents import extents
from agent.nbd.wire import BASE_ALLOCATION, STATE_DIRTY, STATE_HOLE, STATE_ZERO, Extent
from tests import nbd_fakes
from tests.nbd_fakes import FakeConn, FakeServer, fake_server

QEMU_NBD = "/usr/bin/qemu-nbd"
QEMU_IMG = "/usr/bin/qemu-img"
QEMU_IO = "/usr/bin/qemu-io"
NBDKIT = "/usr/bin/nbdkit"
NBDINFO = "/usr/bin/nbdinfo"

KiB = 1024
MiB = 1024 * KiB
IMAGE_SIZE = 64 * MiB


# --- peers -------------------------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for Unix sockets (pytest's tmp_path can exceed sun_path's 108)."""
    path = Path(tempfile.mkdtemp(prefix="nbd", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _run(*args: str | Path) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout


def _connectable(address: Path | tuple[str, int]) -> bool:
    family = socket.AF_UNIX if isinstance(address, Path) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(address) if isinstance(address, Path) else address)
        except OSError:
            return False
    return True


@contextlib.contextmanager
def running(argv: list[str], address: Path | tuple[str, int], log: Path) -> Iterator[int]:
    """Start a server, wait until ``address`` accepts connections, yield its pid; stop it
    by that pid afterwards whatever happens. Fails (never skips) if it does not come up."""
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + 15
        while not _connectable(address):
            if proc.poll() is not None:
                pytest.fail(f"{argv[0]} exited with {proc.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{argv[0]} did not listen on {address}: {log.read_text()}")
            time.sleep(0.02)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def qemu_nbd(image: Path, sock: Path, *extra: str) -> contextlib.AbstractContextManager[int]:
    argv = [QEMU_NBD, "-f", "qcow2", f"--socket={sock}", "-x", "vda", "-t", *extra, str(image)]
    return running(argv, sock, sock.with_suffix(".log"))


def nbdkit(sock: Path, *plugin: str) -> contextlib.AbstractContextManager[int]:
    argv = [NBDKIT, "-f", "--exit-with-parent", "-U", str(sock), *plugin]
    return running(argv, sock, sock.with_suffix(".log"))


# --- images ------------------------------------------------------------------------------

# The reference raw file: holes everywhere except these runs (offset, data).
_rng = random.Random(20240601)
RUNS: list[tuple[int, bytes]] = [
    (1 * MiB, b"\xab" * (64 * KiB)),
    (8 * MiB, _rng.randbytes(1 * MiB)),
    (20 * MiB, _rng.randbytes(4096 + 3)),
    (48 * MiB, _rng.randbytes(16 * MiB)),
]


@pytest.fixture(scope="module")
def reference() -> Iterator[tuple[Path, bytes]]:
    """A 64 MiB qcow2 converted from a sparse raw file, and that raw file's bytes."""
    work = Path(tempfile.mkdtemp(prefix="nbdimg"))
    try:
        raw = work / "ref.raw"
        with raw.open("wb") as f:
            f.truncate(IMAGE_SIZE)
            for offset, data in RUNS:
                f.seek(offset)
                f.write(data)
        image = work / "ref.qcow2"
        _run(QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", raw, image)
        yield image, raw.read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def image(reference: tuple[Path, bytes], sockdir: Path) -> Path:
    """A private (writable) copy of the reference image."""
    copy = sockdir / "vda.qcow2"
    shutil.copyfile(reference[0], copy)
    return copy


@pytest.fixture
def qemu(image: Path, sockdir: Path) -> Iterator[Path]:
    """qemu-nbd serving ``image`` as export "vda" (8 clients at once allowed)."""
    sock = sockdir / "q.sock"
    with qemu_nbd(image, sock, "-e", "8"):
        yield sock


def _filled(n: int, value: int = 0xFF) -> memoryview:
    return memoryview(bytearray([value]) * n)


async def _wait_until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    # Polls state the client changes from transport callbacks (bytes landing in a
    # caller's buffer, requests leaving the table): there is no event to wait on.
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


# --- qemu-nbd: handshake -----------------------------------------------------------------


async def test_handshake_reports_what_nbdinfo_sees(qemu: Path) -> None:
    oracle = json.loads(_run(NBDINFO, "--json", f"nbd+unix:///vda?socket={qemu}"))
    (export,) = oracle["exports"]
    async with await NbdClient.connect(
        socket_path=qemu, export="vda", meta_contexts=[BASE_ALLOCATION]
    ) as client:
        info = client.info
        assert (info.name, info.size) == ("vda", IMAGE_SIZE)
        assert info.size == export["export-size"]
        assert info.min_block == export["block_size_minimum"] == 1
        assert info.preferred_block == export["block_size_preferred"]
        assert info.max_block == export["block_size_maximum"] == 32 * MiB
        assert info.read_only is export["is_read_only"] is False
        assert info.can_flush is export["can_flush"] is True
        assert info.can_fua is export["can_fua"] is True
        assert info.can_write_zeroes is export["can_zero"] is True
        assert info.can_fast_zero is export["can_fast_zero"]
        assert info.can_multi_conn is export["can_multi_conn"]
        assert list(info.meta_contexts) == [BASE_ALLOCATION]


async def test_unknown_export_is_a_connection_error_naming_it(qemu: Path) -> None:
    with pytest.raises(NbdConnectionError) as caught:
        await NbdClient.connect(socket_path=qemu, export="no-such-disk", timeout=5)
    assert "no-such-disk" in str(caught.value)
    assert "NBD_REP_ERR_UNKNOWN" in str(caught.value)
    assert caught.value.server == f"unix:{qemu}"
    assert not caught.value.connection_survives


async def test_unknown_meta_context_is_a_connection_error_naming_it(qemu: Path) -> None:
    with pytest.raises(NbdConnectionError, match="qemu:dirty-bitmap:nope"):
        await NbdClient.connect(
            socket_path=qemu, export="vda", meta_contexts=["qemu:dirty-bitmap:nope"], timeout=5
        )


async def test_nothing_listening_is_a_connection_error(sockdir: Path) -> None:
    with pytest.raises(NbdConnectionError, match="cannot connect"):
        await NbdClient.connect(socket_path=sockdir / "nobody.sock", timeout=5)


# --- qemu-nbd: data ----------------------------------------------------------------------


async def test_reads_return_exact_bytes_and_zero_fill_holes(
    qemu: Path, reference: tuple[Path, bytes]
) -> None:
    _, raw = reference
    async with await NbdClient.connect(socket_path=qemu, export="vda") as client:
        # Across hole -> data -> hole, into a buffer full of 0xFF: holes must be written.
        buf = _filled(2 * MiB)
        await client.read_into(0, buf)
        assert buf == raw[: 2 * MiB]
        assert buf[1 * MiB - 1] == 0 and buf[1 * MiB] == 0xAB
        # Random data, unaligned start and end, and single bytes at the edges of a run.
        assert await client.read(8 * MiB + 4095, 300_001) == raw[8 * MiB + 4095 :][:300_001]
        assert await client.read(20 * MiB + 4096 + 2, 1) == raw[20 * MiB + 4098 : 20 * MiB + 4099]
        assert await client.read(20 * MiB + 4096 + 3, 1) == b"\0"
        assert await client.read(1 * MiB + 64 * KiB - 1, 1) == b"\xab"


async def test_read_of_max_block(qemu: Path, reference: tuple[Path, bytes]) -> None:
    _, raw = reference
    async with await NbdClient.connect(socket_path=qemu, export="vda") as client:
        n = client.info.max_block
        buf = _filled(n)
        await client.read_into(IMAGE_SIZE - n, buf)  # 16 MiB hole, then 16 MiB of data
        assert buf == raw[IMAGE_SIZE - n :]
        with pytest.raises(ValueError, match="limit"):
            await client.read_into(0, _filled(n + 1))


async def test_read_beyond_end_fails_alone_and_the_connection_survives(
    qemu: Path, reference: tuple[Path, bytes]
) -> None:
    _, raw = reference
    async with await NbdClient.connect(socket_path=qemu, export="vda") as client:
        with pytest.raises(NbdServerError) as caught:
            await client.read(IMAGE_SIZE - 512, 1024)
        assert caught.value.errno == 22  # EINVAL
        assert caught.value.connection_survives
        assert "EINVAL" in str(caught.value)
        assert client.alive
        assert await client.read(48 * MiB, 4096) == raw[48 * MiB : 48 * MiB + 4096]


async def test_write_flush_and_read_back_on_another_connection(qemu: Path) -> None:
    data = random.Random(7).randbytes(256 * KiB + 512)
    async with await NbdClient.connect(socket_path=qemu, export="vda") as client:
        await client.write(5 * MiB + 512, data, fua=True)
        await client.write(30 * MiB, memoryview(data)[:4096])
        await client.flush()
        assert await client.read(5 * MiB + 512, len(data)) == data
    async with await NbdClient.connect(socket_path=qemu, export="vda") as other:
        assert await other.read(5 * MiB + 512, len(data)) == data
        assert await other.read(30 * MiB, 4096) == data[:4096]
        assert await other.read(30 * MiB + 4096, 4096) == bytes(4096)


async def test_write_zeroes_with_and_without_punching_holes(
    qemu: Path, reference: tuple[Path, bytes]
) -> None:
    _, raw = reference
    async with await NbdClient.connect(
        socket_path=qemu, export="vda", meta_contexts=[BASE_ALLOCATION]
    ) as client:
        await client.write_zeroes(8 * MiB, 64 * KiB)  # may punch a hole
        await client.write_zeroes(8 * MiB + 128 * KiB, 64 * KiB, punch_hole=False)
        assert await client.read(8 * MiB, 64 * KiB) == bytes(64 * KiB)
        assert await client.read(8 * MiB + 128 * KiB, 64 * KiB) == bytes(64 * KiB)
        middle = raw[8 * MiB + 64 * KiB : 8 * MiB + 128 * KiB]
        assert await client.read(8 * MiB + 64 * KiB, 64 * KiB) == middle  # untouched
        (zeroed,) = await client.block_status(8 * MiB, 64 * KiB, BASE_ALLOCATION)
        assert zeroed.flags & STATE_ZERO
        (kept,) = await client.block_status(8 * MiB + 128 * KiB, 64 * KiB, BASE_ALLOCATION)
        assert kept.flags & STATE_ZERO  # (qcow2 reports its zero clusters as HOLE either way)


def _map_extents(image: Path) -> list[tuple[int, int, int]]:
    """base:allocation according to qemu-img map: HOLE unless data, ZERO if zero."""
    out: list[tuple[int, int, int]] = []
    for e in json.loads(_run(QEMU_IMG, "map", "-U", "--output=json", image)):
        flags = (0 if e["data"] else STATE_HOLE) | (STATE_ZERO if e["zero"] else 0)
        out.append((e["start"], e["length"], flags))
    return _coalesce(out)


def _coalesce(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for offset, length, flags in runs:
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, flags)
        else:
            out.append((offset, length, flags))
    return out


async def test_block_status_matches_qemu_img_map(qemu: Path, image: Path) -> None:
    expected = _map_extents(image)
    assert len(expected) >= 7  # the image really has holes and data
    async with await NbdClient.connect(
        socket_path=qemu, export="vda", meta_contexts=[BASE_ALLOCATION]
    ) as client:
        got = [(e.offset, e.length, e.flags) async for e in extents(client, BASE_ALLOCATION)]
        assert _coalesce(got) == expected
        # A window: starts at its offset, never extends past its end.
        window = await client.block_status(1 * MiB + 4096, 8 * MiB, BASE_ALLOCATION)
        assert window[0].offset == 1 * MiB + 4096
        assert window[-1].offset + window[-1].length <= 9 * MiB + 4096
        with pytest.raises(ValueError, match="not negotiated"):
            await client.block_status(0, 4096, "qemu:dirty-bitmap:x")


# --- qemu-nbd: dirty bitmaps -------------------------------------------------------------


# What dirty_image's writes dirty (the bitmap's granularity is 64 KiB).
DIRTY_RANGES = [
    (1 * MiB, 64 * KiB),
    (10 * MiB, 128 * KiB),
    (20 * MiB - 64 * KiB, 128 * KiB),
    (30 * MiB, 64 * KiB),
]
DIRTY_BITMAP = "qemu:dirty-bitmap:b0"


def dirty_image(image: Path) -> None:
    """A 64 MiB qcow2 with bitmap b0, and writes after it was added that dirty
    DIRTY_RANGES (the last one written as zeroes)."""
    _run(QEMU_IMG, "create", "-q", "-f", "qcow2", image, "64M")
    _run(QEMU_IO, "-c", "write -P 0x01 0 2M", image)  # before the bitmap: not dirty
    _run(QEMU_IMG, "bitmap", "--add", image, "b0")
    _run(
        QEMU_IO,
        *("-c", "write -P 0x11 1M 4k"),  # dirties [1M, 1M+64k)
        *("-c", "write -P 0x22 10M 128k"),  # [10M, 10M+128k)
        *("-c", "write -P 0x33 20476k 8k"),  # straddles 20M: [20M-64k, 20M+64k)
        *("-c", "write -z 30M 64k"),  # zeroes: dirty, and base:allocation says ZERO
        image,
    )


def serve_dirty_image(image: Path, sock: Path) -> contextlib.AbstractContextManager[int]:
    """qemu-nbd serving a dirty_image read-only as "vda", with its bitmap b0."""
    return qemu_nbd(image, sock, "-r", "-B", "b0")


async def test_dirty_bitmap_extents(sockdir: Path) -> None:
    image = sockdir / "dirty.qcow2"
    dirty_image(image)
    allocation = _map_extents(image)
    sock = sockdir / "d.sock"
    bitmap = DIRTY_BITMAP
    with serve_dirty_image(image, sock):
        async with await NbdClient.connect(
            socket_path=sock, export="vda", meta_contexts=[BASE_ALLOCATION, bitmap]
        ) as client:
            assert set(client.info.meta_contexts) == {BASE_ALLOCATION, bitmap}
            assert client.info.read_only
            with pytest.raises(NbdServerError) as refused:  # refused before sending
                await client.write(0, b"x" * 512)
            assert refused.value.errno == 1 and client.alive  # EPERM
            dirty = [e async for e in extents(client, bitmap)]
            alloc = [e async for e in extents(client, BASE_ALLOCATION)]
    assert [(e.offset, e.length) for e in dirty if e.flags & STATE_DIRTY] == DIRTY_RANGES
    assert sum(e.length for e in dirty) == IMAGE_SIZE  # contiguous, whole export
    assert _coalesce([(e.offset, e.length, e.flags) for e in alloc]) == allocation
    # What a backup copies of these extents: tests/test_copy.py (runs_to_copy).


# --- nbdkit: concurrency, multi-conn, TCP ------------------------------------------------


async def test_64_concurrent_writes_and_reads_with_distinct_patterns(sockdir: Path) -> None:
    sock = sockdir / "m.sock"
    with nbdkit(sock, "memory", "64M"):
        async with await NbdClient.connect(socket_path=sock) as client:
            block = 256 * KiB

            def pattern(i: int) -> bytes:
                return random.Random(i).randbytes(block)

            # Offsets shuffled so neighbours in time are not neighbours on disk.
            slots = random.Random(1).sample(range(64 * MiB // block), 64)
            await asyncio.gather(
                *(client.write(slot * block, pattern(i)) for i, slot in enumerate(slots))
            )
            assert client.in_flight == 0
            got = await asyncio.gather(*(client.read(slot * block, block) for slot in slots))
            assert [g == pattern(i) for i, g in enumerate(got)] == [True] * 64


async def test_many_reads_in_flight_each_get_their_own_reply(sockdir: Path) -> None:
    sock = sockdir / "p.sock"
    with nbdkit(sock, "pattern", "1G"):
        async with await NbdClient.connect(socket_path=sock, max_in_flight=32) as client:
            rng = random.Random(3)
            wanted = [(rng.randrange(0, (1 << 30) - MiB) & ~7, rng.randrange(8, MiB, 8))]
            wanted += [
                (rng.randrange(0, (1 << 30) - MiB) & ~7, 8 * rng.randrange(1, 4096))
                for _ in range(99)
            ]
            bufs = [_filled(n) for _, n in wanted]
            await asyncio.gather(
                *(client.read_into(o, b) for (o, _), b in zip(wanted, bufs, strict=True))
            )
            for (offset, n), buf in zip(wanted, bufs, strict=True):
                words = struct.unpack(f">{n // 8}Q", buf)
                assert words == tuple(range(offset, offset + n, 8))


async def test_connect_many_only_with_multi_conn(sockdir: Path, image: Path) -> None:
    sock = sockdir / "mc.sock"
    with nbdkit(sock, "memory", "16M"):
        clients = await connect_many(4, socket_path=sock)
        try:
            assert len(clients) == 4
            assert len({id(c) for c in clients}) == 4
            assert all(c.info.can_multi_conn for c in clients)
            await clients[0].write(4096, b"\x42" * 4096)
            await clients[0].flush()
            assert await clients[3].read(4096, 4096) == b"\x42" * 4096
        finally:
            for c in clients:
                await c.close()
    qsock = sockdir / "single.sock"
    with qemu_nbd(image, qsock):  # one client at a time: no CAN_MULTI_CONN
        clients = await connect_many(4, socket_path=qsock, export="vda")
        try:
            assert len(clients) == 1
            assert not clients[0].info.can_multi_conn
        finally:
            for c in clients:
                await c.close()


async def test_tcp(sockdir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [NBDKIT, "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port)]
    with running([*argv, "pattern", "1M"], ("127.0.0.1", port), sockdir / "tcp.log"):
        async with await NbdClient.connect(host="127.0.0.1", port=port) as client:
            assert client.server == f"127.0.0.1:{port}"
            assert await client.read(8 * 1000, 16) == struct.pack(">QQ", 8000, 8008)


# --- cancellation ------------------------------------------------------------------------


async def test_cancelled_read_leaves_the_connection_usable(
    qemu: Path, reference: tuple[Path, bytes]
) -> None:
    _, raw = reference
    async with await NbdClient.connect(socket_path=qemu, export="vda") as client:
        n = client.info.max_block
        for delay in (0, 0.001, 0.005):
            task = asyncio.create_task(client.read_into(IMAGE_SIZE - n, _filled(n)))
            await asyncio.sleep(delay)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert await client.read(48 * MiB, 64 * KiB) == raw[48 * MiB : 48 * MiB + 64 * KiB]
        assert client.alive
        await _wait_until(lambda: client.in_flight == 0)


async def test_cancel_mid_payload_stops_writing_into_the_callers_buffer(sockdir: Path) -> None:
    release = asyncio.Event()
    size, half = 64 * KiB, 32 * KiB

    async def script(conn: FakeConn) -> None:
        await conn.handshake()
        a = await conn.request()
        head = struct.pack(
            ">IHHQIQ", nbd_fakes.STRUCTURED_REPLY_MAGIC, 1, 1, a.handle, 8 + size, a.offset
        )
        await conn.send(head + b"\xaa" * half)
        await release.wait()
        b = await conn.request()
        await conn.send(b"\xaa" * half)  # the rest of a's reply
        await conn.data(b, b"\xbb" * 4096)
        await conn.request()  # DISC

    async with fake_client(sockdir, script, timeout=5) as (server, client):
        buf = bytearray(size)
        task = asyncio.create_task(client.read_into(0, memoryview(buf)))
        await _wait_until(lambda: buf[half - 1] == 0xAA)  # received in place
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        assert await client.read(size, 4096) == b"\xbb" * 4096
        assert buf == b"\xaa" * half + bytes(half)  # nothing written after cancel
        assert client.in_flight == 0 and client.alive
        assert not server.errors


# --- malformed servers -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fake_client(
    sockdir: Path,
    script: nbd_fakes.Script,
    *,
    timeout: float = 5,
    meta_contexts: Sequence[str] = (),
    max_in_flight: int = 16,
) -> AsyncIterator[tuple[FakeServer, NbdClient]]:
    """A fake server running ``script`` and a client connected to it (closed after)."""
    async with fake_server(sockdir / "f.sock", script) as server:
        client = await NbdClient.connect(
            socket_path=server.path,
            timeout=timeout,
            meta_contexts=meta_contexts,
            max_in_flight=max_in_flight,
        )
        try:
            yield server, client
        finally:
            await client.close()


async def test_wrong_handshake_magic(sockdir: Path) -> None:
    async def script(conn: FakeConn) -> None:
        await conn.send(b"NBDMAGIX" + b"IHAVEOPT" + b"\0\3")
        await asyncio.sleep(5)

    async with fake_server(sockdir / "f.sock", script) as server:
        with pytest.raises(NbdProtocolError, match="magic"):
            await NbdClient.connect(socket_path=server.path, timeout=5)


async def test_handshake_reply_with_absurd_length(sockdir: Path) -> None:
    async def script(conn: FakeConn) -> None:
        await conn.send(b"NBDMAGICIHAVEOPT\0\3")
        await conn.reader.readexactly(4 + 16)  # client flags, STRUCTURED_REPLY option
        header = struct.pack(">QIII", nbd_fakes.OPTION_REPLY_MAGIC, 8, 1, 2**31)
        await conn.send(header + b"\0" * 1000)
        await asyncio.sleep(5)

    async with fake_server(sockdir / "f.sock", script) as server:
        tracemalloc.start()
        try:
            with pytest.raises(NbdProtocolError, match="2147483648"):
                await NbdClient.connect(socket_path=server.path, timeout=5)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * MiB


@pytest.mark.parametrize("after", [0, 10, 18, 18 + 20])
async def test_server_hanging_up_during_the_handshake(sockdir: Path, after: int) -> None:
    """Closed before, in the middle of or after its greeting, or after reading the first
    option: a connection error saying so, at once, never a hang or a parse of garbage."""

    async def script(conn: FakeConn) -> None:
        greeting = b"NBDMAGICIHAVEOPT\0\3"
        await conn.send(greeting[:after])
        if after > len(greeting):
            await conn.reader.readexactly(4 + 16)  # client flags, STRUCTURED_REPLY option
        conn.writer.close()

    async with fake_server(sockdir / "f.sock", script) as server:
        started = time.monotonic()
        with pytest.raises(NbdConnectionError, match=r"during the handshake|connection closed"):
            await NbdClient.connect(socket_path=server.path, timeout=5)
        assert time.monotonic() - started < 2


async def test_silent_server_during_handshake_times_out(sockdir: Path) -> None:
    async def script(conn: FakeConn) -> None:
        await asyncio.sleep(30)

    async with fake_server(sockdir / "f.sock", script) as server:
        started = time.monotonic()
        with pytest.raises(NbdTimeoutError):
            await NbdClient.connect(socket_path=server.path, timeout=0.3)
        assert time.monotonic() - started < 2


async def test_truncated_reply_is_a_connection_error(sockdir: Path) -> None:
    async def script(conn: FakeConn) -> None:
        await conn.handshake()
        req = await conn.request()
        head = struct.pack(
            ">IHHQIQ", nbd_fakes.STRUCTURED_REPLY_MAGIC, 1, 1, req.handle, 8 + req.length, 0
        )
        await conn.send(head + b"x" * 1000)  # then hang up mid-payload

    async with fake_client(sockdir, script, timeout=5) as (_, client):
        started = time.monotonic()
        with pytest.raises(NbdConnectionError, match="middle of a reply"):
            await client.read(0, 64 * KiB)
        assert time.monotonic() - started < 2
        assert not client.alive
        with pytest.raises(NbdConnectionError):
            await client.read(0, 512)


async def test_reply_with_unknown_handle(sockdir: Path) -> None:
    async def script(conn: FakeConn) -> None:
        await conn.handshake()
        req = await conn.request()
        await conn.chunk(req.handle ^ 0xDEAD, nbd_fakes.TYPE_NONE, b"")
        await asyncio.sleep(5)

    async with fake_client(sockdir, script, timeout=5) as (_, client):
        with pytest.raises(NbdProtocolError, match="unknown handle"):
            await client.read(0, 4096)


@pytest.mark.parametrize(
    ("chunk_type", "length"),
    [
        (nbd_fakes.TYPE_DATA, 8 + 4096 + 1),  # one byte more than asked for
        (nbd_fakes.TYPE_DATA, 2**31),
        (nbd_fakes.TYPE_DATA, 2**32 - 1),
        (nbd_fakes.TYPE_HOLE, 2**31),
        (nbd_fakes.TYPE_ERROR, 2**31),
        (nbd_fakes.TYPE_BLOCK_STATUS, 2**31),
    ],
)
async def test_chunk_longer_than_allowed_fails_fast_without_allocating(
    sockdir: Path, chunk_type: int, length: int
) -> None:
    async def script(conn: FakeConn) -> None:
        await conn.handshake()
        req = await conn.request()
        head = struct.pack(
            ">IHHQI", nbd_fakes.STRUCTURED_REPLY_MAGIC, 1, chunk_type, req.handle, length
        )
        await conn.send(head + struct.pack(">Q", req.offset) + b"\0" * 64 * KiB)
        await asyncio.sleep(5)

    async with fake_client(sockdir, script, meta_contexts=[BASE_ALLOCATION]) as (_, client):
        tracemalloc.start()
        try:
            started = time.monotonic()
            with pytest.raises(NbdProtocolError, match=f"{length} bytes"):
                if chunk_type == nbd_fakes.TYPE_BLOCK_STATUS:
                    await client.block_status(0, 4096, BASE_ALLOCATION)
                else:
                    await client.read(0, 4096)
            elapsed = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert elapsed < 1
        assert peak < 4 * MiB


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ("data-outside", "outside"),
        ("overlap", "overlapping"),
        ("short", "covers only"),
        ("hole-outside", "outside"),
        ("bad-magic", "magic"),
        ("simple-read", "simple reply to a read"),
    ],
)
async def test_inconsistent_replies_kill_the_connection(
    sockdir: Path, scenario: str, message: str
) -> None:
    async def script(conn: FakeConn) -> None:
        await conn.handshake()
        req = await conn.request()  # read 8192 at 4096
        half = 4096
        if scenario == "data-outside":
            await conn.data(req, b"x" * half, offset=req.offset + half + 1)
        elif scenario == "overlap":
            await conn.chunk(req.handle, 1, struct.pack(">Q", 4096) + b"x" * half, flags=0)
            await conn.data(req, b"y" * half, offset=4096 + half - 1)
        elif scenario == "short":
            await conn.data(req, b"x" * half)
        elif scenario == "hole-outside":
            await conn.chunk(req.handle, nbd_fakes.TYPE_HOLE, struct.pack(">QI", 0, 4096))
        elif scenario == "bad-magic":
            await conn.send(b"\x12\x34\x56\x78" + bytes(12))
        else:
            await conn.simple(req.handle, 0, b"x" * req.length)
        await asyncio.sleep(5)

    async with fake_client(sockdir, script, timeout=5) as (_, client):
        with pytest.raises(NbdProtocolError, match=message):
            await client.read(4096, 8192)
        assert not client.alive


async def test_silent_server_times_out_and_the_connection_is_dead(sockdir: Path) -> None:
    async def script(conn: FakeConn) -> None:
        await conn.handshake()
        await conn.request()
        await asyncio.sleep(30)

    async with fake_client(sockdir, script, timeout=0.3) as (_, client):
        started = time.monotonic()
        with pytest.raises(NbdTimeoutError):
            await client.read(0, 4096)
        assert 0.25 < time.monotonic() - started < 2
        assert not client.alive
        with pytest.raises(NbdTimeoutError):  # dead: fails at once, same cause
            await client.read(0, 4096)


async def test_all_requests_in_flight_fail_when_the_connection_dies(sockdir: Path) -> None:
    async def script(conn: FakeConn) -> None:
        await conn.handshake()
        first = await conn.request()
        for _ in range(4):
            await conn.request()
        await conn.data(first, b"\1" * first.length)  # one succeeds...
        await conn.send(b"garbage!" * 4)  # ...then the stream is poisoned

    async with fake_client(sockdir, script, timeout=5) as (_, client):
        started = time.monotonic()
        results = await asyncio.gather(
            *(client.read(i * 4096, 4096) for i in range(5)), return_exceptions=True
        )
        assert time.monotonic() - started < 1  # at once, not after their timeouts
        assert results[0] == b"\1" * 4096
        errors = results[1:]
        assert all(isinstance(e, NbdProtocolError) for e in errors), errors
        assert len({id(e) for e in errors}) == 4  # one exception object per caller
        assert client.in_flight == 0
        with pytest.raises(NbdProtocolError):
            await client.write(0, b"x" * 512)


async def test_max_in_flight_bounds_requests_on_the_wire(sockdir: Path) -> None:
    batches: list[int] = []

    async def script(conn: FakeConn) -> None:
        await conn.handshake()
        while True:
            batch = [await conn.request()]
            with contextlib.suppress(TimeoutError):
                while True:
                    batch.append(await asyncio.wait_for(conn.request(), 0.3))
            batches.append(len(batch))
            for req in reversed(batch):  # out of order on purpose
                await conn.data(req, struct.pack(">Q", req.offset) * (req.length // 8))

    async with fake_client(sockdir, script, timeout=5, max_in_flight=4) as (_, client):
        got = await asyncio.gather(*(client.read(i * 512, 512) for i in range(10)))
        assert got == [struct.pack(">Q", i * 512) * 64 for i in range(10)]
    assert batches == [4, 4, 2]


async def test_error_chunk_fails_one_request_and_the_connection_survives(sockdir: Path) -> None:
    async def script(conn: FakeConn) -> None:
        await conn.handshake()
        bad = await conn.request()
        message = b"disk on fire"
        payload = struct.pack(">IH", 5, len(message)) + message + struct.pack(">Q", 6000)
        await conn.chunk(bad.handle, nbd_fakes.TYPE_ERROR_OFFSET, payload, flags=0)
        await conn.chunk(bad.handle, nbd_fakes.TYPE_NONE, b"")
        good = await conn.request()
        await conn.data(good, b"\7" * good.length)
        await conn.request()

    async with fake_client(sockdir, script, timeout=5) as (server, client):
        with pytest.raises(NbdServerError) as caught:
            await client.read(4096, 4096)
        assert caught.value.errno == 5
        assert "disk on fire" in str(caught.value) and "6000" in str(caught.value)
        assert await client.read(0, 512) == b"\7" * 512
        assert not server.errors


async def test_server_without_structured_replies(sockdir: Path) -> None:
    async def script(conn: FakeConn) -> None:
        await conn.handshake(structured=False)
        ok = await conn.request()
        await conn.simple(ok.handle, 0, b"s" * ok.length)
        bad = await conn.request()
        await conn.simple(bad.handle, 22)
        again = await conn.request()
        await conn.simple(again.handle, 0, b"t" * again.length)
        await conn.request()

    async with fake_client(sockdir, script, timeout=5) as (server, client):
        assert await client.read(0, 1000) == b"s" * 1000
        with pytest.raises(NbdServerError):
            await client.read(0, 10)
        assert await client.read(0, 3) == b"ttt"
        with pytest.raises(NbdConnectionError, match="structured"):
            await NbdClient.connect(
                socket_path=server.path, meta_contexts=[BASE_ALLOCATION], timeout=5
            )


async def test_extents_loops_over_short_answers_and_clips_overlong_ones(sockdir: Path) -> None:
    asked: list[tuple[int, int]] = []

    async def script(conn: FakeConn) -> None:
        await conn.handshake(size=1 * MiB, contexts={BASE_ALLOCATION: 7})
        while True:
            req = await conn.request()
            if req.type == nbd_fakes.CMD_DISC:
                return
            asked.append((req.offset, req.length))
            if req.length < 64 * KiB:  # overlong final extent: allowed, must be clipped
                await conn.extents(req, 7, [(req.length + 4096, 0)])
            else:
                await conn.extents(req, 7, [(32 * KiB, 3), (32 * KiB, 0)])

    async with fake_client(sockdir, script, meta_contexts=[BASE_ALLOCATION], timeout=5) as (
        server,
        client,
    ):
        got = [e async for e in extents(client, BASE_ALLOCATION, 4096)]
    assert [a for a, _ in asked] == [4096 + i * 64 * KiB for i in range(16)]
    assert got[0] == Extent(4096, 32 * KiB, 3)
    assert got[-1] == Extent(1 * MiB - (64 * KiB - 4096), 64 * KiB - 4096, 0)
    assert sum(e.length for e in got) == 1 * MiB - 4096
    assert all(a.offset + a.length == b.offset for a, b in itertools.pairwise(got))
    assert not server.errors


async def test_block_status_for_unnegotiated_context_id_is_a_protocol_error(
    sockdir: Path,
) -> None:
    async def script(conn: FakeConn) -> None:
        await conn.handshake(contexts={BASE_ALLOCATION: 7})
        req = await conn.request()
        await conn.extents(req, 8, [(req.length, 0)])
        await asyncio.sleep(5)

    async with fake_client(sockdir, script, meta_contexts=[BASE_ALLOCATION]) as (_, client):
        with pytest.raises(NbdProtocolError, match="context id 8"):
            await client.block_status(0, 4096, BASE_ALLOCATION)


async def test_command_flags_and_payloads_on_the_wire(sockdir: Path) -> None:
    seen: list[tuple[int, int, int, int, bytes]] = []

    async def script(conn: FakeConn) -> None:
        flags = nbd_fakes.DEFAULT_FLAGS | 0x800  # + SEND_FAST_ZERO
        await conn.handshake(flags=flags, contexts={BASE_ALLOCATION: 3})
        while True:
            req = await conn.request()
            if req.type == nbd_fakes.CMD_DISC:
                return
            seen.append((req.type, req.flags, req.offset, req.length, req.data))
            if req.type == nbd_fakes.CMD_BLOCK_STATUS:
                await conn.extents(req, 3, [(req.length, 0)])
            else:
                await conn.simple(req.handle)

    async with fake_client(sockdir, script, meta_contexts=[BASE_ALLOCATION]) as (server, client):
        assert client.info.can_fast_zero and client.info.can_fua
        await client.write(512, b"abc" * 171 + b"d", fua=True)
        await client.write(1024, memoryview(b"e" * 512))
        await client.write_zeroes(4096, 8192)
        await client.write_zeroes(4096, 8192, punch_hole=False)
        await client.write_zeroes(4096, 8192, fast=True)
        await client.flush()
        await client.block_status(0, 65536, BASE_ALLOCATION, req_one=True)
    assert seen == [
        (1, 1, 512, 514, b"abc" * 171 + b"d"),  # WRITE + FUA
        (1, 0, 1024, 512, b"e" * 512),
        (6, 0, 4096, 8192, b""),  # WRITE_ZEROES may punch holes
        (6, 2, 4096, 8192, b""),  # NO_HOLE
        (6, 16, 4096, 8192, b""),  # FAST_ZERO
        (3, 0, 0, 0, b""),  # FLUSH
        (7, 8, 0, 65536, b""),  # BLOCK_STATUS + REQ_ONE
    ]
    assert not server.errors


async def test_close_answers_requests_in_flight_and_sends_nothing_after_disc(
    sockdir: Path,
) -> None:
    seen: list[int] = []

    async def script(conn: FakeConn) -> None:
        await conn.handshake()
        while True:
            req = await conn.request()
            seen.append(req.type)
            if req.type == nbd_fakes.CMD_DISC:
                with contextlib.suppress(TimeoutError):
                    seen.append((await asyncio.wait_for(conn.request(), 0.5)).type)
                return
            await asyncio.sleep(0.1)
            await conn.data(req, b"r" * req.length)

    async with fake_client(sockdir, script, max_in_flight=1) as (server, client):
        reads = [asyncio.create_task(client.read(0, 512)) for _ in range(4)]
        await _wait_until(lambda: client.in_flight == 1)
        await client.close()
        results = await asyncio.gather(*reads, return_exceptions=True)
        assert results[0] == b"r" * 512  # in flight: answered before DISC
        assert all(isinstance(r, NbdConnectionError) for r in results[1:]), results
        assert not client.alive
        with pytest.raises(NbdConnectionError, match="closed"):
            await client.read(0, 512)
        await client.close()  # idempotent
    assert seen == [nbd_fakes.CMD_READ, nbd_fakes.CMD_DISC]
    assert not server.errors


async def test_cancelled_request_never_answered_still_times_out(sockdir: Path) -> None:
    async def script(conn: FakeConn) -> None:
        await conn.handshake()
        await conn.request()  # never answered
        await asyncio.sleep(30)

    async with fake_client(sockdir, script, timeout=0.3, max_in_flight=1) as (_, client):
        first = asyncio.create_task(client.read(0, 512))
        await _wait_until(lambda: client.in_flight == 1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        started = time.monotonic()
        with pytest.raises(NbdTimeoutError, match="cancelled"):  # waits for the slot
            await client.read(512, 512)
        assert time.monotonic() - started < 2
        assert not client.alive and client.in_flight == 0
