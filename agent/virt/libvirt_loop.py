"""libvirt's event loop on asyncio: libvirtaio, made safe for calls from worker threads.

The agent never makes a blocking libvirt call on the loop thread; it runs them in
worker threads. libvirt's RPC client then calls the event-loop hooks (*update handle*,
*add timeout*, ...) from those threads: while a thread owns the socket for its call, it
disables the loop's watch on it and enables it again afterwards. libvirtaio implements
the hooks with ``loop.add_reader`` and ``asyncio.ensure_future``, which may only be
used on the loop thread. :class:`ThreadSafeAsyncIOImpl` keeps libvirtaio's behaviour
but queues every hook that arrives from another thread to the loop thread, in order.
The queued hooks never block the calling thread: that thread may hold a libvirt lock
the loop thread is waiting for.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import libvirtaio

from agent.core.errors import AgentError


# libvirtaio has no type marker, so mypy sees its base class as Any.
class ThreadSafeAsyncIOImpl(libvirtaio.virEventAsyncIOImpl):  # type: ignore[misc]
    """libvirtaio's implementation, with hooks from other threads run on the loop thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._loop_thread = threading.get_ident()
        self._lock = threading.Lock()
        self._queued = 0

    def _in_order(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` now if on the loop thread with nothing queued, else queue it."""
        with self._lock:
            if threading.get_ident() == self._loop_thread and self._queued == 0:
                direct = True
            else:
                direct = False
                self._queued += 1
        if direct:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(self._run_queued, fn, args)

    def _run_queued(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        finally:
            with self._lock:
                self._queued -= 1

    # libvirt's hooks. The add hooks must return an id at once, so the callback object
    # is made (and its id taken) in the calling thread; only the loop work is queued.

    def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
        callback = libvirtaio.FDCallback(self, cb, opaque, descriptor=None, event=event)
        self.callbacks[callback.iden] = callback

        def attach() -> None:
            callback.descriptor = self.descriptors[fd]
            callback.descriptor.add_handle(callback)
            self._pending_inc()

        self._in_order(attach)
        return int(callback.iden)

    def _update_handle(self, watch: int, event: int) -> None:
        self._in_order(super()._update_handle, watch, event)

    def _remove_handle(self, watch: int) -> int:
        self._in_order(super()._remove_handle, watch)
        return 0

    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        callback = libvirtaio.TimeoutCallback(self, cb, opaque)
        self.callbacks[callback.iden] = callback

        def start() -> None:
            callback.update(timeout=timeout)
            self._pending_inc()

        self._in_order(start)
        return int(callback.iden)

    def _update_timeout(self, timer: int, timeout: int) -> None:
        self._in_order(super()._update_timeout, timer, timeout)

    def _remove_timeout(self, timer: int) -> int:
        self._in_order(super()._remove_timeout, timer)
        return 0


_registered: ThreadSafeAsyncIOImpl | None = None


def register_event_loop() -> ThreadSafeAsyncIOImpl:
    """Make the running asyncio loop libvirt's event loop; call before opening connections.

    libvirt accepts one event-loop implementation per process, so a second call from
    the same loop returns the first registration, and one from another loop is an error.
    """
    global _registered  # noqa: PLW0603 - libvirt's registration is process-wide too
    loop = asyncio.get_running_loop()
    if _registered is None:
        _registered = ThreadSafeAsyncIOImpl(loop).register()
    elif _registered.loop is not loop:
        raise AgentError("libvirt's event loop is already bound to another asyncio loop")
    return _registered
