"""The agent's one libvirt connection: open, keep alive, notice loss, reconnect.

:class:`VirtConnection.run` is the connection's life: open (in a worker thread), turn
on keepalive, register the close callback and every domain-event callback, tell the
agent it is connected (which resynchronises, because events were missed while away),
then wait for the connection to close; on loss, back off exponentially (capped, with
jitter: :mod:`agent.core.retry`) and start again. Everything else talks to libvirt
through :meth:`VirtConnection.call`, which runs the blocking call in a worker thread
with a timeout and turns ``libvirtError`` into the agent's own :mod:`agent.core.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import libvirt

from agent.core.errors import (
    AgentError,
    DomainNotFoundError,
    NotConnectedError,
    VirtError,
    VirtTimeoutError,
)
from agent.core.logs import get_logger
from agent.core.retry import Backoff, retry_forever
from agent.core.shielding import to_completion
from agent.virt.events import Event, EventSink, subscriptions
from agent.virt.libvirt_loop import register_event_loop

log = get_logger("connection")

T = TypeVar("T")

# Codes meaning "this connection is dead", as opposed to "this call failed".
_CONNECTION_LOST_CODES = frozenset(
    {libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_ERR_RPC}
)
_DOMAIN_GONE_CODES = frozenset({libvirt.VIR_ERR_NO_DOMAIN})

_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "client",
}


_STOPPING = "agent stopping"


class ConnectionSettings(Protocol):
    """The ``[libvirt]`` configuration section, as far as the connection needs it."""

    @property
    def uri(self) -> str: ...
    @property
    def keepalive_interval(self) -> int: ...
    @property
    def keepalive_count(self) -> int: ...
    @property
    def call_timeout(self) -> float: ...
    @property
    def reconnect_initial_delay(self) -> float: ...
    @property
    def reconnect_max_delay(self) -> float: ...


class ConnState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"


def map_libvirt_error(exc: libvirt.libvirtError, operation: str) -> VirtError:
    """The agent's error for a failed libvirt call (to be raised ``from exc``)."""
    code = exc.get_error_code()
    # str(exc) may carry an older error of the same thread; the error triple is this call's.
    text = exc.get_error_message() or str(exc)
    message = f"{operation}: {text}"
    if code in _DOMAIN_GONE_CODES:
        return DomainNotFoundError(message, code=code, operation=operation)
    if code in _CONNECTION_LOST_CODES or "client socket is closed" in text:
        return NotConnectedError(message, code=code, operation=operation)
    return VirtError(message, code=code, operation=operation)


class VirtConnection:
    """Owns the libvirt connection for the agent's lifetime (see the module docstring)."""

    def __init__(
        self,
        settings: ConnectionSettings,
        sink: EventSink,
        on_connected: Callable[[], Awaitable[None]],
        *,
        workers: int = 8,
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._on_connected = on_connected
        # libvirt calls get threads of their own, so a hung call cannot starve file I/O.
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="libvirt")
        self._conn: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set by run()
        self._closed = asyncio.Event()
        self.state = ConnState.DISCONNECTED
        self.reconnects = 0  # successful connections after the first
        self._ever_connected = False
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Stay connected until cancelled; cancellation closes the connection."""
        register_event_loop()
        # libvirt prints every error to stderr by default; the agent reports them itself.
        libvirt.registerErrorHandler(_ignore_error, None)
        self._loop = asyncio.get_running_loop()
        backoff = Backoff(
            self._settings.reconnect_initial_delay, self._settings.reconnect_max_delay
        )
        try:
            await retry_forever(self._stay_connected, backoff, self._reconnecting)
        finally:
            await to_completion(self._drop(_STOPPING))
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _stay_connected(self, up: asyncio.Event) -> None:
        """One connection's life: connect, and if that worked, wait until it is lost."""
        if await self._connect_once():
            up.set()
            await self._closed.wait()
            await self._drop("connection lost")

    def _reconnecting(self, delay: float, _error: Exception | None) -> None:
        log.info("reconnecting", uri=self._settings.uri, delay=delay)

    async def open_once(self) -> None:
        """Connect once, without reconnecting, for one-shot commands; :meth:`close` after."""
        register_event_loop()
        libvirt.registerErrorHandler(_ignore_error, None)
        self._loop = asyncio.get_running_loop()
        self._conn = await self._in_thread("open", self._open)
        self.state = ConnState.CONNECTED
        self.connected.set()

    async def close(self) -> None:
        """Close a connection made by :meth:`open_once`."""
        await self._drop(_STOPPING)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _connect_once(self) -> bool:
        self.state = ConnState.CONNECTING
        self._closed.clear()
        try:
            self._conn = await self._in_thread("open", self._open)
        except VirtError as exc:
            log.warning("connect failed", uri=self._settings.uri, error=str(exc))
            self.state = ConnState.DISCONNECTED
            return False
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self.state = ConnState.CONNECTED
        self.connected.set()
        log.info("connected", uri=self._settings.uri, reconnects=self.reconnects)
        try:
            await self._on_connected()
        except AgentError as exc:
            # E.g. the connection died during resynchronisation: the close callback (or
            # the next call) notices, and the next connection resynchronises again.
            log.warning("resynchronisation failed", error=str(exc))
            if isinstance(exc, NotConnectedError):
                self._closed.set()
        return True

    def _open(self) -> Any:
        """Blocking: open, keep alive, and subscribe to every event (worker thread)."""
        s = self._settings
        conn = libvirt.open(s.uri)
        conn.setKeepAlive(s.keepalive_interval, s.keepalive_count)
        conn.registerCloseCallback(self._close_callback, None)

        # libvirt may still flush events queued on a connection after it was dropped;
        # only the connection the agent holds now may deliver.
        def sink(event: Event) -> None:
            if self._conn is conn:
                self._sink(event)

        for event_id, callback in subscriptions(sink).items():
            conn.domainEventRegisterAny(None, event_id, callback, None)
        return conn

    def _close_callback(self, _conn: Any, reason: int, _opaque: Any) -> None:
        # Called by libvirt on the loop thread or on the worker thread whose call saw
        # the socket close; call_soon_threadsafe is correct from either.
        log.warning("connection closed by libvirt", reason=_CLOSE_REASONS.get(reason, reason))
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._closed.set)

    async def _drop(self, why: str) -> None:
        conn, self._conn = self._conn, None
        was_connected = self.state is ConnState.CONNECTED
        self.state = ConnState.DISCONNECTED
        self.connected.clear()
        if conn is None:
            return
        if was_connected:
            report = log.info if why == _STOPPING else log.warning
            report("disconnected", uri=self._settings.uri, why=why)
        # After a close nothing can be deregistered; closing frees the client side.
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.run_in_executor(self._executor, _close_quietly, conn),
                self._settings.call_timeout,
            )
        except TimeoutError:
            log.warning("closing the old connection timed out")

    async def call(self, operation: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in a worker thread, with the configured timeout.

        ``operation`` names the call in errors and logs (e.g. ``"list domains"``).
        Raises :class:`NotConnectedError` at once when there is no connection.
        """
        conn = self._conn
        if conn is None or self.state is not ConnState.CONNECTED:
            raise NotConnectedError(f"{operation}: not connected to {self._settings.uri}")
        return await self._in_thread(operation, fn, conn, *args)

    async def _in_thread(self, operation: str, fn: Callable[..., T], *args: Any) -> T:
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(fn, *args)
        )
        try:
            # Shielded: on a timeout the call goes on in its thread, and ``pending`` in the
            # error lets a caller wait for its real end.
            return await asyncio.wait_for(asyncio.shield(future), self._settings.call_timeout)
        except TimeoutError as exc:
            raise VirtTimeoutError(
                f"{operation}: no answer from libvirt within {self._settings.call_timeout:g} s",
                operation=operation,
                pending=future,
            ) from exc
        except libvirt.libvirtError as exc:
            error = map_libvirt_error(exc, operation)
            if isinstance(error, NotConnectedError):
                self._closed.set()
            raise error from exc


def _ignore_error(_opaque: Any, _error: Any) -> None:
    return None


def _close_quietly(conn: Any) -> None:
    # The connection is dead or being dropped; failures here change nothing.
    with contextlib.suppress(libvirt.libvirtError):
        conn.unregisterCloseCallback()
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()
