"""The transmission phase of one connection: requests in flight and their replies.

:class:`_Session` sends requests (:class:`_Request`) and demultiplexes the replies,
which may come in any order and in interleaved chunks, handing each to its request by
handle. Many requests are in flight at once, at most ``max_in_flight``.

A cancelled request does not disturb the others: it stays registered until its reply
arrives (still within ``timeout``), and that reply is read and discarded (from the
moment of cancellation nothing more is written into the caller's buffer). A write
already handed to the transport is sent whole, so the server never sees half a request.

Lengths announced by the server are checked against the request they answer (and a
fixed cap) before anything is allocated or received, so a hostile server can neither
make the client allocate memory nor make it wait for data that will never fit.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable
from typing import Final

from agent.core.errors import (
    NbdConnectionError,
    NbdError,
    NbdProtocolError,
    NbdServerError,
    NbdTimeoutError,
)
from agent.nbd.handshake import _Negotiated
from agent.nbd.pump import _Wire
from agent.nbd.wire import (
    _CHUNK_HEAD,
    _COMMAND_NAMES,
    _DESCRIPTOR,
    _ERRNO_NAMES,
    _ERROR,
    _HOLE,
    _OFFSET,
    _REQUEST,
    _SIMPLE_REPLY,
    _U32,
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLAG_REQ_ONE,
    CMD_READ,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR_BIT,
    REPLY_TYPE_ERROR_OFFSET,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Extent,
)

_MAX_ERROR_PAYLOAD: Final = 6 + 4096 + 8 + 1024
"""An error chunk: errno, message length, a message of <= 4096 bytes, an offset (+slack)."""

_MAX_STATUS_PAYLOAD: Final = 4 + 8 * (1 << 18)
"""A block-status chunk: a context id and at most 256 Ki descriptors (QEMU sends <= 128 Ki)."""

_ZEROS: Final = memoryview(bytes(1024 * 1024))


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
