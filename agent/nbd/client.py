"""The agent's own asyncio NBD client, for reading QEMU's pull-mode backup exports.

A backup reads a domain's disks from the NBD server that libvirt's pull-mode backup
starts inside QEMU, and asks it which ranges are allocated (``base:allocation``) and
which changed since the last checkpoint (``qemu:dirty-bitmap:NAME``). This module is
the client's public surface: :meth:`NbdClient.connect` performs the fixed-newstyle
handshake (:mod:`agent.nbd.handshake`), :class:`NbdClient` speaks the transmission
phase (:mod:`agent.nbd.session`) and :func:`connect_many` opens several connections to
one export.

Why our own client rather than a library binding: payloads are received straight into
the caller's (reusable) buffer through :class:`asyncio.BufferedProtocol` with no
intermediate ``bytes`` (:mod:`agent.nbd.pump`); many requests are in flight on one
connection at once (a demultiplexer hands each reply to its request by handle); block
status for dirty bitmaps is first class; and everything runs on the agent's event loop
with a timeout on every wait on the server.

Failure model (see :mod:`agent.core.errors`):

* the server refuses one request (an error reply): :class:`NbdServerError` with its
  ``errno``; the connection survives;
* the server breaks the protocol (bad magic, unknown handle, a chunk outside its
  request, an absurd length, ...): :class:`NbdProtocolError`, the connection is dead
  and every request in flight fails with it;
* the connection breaks: :class:`NbdConnectionError`, likewise for everyone in flight;
* no reply within ``timeout``: :class:`NbdTimeoutError`, likewise (the request's fate
  is unknown, so nothing after it can be trusted).

A cancelled request does not disturb the others (see :mod:`agent.nbd.session`).
"""

# ASYNC109: ``timeout`` is part of this API: it bounds every wait on the server, each
# separately, and expiry means NbdTimeoutError (connection dead), not TimeoutError.

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from agent.core.errors import NbdConnectionError, NbdServerError, NbdTimeoutError
from agent.nbd.handshake import _Handshake, _Negotiated
from agent.nbd.pump import _Wire
from agent.nbd.session import _Request, _Session
from agent.nbd.wire import (
    CMD_BLOCK_STATUS,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_EPERM,
    ExportInfo,
    Extent,
)

MAX_PAYLOAD: Final = 64 * 1024 * 1024
"""The largest read or write this client sends in one request (``ExportInfo.max_block``
never exceeds it), and so the largest data chunk it will accept."""


def _byte_view(buffer: memoryview | bytearray) -> memoryview:
    view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
    if view.readonly:
        raise ValueError("read_into needs a writable buffer")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


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


def _export_info(export: str, negotiated: _Negotiated) -> ExportInfo:
    minimum, preferred, maximum = negotiated.block_sizes
    return ExportInfo(
        name=export,
        size=negotiated.size,
        flags=negotiated.flags,
        min_block=minimum,
        preferred_block=preferred,
        max_block=min(maximum, MAX_PAYLOAD),
        meta_contexts=negotiated.contexts,
    )


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
        info = _export_info(export, negotiated)
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
