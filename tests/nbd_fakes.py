"""Tiny scripted NBD servers on a Unix socket, for testing how the client copes with
servers that misbehave (bad magic, lies about lengths, truncation, silence, ...).

A :class:`FakeServer` runs a *script* coroutine per accepted connection, given a
:class:`FakeConn` with helpers to perform a correct server-side handshake and to read
requests and send replies, so each test states only where the server goes wrong.

The wire constants are spelled out here independently of ``agent.nbd.wire`` on purpose: a
fake that borrowed the client's constants would agree with any mistake in them.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

OPT_ABORT, OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 2, 7, 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_ERR_UNSUP = 0x80000001

# Transmission flags: HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_WRITE_ZEROES
DEFAULT_FLAGS = 0x1 | 0x4 | 0x8 | 0x40

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_BLOCK_STATUS = 0, 1, 2, 3, 7
FLAG_DONE = 1
TYPE_NONE, TYPE_DATA, TYPE_HOLE, TYPE_BLOCK_STATUS = 0, 1, 2, 5
TYPE_ERROR, TYPE_ERROR_OFFSET = 0x8001, 0x8002


@dataclass(frozen=True, slots=True)
class Request:
    flags: int
    type: int
    handle: int
    offset: int
    length: int
    data: bytes


class FakeConn:
    """One accepted connection, seen from the server side."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.structured = False

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def handshake(
        self,
        *,
        size: int = 1 << 20,
        flags: int = DEFAULT_FLAGS,
        contexts: Mapping[str, int] | None = None,
        structured: bool = True,
        block_sizes: tuple[int, int, int] = (1, 4096, 1 << 20),
    ) -> None:
        """A correct fixed-newstyle server handshake, ending when the client sends GO."""
        contexts = {"base:allocation": 7} if contexts is None else contexts
        await self.send(NBDMAGIC + IHAVEOPT + struct.pack(">H", 0b11))
        await self.reader.readexactly(4)  # client flags
        while True:
            magic, option, length = struct.unpack(">8sII", await self.reader.readexactly(16))
            assert magic == IHAVEOPT
            data = await self.reader.readexactly(length)
            if option == OPT_STRUCTURED_REPLY:
                self.structured = structured
                await self.option_reply(option, REP_ACK if structured else REP_ERR_UNSUP)
            elif option == OPT_SET_META_CONTEXT:
                await self._meta_context(data, contexts)
            elif option == OPT_GO:
                await self.option_reply(option, REP_INFO, struct.pack(">HQH", 0, size, flags))
                await self.option_reply(option, REP_INFO, struct.pack(">HIII", 3, *block_sizes))
                await self.option_reply(option, REP_ACK)
                return
            else:
                await self.option_reply(option, REP_ERR_UNSUP)

    async def _meta_context(self, data: bytes, contexts: Mapping[str, int]) -> None:
        (name_len,) = struct.unpack_from(">I", data)
        pos = 4 + name_len
        (count,) = struct.unpack_from(">I", data, pos)
        pos += 4
        for _ in range(count):
            (qlen,) = struct.unpack_from(">I", data, pos)
            query = data[pos + 4 : pos + 4 + qlen].decode()
            pos += 4 + qlen
            if query in contexts:
                payload = struct.pack(">I", contexts[query]) + query.encode()
                await self.option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, payload)
        await self.option_reply(OPT_SET_META_CONTEXT, REP_ACK)

    async def option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        header = struct.pack(">QIII", OPTION_REPLY_MAGIC, option, reply, len(data))
        await self.send(header + data)

    async def request(self) -> Request:
        magic, flags, cmd, handle, offset, length = struct.unpack(
            ">IHHQQI", await self.reader.readexactly(28)
        )
        assert magic == REQUEST_MAGIC, hex(magic)
        data = await self.reader.readexactly(length) if cmd == CMD_WRITE else b""
        return Request(flags, cmd, handle, offset, length, data)

    def chunk_bytes(
        self, handle: int, chunk_type: int, payload: bytes, *, flags: int = FLAG_DONE
    ) -> bytes:
        header = struct.pack(
            ">IHHQI", STRUCTURED_REPLY_MAGIC, flags, chunk_type, handle, len(payload)
        )
        return header + payload

    async def chunk(
        self, handle: int, chunk_type: int, payload: bytes, *, flags: int = FLAG_DONE
    ) -> None:
        await self.send(self.chunk_bytes(handle, chunk_type, payload, flags=flags))

    async def data(self, req: Request, data: bytes, *, offset: int | None = None) -> None:
        """One OFFSET_DATA chunk with DONE."""
        where = req.offset if offset is None else offset
        await self.chunk(req.handle, TYPE_DATA, struct.pack(">Q", where) + data)

    async def simple(self, handle: int, error: int = 0, data: bytes = b"") -> None:
        await self.send(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, handle) + data)

    async def extents(
        self, req: Request, context_id: int, extents: list[tuple[int, int]], *, flags: int = 1
    ) -> None:
        payload = struct.pack(">I", context_id) + b"".join(
            struct.pack(">II", length, status) for length, status in extents
        )
        await self.chunk(req.handle, TYPE_BLOCK_STATUS, payload, flags=flags)


Script = Callable[[FakeConn], Awaitable[None]]


class FakeServer:
    """Serves ``script`` on ``path``; every connection's script runs until it returns
    (then the connection is closed) or the server is stopped."""

    def __init__(self, path: Path, script: Script) -> None:
        self.path = path
        self._script = script
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.errors: list[BaseException] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._script(FakeConn(reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client hung up: expected in most scenarios
        except asyncio.CancelledError:
            pass  # stop(): end quietly (asyncio logs a cancelled connection handler)
        except Exception as exc:  # surfaced by the test via .errors
            self.errors.append(exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()


@contextlib.asynccontextmanager
async def fake_server(path: Path, script: Script) -> AsyncIterator[FakeServer]:
    server = FakeServer(path, script)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
