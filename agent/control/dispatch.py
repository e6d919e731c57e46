"""Dispatch of events to the handlers in ``handlers/``, in order per domain.

Each domain gets its own queue and, while the queue is not empty, its own worker task:
one domain's events reach the handlers in the order libvirt delivered them, and a slow
handler for one domain does not hold up the others. A handler that raises is logged
with the event it failed on; the next handler and the next event go on regardless.
Every log line written by a handler carries the domain's name and UUID.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from agent.core.logs import domain_context, get_logger
from agent.virt.events import Event

if TYPE_CHECKING:
    from agent.backup.run import Backups
    from agent.chain.checkpoints import Chains
    from agent.virt.connection import VirtConnection
    from agent.virt.domains import Domains

log = get_logger("dispatch")


@dataclass(frozen=True, slots=True)
class HandlerContext:
    """What a handler may use: the connection, the live inventory, chains and backups."""

    connection: VirtConnection
    domains: Domains
    chains: Chains
    backups: Backups


class Handler(Protocol):
    """A handler for one kind of event; it must tolerate repeats (resync may re-send)."""

    __name__: str

    async def __call__(self, event: Event, ctx: HandlerContext, /) -> None: ...


Routes = Mapping[type[Event], Sequence[Handler]]


@dataclass
class _DomainQueue:
    events: deque[Event] = field(default_factory=deque)
    worker: asyncio.Task[None] | None = None


class Dispatcher:
    """Routes each event to the handlers registered for its type (see the module docstring)."""

    def __init__(self, routes: Routes, ctx: HandlerContext) -> None:
        self._routes = routes
        self._ctx = ctx
        self._queues: dict[str, _DomainQueue] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.received: dict[str, int] = {}
        self._closed = False

    def submit(self, event: Event) -> None:
        """Queue an event (loop thread only; never blocks); dropped once closed."""
        if self._closed:
            return
        kind = type(event).__name__
        self.received[kind] = self.received.get(kind, 0) + 1
        queue = self._queues.setdefault(event.domain.uuid, _DomainQueue())
        queue.events.append(event)
        if queue.worker is None:
            self._idle.clear()
            queue.worker = asyncio.create_task(
                self._work(event.domain.uuid, queue), name=f"events-{event.domain.uuid}"
            )

    async def _work(self, uuid: str, queue: _DomainQueue) -> None:
        try:
            while queue.events:
                await self._deliver(queue.events.popleft())
        finally:
            queue.worker = None
            if not queue.events:
                self._queues.pop(uuid, None)
            if not self._queues:
                self._idle.set()

    async def _deliver(self, event: Event) -> None:
        with domain_context(event.domain.name, event.domain.uuid):
            for handler in self._routes.get(type(event), ()):
                try:
                    await handler(event, self._ctx)
                except Exception:
                    log.exception(
                        "handler failed", handler=handler.__name__, failed_event=repr(event)
                    )

    async def drain(self) -> None:
        """Wait until every queued event has been handled."""
        await self._idle.wait()

    async def close(self) -> None:
        """Cancel the workers; events still queued are dropped (resync recovers them)."""
        self._closed = True
        workers = [q.worker for q in self._queues.values() if q.worker is not None]
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._queues.clear()
        self._idle.set()
