"""Blocking filesystem calls with a deadline, on a few threads of each filesystem's own.

A call on a hung mount (an NFS server gone, a FUSE server stopped) does not return, and
no signal makes it: the thread that made it is lost until the mount answers again. Run
through ``asyncio.to_thread``, such calls would take the threads of asyncio's default
executor (``min(32, cpus + 4)``) one after the other, until every other worker-thread
call of the agent (ledger, job store, manifests) queues behind them. So:

- every root path (the repository, the scratch directory, the run directory) has a pool
  of its own, at most :data:`WORKERS` daemon threads (daemon: a thread stuck on a mount
  must not keep the process from exiting), shared by everyone in the process who calls
  on that root;
- each call has a deadline (``[repository] io_timeout``): past it the caller gets
  :class:`~agent.core.errors.FilesystemHungError` (the thread stays on the call; its
  result is dropped);
- while a call on the root is running past its deadline, every new call fails at once
  with the same error, instead of queueing behind it and taking more threads;
- a probe (``/readyz``) is single-flight: a probe of the same name still running is
  awaited again, not started a second time, so repeated probes of a hung mount hold one
  thread, not one per probe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar

from agent.core.errors import FilesystemHungError

T = TypeVar("T")
P = ParamSpec("P")

WORKERS: Final = 4  # threads per root: a hung mount holds at most these
IDLE: Final = 60.0  # seconds an idle thread waits for work before it ends


@dataclass
class _Call:
    what: str
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    # Its caller's clock starts here, not when a thread takes it up (later, on a loaded
    # machine): a call its caller gave up on must count as overdue at once.
    submitted: float = field(default_factory=time.monotonic)


class _Pool:
    """The worker threads of one root, and the calls they are running (with when each
    started), so that a call overdue can be seen by the next caller."""

    def __init__(self, root: str, workers: int) -> None:
        self._root = root
        self._workers = workers
        self._lock = threading.Lock()
        self._queue: list[_Call] = []
        self._wakeup = threading.Condition(self._lock)
        self._threads = 0
        self._idle = 0
        self._ids = itertools.count()
        self.running: dict[int, tuple[float, str]] = {}  # call -> (monotonic start, what)
        self.probes: dict[str, tuple[concurrent.futures.Future[Any], float]] = {}

    def submit(self, call: _Call) -> None:
        with self._lock:
            self._queue.append(call)
            if len(self._queue) > self._idle and self._threads < self._workers:
                self._threads += 1
                name = f"fs-{self._threads}:{self._root}"
                threading.Thread(target=self._work, name=name, daemon=True).start()
            self._wakeup.notify()

    def threads(self) -> int:
        with self._lock:
            return self._threads

    def overdue(self, timeout: float) -> tuple[float, str] | None:
        """The oldest call running for longer than ``timeout``: (seconds, what), or None."""
        now = time.monotonic()
        with self._lock:
            started = [(now - t, what) for t, what in self.running.values()]
        oldest = max(started, default=None)
        return oldest if oldest is not None and oldest[0] >= timeout else None

    def _work(self) -> None:
        while (call := self._next()) is not None:
            key = next(self._ids)
            with self._lock:
                self.running[key] = (call.submitted, call.what)
            try:
                result = call.fn()
            except BaseException as exc:
                self._done(key)
                call.future.set_exception(exc)
            else:
                self._done(key)
                call.future.set_result(result)

    def _next(self) -> _Call | None:
        """The next call to run; None once idle for :data:`IDLE` seconds (the thread ends)."""
        with self._lock:
            while True:
                self._idle += 1
                if not self._queue:
                    self._wakeup.wait(IDLE)
                self._idle -= 1
                if not self._queue:
                    self._threads -= 1
                    return None
                call = self._queue.pop(0)
                if call.future.set_running_or_notify_cancel():
                    return call
                # (else its caller gave up before it started: never run it)

    def _done(self, key: int) -> None:
        # Before the result is handed over: its caller's next call must not see it running.
        with self._lock:
            del self.running[key]


_POOLS: dict[str, _Pool] = {}
_POOLS_LOCK = threading.Lock()


def _pool(root: Path) -> _Pool:
    key = str(root)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = _Pool(key, WORKERS)
        return pool


class Filesystem:
    """Blocking calls on the filesystem under ``root``, each bounded by ``timeout``
    seconds (see the module docstring). Cheap to make: the threads are per root, shared
    by every ``Filesystem`` of that root in the process."""

    def __init__(self, root: Path, *, timeout: float) -> None:
        self.root = root
        self.timeout = timeout
        self._pool = _pool(root)

    async def call(self, what: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` in one of the root's threads; ``what`` (e.g. "remove
        scratch files") is said in the error if the filesystem does not answer."""
        self._check(what)
        call = _Call(what, lambda: fn(*args, **kwargs))
        self._pool.submit(call)
        try:
            return await _wait(call.future, self.timeout)
        except TimeoutError:
            raise self._hung(what, self.timeout) from None
        finally:
            call.future.cancel()  # still queued (its caller gave up): never run it

    async def probe(self, name: str, fn: Callable[[], T], *, timeout: float) -> T:
        """``fn()`` in one of the root's threads, single-flight per ``name``: a probe of
        that name still running (hung) is waited for again, never started a second
        time, until ``timeout`` seconds after it started (so once it is overdue, every
        probe answers at once). Not refused when another call is overdue: a probe is
        how one finds out whether the filesystem answers again."""
        with _POOLS_LOCK:
            running = self._pool.probes.get(name)
            if running is None or running[0].done():
                call = _Call(name, fn)
                running = self._pool.probes[name] = (call.future, time.monotonic())
                self._pool.submit(call)
        future, started = running
        try:
            result: T = await _wait(future, max(0.0, started + timeout - time.monotonic()))
        except TimeoutError:
            raise self._hung(name, time.monotonic() - started) from None
        return result

    def stalled(self) -> float | None:
        """Seconds the oldest call past its deadline has been running, or None."""
        overdue = self._pool.overdue(self.timeout)
        return None if overdue is None else overdue[0]

    def threads(self) -> int:
        """Threads the root's pool has started (at most :data:`WORKERS`)."""
        return self._pool.threads()

    def _check(self, what: str) -> None:
        overdue = self._pool.overdue(self.timeout)
        if overdue is not None:
            seconds, stuck = overdue
            raise FilesystemHungError(
                f"filesystem of {self.root} has not answered for {seconds:.0f} s (still in: "
                f"{stuck}); is the mount hung? Not tried: {what}",
                path=str(self.root),
                seconds=seconds,
            )

    def _hung(self, what: str, seconds: float) -> FilesystemHungError:
        return FilesystemHungError(
            f"filesystem of {self.root} has not answered for {seconds:.0f} s ({what}); "
            "is the mount hung?",
            path=str(self.root),
            seconds=seconds,
        )


async def _wait(future: concurrent.futures.Future[T], timeout: float) -> T:
    """The result of ``future`` (a thread's), waited for at most ``timeout`` seconds,
    without cancelling it (others may be waiting for the same probe)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[T] = loop.create_future()

    def transfer(done: concurrent.futures.Future[T]) -> None:
        if waiter.done():
            return
        if done.cancelled():
            waiter.cancel()
        elif (exc := done.exception()) is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(done.result())

    def from_thread(done: concurrent.futures.Future[T]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(transfer, done)

    future.add_done_callback(from_thread)
    async with asyncio.timeout(timeout):
        return await waiter
