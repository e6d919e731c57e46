"""The agent's own asyncio NBD client, for reading QEMU's pull-mode backup exports.

A backup reads a domain's disks from the NBD server that libvirt's pull-mode backup
starts inside QEMU, and asks it which ranges are allocated (``base:allocation``) and
which changed since the last checkpoint (``qemu:dirty-bitmap:NAME``). This module is
the client for that: :meth:`NbdClient.connect` performs the fixed-newstyle handshake
and :class:`NbdClient` speaks the transmission phase.

Why our own client rather than a library binding: payloads are received straight into
the caller's (reusable) buffer through :class:`asyncio.BufferedProtocol` with no
intermediate ``bytes``; many requests are in flight on one connection at once (a
demultiplexer hands each reply to its request by handle); block status for dirty
bitmaps is first class; and everything runs on the agent's event loop with a timeout
on every wait on the server.

Failure model (see :mod:`agent.core.errors`):

* the server refuses one request (an error reply): :class:`NbdServerError` with its
  ``errno``; the connection survives;
* the server breaks the protocol (bad magic, unknown handle, a chunk outside its
  request, an absurd length, ...): :class:`NbdProtocolError`, the connection is dead
  and every request in flight fails with it;
* the connection breaks: :class:`NbdConnectionError`, likewise for everyone in flight;
* no reply within ``timeout``: :class:`NbdTimeoutError`, likewise (the request's fate
  is unknown, so nothing after it can be trusted).

A cancelled request does not disturb the others: it stays registered until its reply
arrives (still within ``timeout``), and that reply is read and discarded (from the
moment of cancellation nothing more is written into the caller's buffer). A write
already handed to the transport is sent whole, so the server never sees half a request.

Lengths announced by the server are checked against the request they answer (and a
fixed cap) before anything is allocated or received, so a hostile server can neither
make the client allocate memory nor make it wait for data that will never fit.

The wire format is documented next to the code that speaks it, after the NBD protocol
specification (``doc/proto.md`` of the NetworkBlockDevice/nbd project); all integers
are big-endian.
"""

# ASYNC109: ``timeout`` is part of this API: it bounds every wait on the server, each
# separately, and expiry means NbdTimeoutError (connection dead), not TimeoutError.

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import socket as socket_module
import struct
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Final, Self

from agent.core.errors import (
    NbdConnectionError,
    NbdError,
    NbdProtocolError,
    NbdServerError,
    NbdTimeoutError,
)

# --- Limits ------------------------------------------------------------------------------

MAX_PAYLOAD: Final = 64 * 1024 * 1024
"""The largest read or write this client sends in one request (``ExportInfo.max_block``
never exceeds it), and so the largest data chunk it will accept."""

_DEFAULT_MAX_BLOCK: Final = 32 * 1024 * 1024
"""Without ``NBD_INFO_BLOCK_SIZE``, the spec's interoperable maximum for reads/writes."""

_MAX_OPTION_REPLY: Final = 64 * 1024
"""Handshake replies are small (infos, context names, error strings of <= 4096 bytes)."""

_MAX_ERROR_PAYLOAD: Final = 6 + 4096 + 8 + 1024
"""An error chunk: errno, message length, a message of <= 4096 bytes, an offset (+slack)."""

_MAX_STATUS_PAYLOAD: Final = 4 + 8 * (1 << 18)
"""A block-status chunk: a context id and at most 256 Ki descriptors (QEMU sends <= 128 Ki)."""

_MAX_NAME: Final = 4096
"""The spec's hard limit for strings (export names, context names)."""

_STATUS_STEP: Final = 1 << 31
"""How much :func:`extents` asks for per block-status request (fits the u32 length)."""

_SCRATCH_SIZE: Final = 256 * 1024
_ZEROS: Final = memoryview(bytes(1024 * 1024))

# --- Handshake (fixed newstyle) ----------------------------------------------------------
#
# S: u64 NBDMAGIC, u64 IHAVEOPT, u16 handshake flags
# C: u32 client flags
# Then option haggling; every option and every reply to it:
# C: u64 IHAVEOPT, u32 option, u32 data length, data
# S: u64 OPTION_REPLY_MAGIC, u32 option (echoed), u32 reply type, u32 data length, data
# ending with NBD_OPT_GO, whose final NBD_REP_ACK starts the transmission phase.

NBDMAGIC: Final = 0x4E42444D41474943  # ASCII "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # ASCII "IHAVEOPT"
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9

_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1

# Options.
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_SET_META_CONTEXT: Final = 10

# Option reply types; errors have bit 31 set and may carry a message string.
REP_ACK: Final = 1
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
REP_ERR_BIT: Final = 1 << 31
REP_ERR_UNSUP: Final = REP_ERR_BIT | 1
_REP_ERRORS: Final = {
    REP_ERR_BIT | 1: "NBD_REP_ERR_UNSUP",
    REP_ERR_BIT | 2: "NBD_REP_ERR_POLICY",
    REP_ERR_BIT | 3: "NBD_REP_ERR_INVALID",
    REP_ERR_BIT | 4: "NBD_REP_ERR_PLATFORM",
    REP_ERR_BIT | 5: "NBD_REP_ERR_TLS_REQD",
    REP_ERR_BIT | 6: "NBD_REP_ERR_UNKNOWN",
    REP_ERR_BIT | 7: "NBD_REP_ERR_SHUTDOWN",
    REP_ERR_BIT | 8: "NBD_REP_ERR_BLOCK_SIZE_REQD",
    REP_ERR_BIT | 9: "NBD_REP_ERR_TOO_BIG",
}
_OPTION_NAMES: Final = {
    OPT_GO: "NBD_OPT_GO",
    OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
}

# NBD_REP_INFO payload: u16 info type, then per type:
#   NBD_INFO_EXPORT (0):     u64 export size, u16 transmission flags         (length 12)
#   NBD_INFO_BLOCK_SIZE (3): u32 minimum, u32 preferred, u32 maximum block   (length 14)
INFO_EXPORT: Final = 0
INFO_BLOCK_SIZE: Final = 3
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")

# Transmission flags (u16, from NBD_INFO_EXPORT or the NBD_OPT_EXPORT_NAME reply).
TFLAG_HAS_FLAGS: Final = 1 << 0
TFLAG_READ_ONLY: Final = 1 << 1
TFLAG_SEND_FLUSH: Final = 1 << 2
TFLAG_SEND_FUA: Final = 1 << 3
TFLAG_ROTATIONAL: Final = 1 << 4
TFLAG_SEND_TRIM: Final = 1 << 5
TFLAG_SEND_WRITE_ZEROES: Final = 1 << 6
TFLAG_SEND_DF: Final = 1 << 7
TFLAG_CAN_MULTI_CONN: Final = 1 << 8
TFLAG_SEND_CACHE: Final = 1 << 10
TFLAG_SEND_FAST_ZERO: Final = 1 << 11

# --- Transmission ------------------------------------------------------------------------
#
# C: request:  u32 REQUEST_MAGIC, u16 command flags, u16 type, u64 handle,
#              u64 offset, u32 length, then `length` bytes of data for NBD_CMD_WRITE
# S: simple reply: u32 SIMPLE_REPLY_MAGIC, u32 error, u64 handle
#              (followed by `length` bytes of data for a successful NBD_CMD_READ, only
#              when structured replies were not negotiated)
# S: structured reply chunk: u32 STRUCTURED_REPLY_MAGIC, u16 flags, u16 type,
#              u64 handle, u32 payload length, payload; NBD_REPLY_FLAG_DONE ends a reply.
# Replies may come in any order and chunks of different replies may interleave.

REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

_REQUEST = struct.Struct(">IHHQQI")  # 28 bytes
_SIMPLE_REPLY = struct.Struct(">IIQ")  # 16 bytes
_CHUNK_HEAD = struct.Struct(">IHHQI")  # 20 bytes: the first 16 are read before the magic is known
_OFFSET = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")  # offset, hole size
_ERROR = struct.Struct(">IH")  # errno, message length
_DESCRIPTOR = struct.Struct(">II")  # extent length, status flags

CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7
_COMMAND_NAMES: Final = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_FLUSH: "flush",
    CMD_WRITE_ZEROES: "write-zeroes",
    CMD_BLOCK_STATUS: "block-status",
}

# Command flags.
CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4

# Structured reply chunk flags and types. Error types have bit 15 set and start with
# u32 errno, u16 message length, message; NBD_REPLY_TYPE_ERROR_OFFSET adds a u64 offset.
REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0  # no payload; only as the final chunk
REPLY_TYPE_OFFSET_DATA: Final = 1  # u64 offset, data (>= 1 byte)
REPLY_TYPE_OFFSET_HOLE: Final = 2  # u64 offset, u32 hole size: reads as zeroes
REPLY_TYPE_BLOCK_STATUS: Final = 5  # u32 context id, then (u32 length, u32 flags)+
REPLY_TYPE_ERROR_BIT: Final = 1 << 15
REPLY_TYPE_ERROR: Final = REPLY_TYPE_ERROR_BIT | 1
REPLY_TYPE_ERROR_OFFSET: Final = REPLY_TYPE_ERROR_BIT | 2

# Error values (reply `error` fields and error chunks).
NBD_EPERM: Final = 1
NBD_EIO: Final = 5
NBD_ENOMEM: Final = 12
NBD_EINVAL: Final = 22
NBD_ENOSPC: Final = 28
NBD_EOVERFLOW: Final = 75
NBD_ENOTSUP: Final = 95
NBD_ESHUTDOWN: Final = 108
_ERRNO_NAMES: Final = {
    NBD_EPERM: "EPERM",
    NBD_EIO: "EIO",
    NBD_ENOMEM: "ENOMEM",
    NBD_EINVAL: "EINVAL",
    NBD_ENOSPC: "ENOSPC",
    NBD_EOVERFLOW: "EOVERFLOW",
    NBD_ENOTSUP: "ENOTSUP",
    NBD_ESHUTDOWN: "ESHUTDOWN",
}

# Extent flags: base:allocation, and QEMU's qemu:dirty-bitmap:NAME contexts.
STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1
STATE_DIRTY: Final = 1 << 0

BASE_ALLOCATION: Final = "base:allocation"


# --- Public value types ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake said about the export.

    ``max_block`` is the largest read/write this client will send: the server's maximum,
    capped at :data:`MAX_PAYLOAD` (32 MiB when the server gave no block sizes).
    ``meta_contexts`` maps each granted metadata context to the id the server chose.
    """

    name: str
    size: int
    flags: int
    min_block: int
    preferred_block: int
    max_block: int
    meta_contexts: Mapping[str, int] = field(default_factory=dict, hash=False)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TFLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return bool(self.flags & TFLAG_SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return bool(self.flags & TFLAG_SEND_FUA)

    @property
    def can_write_zeroes(self) -> bool:
        return bool(self.flags & TFLAG_SEND_WRITE_ZEROES)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & TFLAG_CAN_MULTI_CONN)

    @property
    def can_fast_zero(self) -> bool:
        return bool(self.flags & TFLAG_SEND_FAST_ZERO)


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes with one status.

    ``flags`` depends on the context: for ``base:allocation`` 1 = HOLE, 2 = ZERO; for
    ``qemu:dirty-bitmap:NAME`` 1 = DIRTY.
    """

    offset: int
    length: int
    flags: int


# --- The byte pump -----------------------------------------------------------------------


def _unexpected_data() -> None:
    raise NbdProtocolError("server sent data when none was expected")


class _Wire(asyncio.BufferedProtocol):
    """Moves bytes from the socket into whatever buffer the reader wants filled next.

    The reader sets a *target* (a memoryview: a small header buffer, or a slice of the
    caller's buffer for data) and a callback run once it is full; ``get_buffer`` hands
    the kernel exactly the unfilled rest, so ``recv_into`` writes payloads in place and
    never reads past the message part being received. A *skip* target reads and drops
    bytes (the reply of a cancelled request). During the handshake reading is paused
    whenever nothing is awaited.
    """

    def __init__(self, server: str) -> None:
        self._loop = asyncio.get_running_loop()
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self._scratch = memoryview(bytearray(_SCRATCH_SIZE))
        self._target = self._scratch[:1]
        self._pos = 0
        self._end = 1
        self._skip = 0
        self._on_full: Callable[[], None] = _unexpected_data
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.on_error: Callable[[NbdError], None] = self._fail_waiter
        self.on_lost: Callable[[BaseException | None], None] = self._lost_in_handshake

    # Targets.

    def set_target(self, view: memoryview, on_full: Callable[[], None]) -> None:
        """Fill ``view`` (non-empty) from the socket, then call ``on_full``."""
        self._target, self._pos, self._end, self._skip = view, 0, len(view), 0
        self._on_full = on_full

    def set_skip(self, count: int, on_full: Callable[[], None]) -> None:
        """Read and drop ``count`` (> 0) bytes, then call ``on_full``."""
        self._target, self._skip, self._on_full = self._scratch[:1], count, on_full

    def redirect_to_skip(self) -> None:
        """Drop the rest of the current target instead of storing it (same callback)."""
        if not self._skip:
            self._skip = self._end - self._pos
            self._target = self._scratch[:1]

    @property
    def at_message_start(self) -> bool:
        return self._pos == 0 and not self._skip

    @property
    def filled(self) -> memoryview:
        """The target whose ``on_full`` callback is running."""
        return self._target

    # asyncio.BufferedProtocol.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        _enlarge_buffers(transport)
        transport.pause_reading()  # nothing is expected until the handshake asks

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._skip:
            return self._scratch[: self._skip]
        return self._target[self._pos :]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._skip:
                self._skip -= nbytes
                if self._skip:
                    return
            else:
                self._pos += nbytes
                if self._pos < self._end:
                    return
            self._on_full()
        except NbdError as exc:
            self.on_error(exc)
        except Exception as exc:  # a parsing bug must still kill the connection cleanly
            error = NbdProtocolError(
                f"{self.server}: cannot parse reply: {exc!r}", server=self.server
            )
            error.__cause__ = exc
            self.on_error(error)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake_drainers()
        self.on_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drainers()

    # Writing.

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport's send buffer is below its high-water mark."""
        if not self._write_paused or self.lost.done():
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._drain_waiters.remove(waiter)

    def _wake_drainers(self) -> None:
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # Handshake reads.

    async def read_exact(self, count: int) -> bytes:
        """Receive exactly ``count`` bytes (handshake only: reads are paused after)."""
        if count == 0:
            return b""
        if self.lost.done() or self.transport is None:
            raise NbdConnectionError(f"{self.server}: connection closed", server=self.server)
        buf = bytearray(count)
        waiter = self._loop.create_future()
        self._waiter = waiter

        def full() -> None:
            assert self.transport is not None
            self.transport.pause_reading()
            self.set_target(self._scratch[:1], _unexpected_data)
            if not waiter.done():
                waiter.set_result(None)

        self.set_target(memoryview(buf), full)
        self.transport.resume_reading()
        await waiter
        return bytes(buf)

    def _fail_waiter(self, exc: NbdError) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.abort()

    def _lost_in_handshake(self, exc: BaseException | None) -> None:
        error = NbdConnectionError(
            f"{self.server}: server closed the connection during the handshake", server=self.server
        )
        error.__cause__ = exc
        self._fail_waiter(error)


# --- Handshake ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Negotiated:
    structured: bool
    size: int
    flags: int
    block_sizes: tuple[int, int, int]
    contexts: Mapping[str, int]


class _Handshake:
    """Fixed-newstyle negotiation: structured replies, meta contexts, then NBD_OPT_GO."""

    def __init__(self, wire: _Wire, export: str) -> None:
        self._wire = wire
        self._server = wire.server
        self._export = export
        self._name = export.encode()
        if len(self._name) > _MAX_NAME:
            raise ValueError(f"export name longer than {_MAX_NAME} bytes: {export[:64]!r}...")

    async def run(self, contexts: Sequence[str]) -> _Negotiated:
        no_zeroes = await self._greeting()
        structured = await self._structured_reply()
        granted: dict[str, int] = {}
        if contexts:
            if not structured:
                raise self._error(
                    f"cannot use meta contexts {list(contexts)}: server has no structured replies"
                )
            granted = await self._set_meta_context(contexts)
        size, flags, block_sizes = await self._go(no_zeroes)
        return _Negotiated(structured, size, flags, block_sizes, MappingProxyType(granted))

    def soft_abort(self) -> None:
        """Tell the server we are leaving (NBD_OPT_ABORT), without waiting for its reply."""
        with contextlib.suppress(Exception):
            self._wire.write(_OPTION.pack(IHAVEOPT, OPT_ABORT, 0))
            assert self._wire.transport is not None
            self._wire.transport.close()  # flushes the abort first

    def _error(self, what: str) -> NbdConnectionError:
        return NbdConnectionError(
            f"{self._server}: export {self._export!r}: {what}", server=self._server
        )

    def _protocol(self, what: str) -> NbdProtocolError:
        return NbdProtocolError(f"{self._server}: handshake: {what}", server=self._server)

    async def _greeting(self) -> bool:
        """Check the server's magic numbers; send our flags; return whether NO_ZEROES is on."""
        magic, ihaveopt, flags = _GREETING.unpack(await self._wire.read_exact(_GREETING.size))
        if magic != NBDMAGIC:
            raise self._protocol(f"bad magic 0x{magic:016x} (not an NBD server?)")
        if ihaveopt != IHAVEOPT:
            raise self._protocol(f"bad option magic 0x{ihaveopt:016x} (oldstyle server?)")
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise self._error("server does not support fixed-newstyle negotiation")
        client_flags = FLAG_C_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES and FLAG_C_NO_ZEROES)
        self._wire.write(_U32.pack(client_flags))
        return bool(client_flags & FLAG_C_NO_ZEROES)

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._wire.write(_OPTION.pack(IHAVEOPT, option, len(data)) + data)

    async def _reply(self, option: int) -> tuple[int, bytes]:
        """One option reply: (reply type, data); the length is checked before reading."""
        raw = await self._wire.read_exact(_OPTION_REPLY.size)
        magic, echoed, reply_type, length = _OPTION_REPLY.unpack(raw)
        if magic != OPTION_REPLY_MAGIC:
            raise self._protocol(f"bad option reply magic 0x{magic:016x}")
        if echoed != option:
            raise self._protocol(f"reply for option {echoed} while waiting for option {option}")
        if length > _MAX_OPTION_REPLY:
            raise self._protocol(f"option reply of {length} bytes (limit {_MAX_OPTION_REPLY})")
        return reply_type, await self._wire.read_exact(length)

    def _refused(self, option: int, reply_type: int, data: bytes) -> NbdConnectionError:
        name = _REP_ERRORS.get(reply_type, f"error 0x{reply_type:08x}")
        message = data.decode("utf-8", "replace")
        detail = f"{name}: {message}" if message else name
        return self._error(f"{_OPTION_NAMES.get(option, option)} refused: {detail}")

    async def _structured_reply(self) -> bool:
        self._send_option(OPT_STRUCTURED_REPLY)
        reply_type, data = await self._reply(OPT_STRUCTURED_REPLY)
        if reply_type == REP_ACK:
            return True
        if reply_type == REP_ERR_UNSUP:
            return False
        if reply_type & REP_ERR_BIT:
            raise self._refused(OPT_STRUCTURED_REPLY, reply_type, data)
        raise self._protocol(f"unexpected reply type {reply_type} to NBD_OPT_STRUCTURED_REPLY")

    async def _set_meta_context(self, contexts: Sequence[str]) -> dict[str, int]:
        # Data: u32 export name length, export name, u32 number of queries,
        #       then per query: u32 length, query string.
        # Replies: one NBD_REP_META_CONTEXT (u32 context id, name) per granted context,
        #          then NBD_REP_ACK.
        data = bytearray(_U32.pack(len(self._name)) + self._name + _U32.pack(len(contexts)))
        for query in contexts:
            encoded = query.encode()
            if len(encoded) > _MAX_NAME:
                raise ValueError(f"meta context name longer than {_MAX_NAME} bytes")
            data += _U32.pack(len(encoded)) + encoded
        self._send_option(OPT_SET_META_CONTEXT, bytes(data))
        granted: dict[str, int] = {}
        while True:
            reply_type, payload = await self._reply(OPT_SET_META_CONTEXT)
            if reply_type == REP_ACK:
                break
            if reply_type & REP_ERR_BIT:
                raise self._refused(OPT_SET_META_CONTEXT, reply_type, payload)
            if reply_type != REP_META_CONTEXT or len(payload) < 5:
                raise self._protocol(f"bad reply (type {reply_type}) to NBD_OPT_SET_META_CONTEXT")
            (context_id,) = _U32.unpack_from(payload)
            granted[self._decode(payload[4:], "meta context name")] = context_id
        missing = [c for c in contexts if c not in granted]
        if missing:
            raise self._error(f"server does not offer meta context(s) {missing}")
        return granted

    def _decode(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise self._protocol(f"{what} is not UTF-8") from exc

    async def _go(self, no_zeroes: bool) -> tuple[int, int, tuple[int, int, int]]:
        # Data: u32 name length, name, u16 number of info requests, u16 info types...
        # Replies: NBD_REP_INFO* then NBD_REP_ACK (transmission starts), or an error.
        self._send_option(
            OPT_GO,
            _U32.pack(len(self._name)) + self._name + _U16.pack(1) + _U16.pack(INFO_BLOCK_SIZE),
        )
        export: tuple[int, int] | None = None
        block_sizes = (1, 4096, _DEFAULT_MAX_BLOCK)
        while True:
            reply_type, data = await self._reply(OPT_GO)
            if reply_type == REP_ACK:
                break
            if reply_type == REP_ERR_UNSUP:
                return (*await self._export_name(no_zeroes), block_sizes)
            if reply_type & REP_ERR_BIT:
                raise self._refused(OPT_GO, reply_type, data)
            if reply_type != REP_INFO or len(data) < 2:
                raise self._protocol(f"bad reply (type {reply_type}) to NBD_OPT_GO")
            (info,) = _U16.unpack_from(data)
            if info == INFO_EXPORT:
                export = self._info_export(data)
            elif info == INFO_BLOCK_SIZE:
                block_sizes = self._info_block_size(data)
        if export is None:
            raise self._protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
        return (*export, block_sizes)

    def _info_export(self, data: bytes) -> tuple[int, int]:
        if len(data) != _INFO_EXPORT.size:
            raise self._protocol(f"NBD_INFO_EXPORT of {len(data)} bytes")
        _, size, flags = _INFO_EXPORT.unpack(data)
        return size, flags

    def _info_block_size(self, data: bytes) -> tuple[int, int, int]:
        if len(data) != _INFO_BLOCK_SIZE.size:
            raise self._protocol(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes")
        _, minimum, preferred, maximum = _INFO_BLOCK_SIZE.unpack(data)
        power_of_two = minimum > 0 and minimum & (minimum - 1) == 0
        if not power_of_two or minimum > 65536 or preferred < minimum or maximum < minimum:
            raise self._protocol(f"nonsensical block sizes {minimum}/{preferred}/{maximum}")
        return minimum, preferred, maximum

    async def _export_name(self, no_zeroes: bool) -> tuple[int, int]:
        # Old servers: C: NBD_OPT_EXPORT_NAME with the name; S: u64 size, u16 flags,
        # 124 zero bytes unless NO_ZEROES. An unknown export just closes the connection.
        self._send_option(OPT_EXPORT_NAME, self._name)
        raw = await self._wire.read_exact(10 if no_zeroes else 134)
        size, flags = struct.unpack_from(">QH", raw)
        return size, flags


# --- Requests and the reply demultiplexer ------------------------------------------------


class _Request:
    """One request in flight; the demultiplexer fills it in as its reply chunks arrive."""

    __slots__ = (
        "cmd",
        "context_id",
        "covered",
        "deadline",
        "dest",
        "error",
        "extents",
        "flags",
        "future",
        "handle",
        "length",
        "offset",
        "seen_contexts",
        "spans",
    )

    def __init__(
        self,
        cmd: int,
        offset: int,
        length: int,
        *,
        flags: int = 0,
        dest: memoryview | None = None,
        context_id: int = -1,
    ) -> None:
        self.cmd = cmd
        self.flags = flags
        self.offset = offset
        self.length = length
        self.dest = dest  # None once abandoned: its data is then read and dropped
        self.context_id = context_id
        self.handle = 0
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: NbdServerError | None = None
        self.extents: list[Extent] | None = None
        self.seen_contexts: set[int] = set()
        self.spans: list[tuple[int, int]] = []  # received content, relative, sorted
        self.covered = 0
        self.deadline: asyncio.TimerHandle | None = None  # once abandoned

    def describe(self) -> str:
        return f"{_COMMAND_NAMES.get(self.cmd, self.cmd)} of {self.length} bytes at {self.offset}"

    def claim(self, start: int, end: int) -> bool:
        """Record content [start, end) of the request; False if it overlaps earlier content."""
        i = bisect.bisect_left(self.spans, (start, end))
        if i > 0 and self.spans[i - 1][1] > start:
            return False
        if i < len(self.spans) and self.spans[i][0] < end:
            return False
        self.spans.insert(i, (start, end))
        self.covered += end - start
        return True


def _zero_fill(view: memoryview) -> None:
    step = len(_ZEROS)
    for start in range(0, len(view), step):
        part = view[start : start + step]
        part[:] = _ZEROS[: len(part)]


class _Session:
    """The transmission phase of one connection: sends requests, demultiplexes replies.

    Reply parsing is a state machine driven by :class:`_Wire` callbacks: a 16-byte head
    (enough for a simple reply, and for a chunk's magic, flags, type and handle), then
    the rest of a chunk header, then its payload. Each step validates before it sets
    the next target, and any violation raises :class:`NbdProtocolError`, which kills the
    connection (:meth:`fail`).
    """

    def __init__(
        self,
        wire: _Wire,
        export: str,
        negotiated: _Negotiated,
        *,
        timeout: float,
        max_in_flight: int,
    ) -> None:
        self._wire = wire
        self._server = wire.server
        self._export = export
        self._structured = negotiated.structured
        self._context_ids = frozenset(negotiated.contexts.values())
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_in_flight)
        self.pending: dict[int, _Request] = {}
        self._next_handle = 0
        self.dead: NbdConnectionError | NbdProtocolError | NbdTimeoutError | None = None
        self._head = bytearray(32)
        self._view = memoryview(self._head)
        self._chunk_req: _Request | None = None  # request whose chunk is being received
        self._chunk_flags = 0
        self._chunk_type = 0
        self._chunk_length = 0
        self._receiving_into: _Request | None = None  # request whose data is being received
        self.closing = False  # set by close(): nothing may be sent after NBD_CMD_DISC
        self._idle = asyncio.Event()
        self._idle.set()
        wire.on_error = self.fail
        wire.on_lost = self._lost
        self._expect_head()
        assert wire.transport is not None
        wire.transport.resume_reading()
        if wire.lost.done():  # lost between the handshake and now
            self._lost(None)

    # Submitting.

    async def call(
        self, req: _Request, payload: bytes | bytearray | memoryview | None = None
    ) -> _Request:
        """Send ``req`` and wait for its reply; raises the reply's error if any."""
        self.check_alive()
        # No timeout of its own: a slot frees when a request in flight completes, times
        # out (which kills the connection) or the connection dies; all are bounded.
        await self._slots.acquire()
        try:
            self.check_alive()
        except NbdError:
            self._slots.release()
            raise
        self._send(req, payload)
        try:
            async with asyncio.timeout(self._timeout):
                await self._wire.drain()
                await req.future
        except TimeoutError as exc:
            self.fail(
                NbdTimeoutError(
                    f"{self._server}: no reply to {req.describe()} within {self._timeout} s",
                    server=self._server,
                )
            )
            raise self.error() from exc
        except asyncio.CancelledError:
            self._abandon(req)
            raise
        return req

    def _send(self, req: _Request, payload: bytes | bytearray | memoryview | None) -> None:
        handle = self._next_handle
        while handle in self.pending:
            handle = (handle + 1) & 0xFFFF_FFFF_FFFF_FFFF
        self._next_handle = (handle + 1) & 0xFFFF_FFFF_FFFF_FFFF
        req.handle = handle
        self.pending[handle] = req
        self._idle.clear()
        self._wire.write(
            _REQUEST.pack(REQUEST_MAGIC, req.flags, req.cmd, handle, req.offset, req.length)
        )
        if payload is not None:
            self._wire.write(payload)  # sent whole even if the caller is cancelled now

    def _abandon(self, req: _Request) -> None:
        """The caller gave up: keep the request registered but drop its reply.

        Its slot stays taken until the reply arrives, so the reply still has to come
        within ``timeout`` (from now), or the connection is declared dead.
        """
        if req.future.done() and not req.future.cancelled():
            req.future.exception()  # completed just as it was cancelled: mark it seen
        req.future.cancel()
        if self.pending.get(req.handle) is req and req.dest is not None:
            req.dest = None
            if self._receiving_into is req:
                self._wire.redirect_to_skip()
            loop = asyncio.get_running_loop()
            req.deadline = loop.call_later(self._timeout, self._abandoned_too_long, req)

    def _abandoned_too_long(self, req: _Request) -> None:
        if self.pending.get(req.handle) is req:
            message = (
                f"{self._server}: no reply to cancelled {req.describe()} within {self._timeout} s"
            )
            self.fail(NbdTimeoutError(message, server=self._server))

    async def wait_idle(self) -> None:
        """Until no request is in flight (abandoned ones included)."""
        await self._idle.wait()

    def send_disconnect(self) -> None:
        self._wire.write(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))

    # Death.

    def check_alive(self) -> None:
        if self.dead is not None:
            raise self.error()
        if self.closing:
            raise NbdConnectionError(f"{self._server}: client is closed", server=self._server)

    def error(self) -> NbdError:
        """A fresh copy of the error that killed the connection (one per raiser)."""
        assert self.dead is not None
        copy = type(self.dead)(str(self.dead), server=self._server)
        copy.__cause__ = self.dead.__cause__
        return copy

    def fail(self, exc: NbdError) -> None:
        """Kill the connection: every request in flight fails with ``exc``."""
        if self.dead is None:
            if isinstance(exc, NbdServerError):  # cannot happen; keep the type honest
                exc = NbdProtocolError(str(exc), server=self._server)
            assert isinstance(exc, NbdConnectionError | NbdProtocolError | NbdTimeoutError)
            self.dead = exc
        pending, self.pending = self.pending, {}
        self._idle.set()
        for req in pending.values():
            if req.deadline is not None:
                req.deadline.cancel()
            self._slots.release()
            if not req.future.done():
                req.future.set_exception(self.error())
        self._wire.abort()

    def _lost(self, exc: BaseException | None) -> None:
        if self.dead is None:
            where = "in the middle of a reply" if not self._wire.at_message_start else ""
            message = f"{self._server}: server closed the connection {where}".rstrip()
            error = NbdConnectionError(message, server=self._server)
            error.__cause__ = exc
            self.fail(error)

    def _protocol(self, what: str) -> NbdProtocolError:
        return NbdProtocolError(f"{self._server}: protocol violation: {what}", server=self._server)

    # Reply state machine.

    def _expect_head(self) -> None:
        self._wire.set_target(self._view[:16], self._on_head)

    def _on_head(self) -> None:
        (magic,) = _U32.unpack_from(self._head)
        if magic == SIMPLE_REPLY_MAGIC:
            self._on_simple_reply()
        elif magic == STRUCTURED_REPLY_MAGIC:
            if not self._structured:
                raise self._protocol(
                    "structured reply chunk, but structured replies were not negotiated"
                )
            self._wire.set_target(self._view[16:20], self._on_chunk_head)
        else:
            raise self._protocol(f"bad reply magic 0x{magic:08x}")

    def _lookup(self, handle: int) -> _Request:
        req = self.pending.get(handle)
        if req is None:
            raise self._protocol(f"reply for unknown handle 0x{handle:016x}")
        return req

    def _on_simple_reply(self) -> None:
        _, error, handle = _SIMPLE_REPLY.unpack_from(self._head)
        req = self._lookup(handle)
        if req.cmd == CMD_READ and self._structured:
            raise self._protocol("simple reply to a read after structured replies were negotiated")
        if error:
            req.error = self._server_error(req, error, "")
        elif req.cmd == CMD_BLOCK_STATUS:
            raise self._protocol("simple reply to a successful block-status request")
        elif req.cmd == CMD_READ:  # the data follows, exactly `length` bytes
            req.claim(0, req.length)
            self._receive(req, 0, req.length, lambda: self._finish_simple(req))
            return
        self._finish_simple(req)

    def _finish_simple(self, req: _Request) -> None:
        self._receiving_into = None
        self._complete(req)
        self._expect_head()

    def _on_chunk_head(self) -> None:
        _, flags, chunk_type, handle, length = _CHUNK_HEAD.unpack_from(self._head)
        req = self._lookup(handle)
        self._chunk_req, self._chunk_flags, self._chunk_type, self._chunk_length = (
            req,
            flags,
            chunk_type,
            length,
        )
        if chunk_type == REPLY_TYPE_NONE:
            if length != 0 or not flags & REPLY_FLAG_DONE:
                raise self._protocol(f"NBD_REPLY_TYPE_NONE with length {length}, flags 0x{flags:x}")
            self._chunk_done()
        elif chunk_type == REPLY_TYPE_OFFSET_DATA:
            self._expect_for(req, CMD_READ, "data", 9 <= length <= 8 + req.length)
            self._wire.set_target(self._view[20:28], self._on_data_offset)
        elif chunk_type == REPLY_TYPE_OFFSET_HOLE:
            self._expect_for(req, CMD_READ, "hole", length == _HOLE.size)
            self._wire.set_target(self._view[20:32], self._on_hole)
        elif chunk_type == REPLY_TYPE_BLOCK_STATUS:
            valid = 12 <= length <= _MAX_STATUS_PAYLOAD and (length - 4) % 8 == 0
            self._expect_for(req, CMD_BLOCK_STATUS, "block-status", valid)
            self._wire.set_target(memoryview(bytearray(length)), self._on_block_status)
        elif chunk_type & REPLY_TYPE_ERROR_BIT:
            minimum = 14 if chunk_type == REPLY_TYPE_ERROR_OFFSET else 6
            self._expect_for(req, req.cmd, "error", minimum <= length <= _MAX_ERROR_PAYLOAD)
            self._wire.set_target(memoryview(bytearray(length)), self._on_error_chunk)
        else:
            raise self._protocol(f"unknown reply chunk type {chunk_type} for {req.describe()}")

    def _expect_for(self, req: _Request, cmd: int, kind: str, length_ok: bool) -> None:
        if req.cmd != cmd:
            raise self._protocol(f"{kind} chunk in the reply to {req.describe()}")
        if not length_ok:
            raise self._protocol(f"{kind} chunk of {self._chunk_length} bytes for {req.describe()}")

    def _relative(self, req: _Request, offset: int, length: int, kind: str) -> int:
        """``offset`` relative to the request, after checking [offset, +length) lies inside it
        and overlaps no earlier content."""
        start = offset - req.offset
        if start < 0 or start + length > req.length or not req.claim(start, start + length):
            raise self._protocol(
                f"{kind} chunk [{offset}, +{length}) outside or overlapping {req.describe()}"
            )
        return start

    def _on_data_offset(self) -> None:
        req = self._chunk_req
        assert req is not None
        (offset,) = _OFFSET.unpack_from(self._head, 20)
        length = self._chunk_length - 8
        start = self._relative(req, offset, length, "data")
        self._receive(req, start, length, self._chunk_done)

    def _receive(self, req: _Request, start: int, length: int, then: Callable[[], None]) -> None:
        """Receive ``length`` data bytes straight into the caller's buffer (or drop them)."""
        if req.dest is None:
            self._wire.set_skip(length, then)
        else:
            self._receiving_into = req
            self._wire.set_target(req.dest[start : start + length], then)

    def _on_hole(self) -> None:
        req = self._chunk_req
        assert req is not None
        offset, size = _HOLE.unpack_from(self._head, 20)
        if size == 0:
            raise self._protocol("hole chunk of size 0")
        start = self._relative(req, offset, size, "hole")
        if req.dest is not None:
            _zero_fill(req.dest[start : start + size])
        self._chunk_done()

    def _on_block_status(self) -> None:
        req = self._chunk_req
        assert req is not None
        payload = self._wire.filled
        (context_id,) = _U32.unpack_from(payload)
        if context_id not in self._context_ids:
            raise self._protocol(
                f"block status for context id {context_id}, which was never granted"
            )
        if context_id in req.seen_contexts:
            raise self._protocol(f"two block-status chunks for context id {context_id}")
        req.seen_contexts.add(context_id)
        extents = self._parse_extents(req, payload[4:])
        if context_id == req.context_id:
            req.extents = extents
        self._chunk_done()

    def _parse_extents(self, req: _Request, descriptors: memoryview) -> list[Extent]:
        """Decode descriptors; only the last may reach past the request (it is clipped)."""
        count = len(descriptors) // _DESCRIPTOR.size
        if req.flags & CMD_FLAG_REQ_ONE and count != 1:
            raise self._protocol(f"{count} extents in reply to a REQ_ONE block-status request")
        extents: list[Extent] = []
        pos, end = req.offset, req.offset + req.length
        for size, flags in _DESCRIPTOR.iter_unpack(descriptors):
            if size == 0 or pos >= end:
                raise self._protocol(f"extent of {size} bytes at {pos} for {req.describe()}")
            if req.flags & CMD_FLAG_REQ_ONE and size > req.length:
                raise self._protocol(f"REQ_ONE extent of {size} bytes for {req.describe()}")
            clipped = min(size, end - pos)
            extents.append(Extent(pos, clipped, flags))
            pos += clipped
        return extents

    def _on_error_chunk(self) -> None:
        req = self._chunk_req
        assert req is not None
        payload = self._wire.filled
        errno, message_length = _ERROR.unpack_from(payload)
        tail = 8 if self._chunk_type == REPLY_TYPE_ERROR_OFFSET else 0
        if errno == 0 or 6 + message_length + tail > len(payload):
            raise self._protocol(
                f"error chunk with errno {errno}, message of {message_length} bytes"
            )
        message = bytes(payload[6 : 6 + message_length]).decode("utf-8", "replace")
        if tail:
            (offset,) = _OFFSET.unpack_from(payload, 6 + message_length)
            if not req.offset <= offset < req.offset + max(req.length, 1):
                raise self._protocol(f"error offset {offset} outside {req.describe()}")
            message = f"{message} (at offset {offset})" if message else f"at offset {offset}"
        if req.error is None:
            req.error = self._server_error(req, errno, message)
        self._chunk_done()

    def _chunk_done(self) -> None:
        req, self._chunk_req = self._chunk_req, None
        self._receiving_into = None
        assert req is not None
        if self._chunk_flags & REPLY_FLAG_DONE:
            self._complete(req)
        self._expect_head()

    def _complete(self, req: _Request) -> None:
        """The reply is whole: check it says everything it must, then hand it over."""
        if req.error is None:
            if req.cmd == CMD_READ and req.covered != req.length:
                raise self._protocol(f"reply to {req.describe()} covers only {req.covered} bytes")
            if req.cmd == CMD_BLOCK_STATUS and req.context_id not in req.seen_contexts:
                raise self._protocol(f"reply to {req.describe()} lacks the requested context")
        del self.pending[req.handle]
        if req.deadline is not None:
            req.deadline.cancel()
        if not self.pending:
            self._idle.set()
        self._slots.release()
        if req.future.done():  # abandoned by its caller
            return
        if req.error is not None:
            req.future.set_exception(req.error)
        else:
            req.future.set_result(None)

    def _server_error(self, req: _Request, errno: int, message: str) -> NbdServerError:
        name = _ERRNO_NAMES.get(errno, "unknown error")
        text = (
            f"{self._server}: {req.describe()} on export {self._export!r} failed: {name} ({errno})"
        )
        if message:
            text = f"{text}: {message}"
        return NbdServerError(text, errno=errno, server=self._server)


# --- The client --------------------------------------------------------------------------


def _byte_view(buffer: memoryview | bytearray) -> memoryview:
    view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
    if view.readonly:
        raise ValueError("read_into needs a writable buffer")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


SOCKET_BUFFER = 4 * 1024 * 1024


def _enlarge_buffers(transport: asyncio.Transport) -> None:
    """Let a whole request's payload sit in the kernel: fewer wake-ups and syscalls."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for option in (socket_module.SO_SNDBUF, socket_module.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket_module.SOL_SOCKET, option, SOCKET_BUFFER)


def _describe(socket_path: str | Path | None, host: str | None, port: int | None) -> str:
    if (socket_path is None) == (host is None):
        raise ValueError("give either socket_path or host (and port)")
    if socket_path is not None:
        return f"unix:{socket_path}"
    return f"{host}:{port if port is not None else 10809}"


async def _open(
    wire: _Wire, socket_path: str | Path | None, host: str | None, port: int | None
) -> None:
    loop = asyncio.get_running_loop()
    try:
        if socket_path is not None:
            await loop.create_unix_connection(lambda: wire, str(socket_path))
        else:
            assert host is not None
            await loop.create_connection(lambda: wire, host, port if port is not None else 10809)
    except OSError as exc:
        raise NbdConnectionError(
            f"{wire.server}: cannot connect: {exc}", server=wire.server
        ) from exc


class NbdClient:
    """One NBD connection in the transmission phase; see the module docstring.

    Create with :meth:`connect`; close with :meth:`close` or ``async with``. Requests
    may be issued concurrently from many tasks; at most ``max_in_flight`` are on the
    wire at once, the others wait for a slot.
    """

    def __init__(self, wire: _Wire, info: ExportInfo, session: _Session, timeout: float) -> None:
        self.info = info
        self.server = wire.server
        self._wire = wire
        self._session = session
        self._timeout = timeout
        self._closed = False

    @classmethod
    async def connect(
        cls,
        *,
        socket_path: str | Path | None = None,
        host: str | None = None,
        port: int | None = None,
        export: str = "",
        meta_contexts: Sequence[str] = (),
        timeout: float = 30.0,
        max_in_flight: int = 16,
    ) -> NbdClient:
        """Connect and negotiate ``export``, selecting ``meta_contexts``.

        Raises :class:`NbdConnectionError` if the server cannot be reached, refuses the
        export (the message names it and the server's error) or lacks a requested meta
        context; :class:`NbdProtocolError` if it speaks something else than NBD; and
        :class:`NbdTimeoutError` if all that takes longer than ``timeout`` seconds.
        """
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        wire = _Wire(_describe(socket_path, host, port))
        handshake = _Handshake(wire, export)
        try:
            async with asyncio.timeout(timeout):
                await _open(wire, socket_path, host, port)
                negotiated = await handshake.run(meta_contexts)
        except TimeoutError as exc:
            wire.abort()
            message = (
                f"{wire.server}: no answer within {timeout} s while negotiating export {export!r}"
            )
            raise NbdTimeoutError(message, server=wire.server) from exc
        except NbdConnectionError:
            handshake.soft_abort()
            raise
        except BaseException:
            wire.abort()
            raise
        minimum, preferred, maximum = negotiated.block_sizes
        info = ExportInfo(
            name=export,
            size=negotiated.size,
            flags=negotiated.flags,
            min_block=minimum,
            preferred_block=preferred,
            max_block=min(maximum, MAX_PAYLOAD),
            meta_contexts=negotiated.contexts,
        )
        session = _Session(wire, export, negotiated, timeout=timeout, max_in_flight=max_in_flight)
        return cls(wire, info, session, timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def alive(self) -> bool:
        """False once the connection died or was closed."""
        return self._session.dead is None and not self._session.closing

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered (including abandoned ones)."""
        return len(self._session.pending)

    # Argument checks.

    def _check(self, offset: int, length: int, *, limit: int) -> None:
        self._session.check_alive()
        if offset < 0 or length <= 0 or length > limit or offset + length > 0xFFFF_FFFF_FFFF_FFFF:
            raise ValueError(f"bad request: offset {offset}, length {length} (limit {limit})")
        minimum = self.info.min_block
        if offset % minimum or length % minimum:
            raise ValueError(f"offset {offset} / length {length} not aligned to {minimum} bytes")

    def _unsupported(self, what: str, errno: int = NBD_EINVAL) -> NbdServerError:
        message = f"{self.server}: not sent: export {self.info.name!r} {what}"
        return NbdServerError(message, errno=errno, server=self.server)

    def _check_writable(self, fua: bool) -> None:
        if self.info.read_only:
            raise self._unsupported("is read-only", NBD_EPERM)
        if fua and not self.info.can_fua:
            raise self._unsupported("does not support FUA")

    # Commands.

    async def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the export's bytes at ``offset`` (holes read as zeroes).

        ``len(buffer)`` must not exceed ``info.max_block`` (the caller splits). The data
        is received straight into ``buffer``. If this call is cancelled, nothing more is
        written into ``buffer`` and the rest of the reply is discarded.
        """
        view = _byte_view(buffer)
        self._check(offset, len(view), limit=self.info.max_block)
        await self._session.call(_Request(CMD_READ, offset, len(view), dest=view))

    async def read(self, offset: int, length: int) -> bytes:
        """Convenience: ``length`` bytes at ``offset`` (copied; prefer :meth:`read_into`)."""
        self._check(offset, length, limit=self.info.max_block)  # before allocating
        buf = bytearray(length)
        await self.read_into(offset, memoryview(buf))
        return bytes(buf)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        """Write ``data`` at ``offset``; with ``fua`` it is on stable storage when this returns."""
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        self._check(offset, len(view), limit=self.info.max_block)
        self._check_writable(fua)
        req = _Request(CMD_WRITE, offset, len(view), flags=CMD_FLAG_FUA if fua else 0)
        await self._session.call(req, view)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        punch_hole: bool = True,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        """Zero [offset, offset+length).

        ``punch_hole=False`` sends NBD_CMD_FLAG_NO_HOLE (the area stays allocated).
        ``fast=True`` sends NBD_CMD_FLAG_FAST_ZERO: the server fails with ENOTSUP
        (:class:`NbdServerError`) unless zeroing is faster than writing zeroes.
        """
        self._check(offset, length, limit=0xFFFF_FFFF)
        self._check_writable(fua)
        if not self.info.can_write_zeroes:
            raise self._unsupported("does not support write-zeroes")
        if fast and not self.info.can_fast_zero:
            raise self._unsupported("does not support fast zero")
        flags = (
            (0 if punch_hole else CMD_FLAG_NO_HOLE)
            | (CMD_FLAG_FAST_ZERO if fast else 0)
            | (CMD_FLAG_FUA if fua else 0)
        )
        await self._session.call(_Request(CMD_WRITE_ZEROES, offset, length, flags=flags))

    async def flush(self) -> None:
        """Make every write already answered durable on the server."""
        self._session.check_alive()
        if not self.info.can_flush:
            raise self._unsupported("does not support flush")
        await self._session.call(_Request(CMD_FLUSH, 0, 0))

    async def block_status(
        self, offset: int, length: int, context: str, *, req_one: bool = False
    ) -> list[Extent]:
        """Extents of ``context`` from ``offset``; they are contiguous, start at ``offset``
        and may cover less than ``length`` (never more: the last one is clipped). Loop, or
        use :func:`extents`, to cover a whole range.
        """
        context_id = self.info.meta_contexts.get(context)
        if context_id is None:
            granted = list(self.info.meta_contexts)
            raise ValueError(f"meta context {context!r} was not negotiated (have {granted})")
        self._check(offset, length, limit=0xFFFF_FFFF)
        flags = CMD_FLAG_REQ_ONE if req_one else 0
        req = _Request(CMD_BLOCK_STATUS, offset, length, flags=flags, context_id=context_id)
        await self._session.call(req)
        assert req.extents is not None
        return req.extents

    async def close(self) -> None:
        """Disconnect cleanly; idempotent. New requests fail at once from now on.

        Requests in flight are answered first (each bounded by ``timeout``), then
        NBD_CMD_DISC is sent and the server's close awaited (at most ``timeout``);
        whatever is still unanswered after that fails with NbdConnectionError.
        """
        if self._closed:
            return
        self._closed = True
        session = self._session
        session.closing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                await session.wait_idle()
        if session.dead is None:
            with contextlib.suppress(Exception):
                session.send_disconnect()
                assert self._wire.transport is not None
                if self._wire.transport.can_write_eof():
                    self._wire.transport.write_eof()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await asyncio.shield(self._wire.lost)
        session.fail(NbdConnectionError(f"{self.server}: client closed", server=self.server))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                await asyncio.shield(self._wire.lost)


async def connect_many(
    n: int,
    *,
    socket_path: str | Path | None = None,
    host: str | None = None,
    port: int | None = None,
    export: str = "",
    meta_contexts: Sequence[str] = (),
    timeout: float = 30.0,
    max_in_flight: int = 16,
) -> list[NbdClient]:
    """Open up to ``n`` connections to one export: all ``n`` only if the server
    advertises NBD_FLAG_CAN_MULTI_CONN (so flushes are visible across connections),
    otherwise just one. On failure every connection already opened is closed.
    """

    async def one() -> NbdClient:
        return await NbdClient.connect(
            socket_path=socket_path,
            host=host,
            port=port,
            export=export,
            meta_contexts=meta_contexts,
            timeout=timeout,
            max_in_flight=max_in_flight,
        )

    first = await one()
    if n == 1 or not first.info.can_multi_conn:
        return [first]
    # The others are opened together: each handshake is a few round trips.
    tasks = [asyncio.ensure_future(one()) for _ in range(n - 1)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        opened = [t.result() for t in tasks if not t.cancelled() and t.exception() is None]
        for client in [first, *opened]:
            await client.close()
        raise
    return [first, *(t.result() for t in tasks)]


async def extents(
    client: NbdClient, context: str, offset: int = 0, length: int | None = None
) -> AsyncIterator[Extent]:
    """Every extent of ``context`` in [offset, offset+length) (default: to the end of the
    export), in order, as the server reported them (nothing merged); loops block_status.
    """
    end = client.info.size if length is None else offset + length
    pos = offset
    while pos < end:
        got = await client.block_status(pos, min(end - pos, _STATUS_STEP), context)
        for extent in got:
            yield extent
        pos = got[-1].offset + got[-1].length


def merge(allocation: Sequence[Extent], dirty: Sequence[Extent]) -> list[tuple[int, int, bool]]:
    """What an incremental backup copies: ``(offset, length, zero)`` runs.

    ``allocation`` are ``base:allocation`` extents and ``dirty`` a dirty bitmap's
    extents over the same range (each sorted and non-overlapping, as :func:`extents`
    yields them). Every DIRTY byte must be copied, so the runs are exactly the dirty
    ranges, split where the allocation status changes: ``zero=True`` where
    base:allocation says ZERO or HOLE (write zeroes instead of reading; a HOLE without
    ZERO has unspecified contents, which zeroes represent as well as anything), and
    ``zero=False`` where the data must be read (also wherever ``allocation`` says
    nothing). Adjacent runs with the same ``zero`` are coalesced.
    """
    alloc = sorted(allocation, key=lambda e: e.offset)
    runs: list[tuple[int, int, bool]] = []
    i = 0
    for d in sorted(dirty, key=lambda e: e.offset):
        if not d.flags & STATE_DIRTY:
            continue
        pos, end = d.offset, d.offset + d.length
        while pos < end:
            while i < len(alloc) and alloc[i].offset + alloc[i].length <= pos:
                i += 1
            if i < len(alloc) and alloc[i].offset <= pos:
                stop = min(end, alloc[i].offset + alloc[i].length)
                zero = bool(alloc[i].flags & (STATE_HOLE | STATE_ZERO))
            else:  # not described by allocation: read it
                stop = end if i == len(alloc) else min(end, alloc[i].offset)
                zero = False
            _append_run(runs, pos, stop - pos, zero)
            pos = stop
    return runs


def _append_run(runs: list[tuple[int, int, bool]], offset: int, length: int, zero: bool) -> None:
    if runs and runs[-1][2] == zero and runs[-1][0] + runs[-1][1] == offset:
        runs[-1] = (runs[-1][0], runs[-1][1] + length, zero)
    else:
        runs.append((offset, length, zero))
