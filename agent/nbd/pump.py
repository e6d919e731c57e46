"""The byte pump: moves bytes between one connection's socket and the buffers its
reader wants filled (:class:`_Wire`, an :class:`asyncio.BufferedProtocol`).

Payloads are received straight into the caller's buffer, with no intermediate
``bytes``: the reader names the next buffer to fill and what to do once it is full, and
the kernel writes into exactly its unfilled rest. The handshake reads through it with
:meth:`_Wire.read_exact`; the transmission phase (:mod:`agent.nbd.session`) drives it
from callbacks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket as socket_module
from collections.abc import Callable
from typing import Final

from agent.core.errors import NbdConnectionError, NbdError, NbdProtocolError

_SCRATCH_SIZE: Final = 256 * 1024

SOCKET_BUFFER = 4 * 1024 * 1024


def _enlarge_buffers(transport: asyncio.Transport) -> None:
    """Let a whole request's payload sit in the kernel: fewer wake-ups and syscalls."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for option in (socket_module.SO_SNDBUF, socket_module.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket_module.SOL_SOCKET, option, SOCKET_BUFFER)


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
