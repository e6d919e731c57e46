"""A second event loop, in its own thread, where backups move their bytes.

Copying a disk is a stream of NBD reads and writes: thousands of socket callbacks per
second per backup. On the agent's main loop, four backups at once made it answer its
timers up to 200 ms late (``bench/loop_lag.py``), and with them libvirt's events and the
HTTP API. The copies therefore run here, on a loop of their own, hashing included
(XXH3, a tenth of a millisecond per 2 MiB); the main loop only waits for their result.
With four backups at once its worst lag is now 32-63 ms (six runs).

The loop is asyncio's own. On uvloop's, alternating 2 GiB fulls (six each) were faster
(median 2.57 s against 2.78 s), but the main loop's worst lag rose to 81-198 ms (three
runs). The cause was not looked into; the two loops share one GIL.

:meth:`DataPlane.run` behaves like ``await coro`` for the caller: the result or the
exception comes back, and cancelling the caller cancels the coroutine *and waits until
it has finished* (its ``finally`` blocks close sockets and stop qemu-nbd), so whatever
the caller does next (undo a failed backup) never races the copy's own clean-up.
Objects the coroutine uses must not be bound to the main loop (asyncio locks, futures);
callbacks into the main loop go through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog

from agent.core.logs import get_logger
from agent.core.shielding import to_completion

log = get_logger("data_plane")

T = TypeVar("T")

_STOP_TIMEOUT = 30.0
_SETTLE_TIMEOUT = 300.0


class DataPlane:
    """The copy loop's thread, started on first use, stopped by :meth:`close`."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                # Work handed over before the thread runs the loop waits in its queue:
                # nothing here waits for the thread to start.
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=_serve, args=(loop,), name="data-plane", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._ensure()
        main = asyncio.get_running_loop()
        finished = asyncio.Event()
        context = structlog.contextvars.get_contextvars()  # the domain's log context

        async def wrapped() -> T:
            structlog.contextvars.bind_contextvars(**context)
            try:
                return await coro
            finally:
                main.call_soon_threadsafe(finished.set)

        future = asyncio.run_coroutine_threadsafe(wrapped(), loop)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # cancels the task over there
            # Until its clean-ups (each bounded by its own timeout) are over, even through
            # a second cancellation; bounded here too, should that loop be gone.
            try:
                await to_completion(finished.wait(), timeout=_SETTLE_TIMEOUT)
            except TimeoutError:
                log.error("a cancelled copy did not finish", timeout=_SETTLE_TIMEOUT)
            raise

    async def close(self) -> None:
        """Stop the loop (after the copies still running were cancelled) and its thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, _STOP_TIMEOUT)
        if thread.is_alive():
            log.error("the data plane's thread did not stop", timeout=_STOP_TIMEOUT)


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        try:
            loop.close()
        except Exception as exc:  # a callback queued meanwhile, say: logged, not lost
            log.error("the data plane's loop did not close cleanly", error=str(exc))
