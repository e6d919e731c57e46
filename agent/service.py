"""The agent as a whole: the connection, the live inventory and the event dispatch, wired.

:class:`Agent` is what ``backup-agent run`` starts and what the tests run in-process.
On every (re)connection it resynchronises: it reads every domain, and the changes it
missed are dispatched as synthetic events before the live ones that follow. On the
first connection that is every domain, so the handlers see each domain once at start.
"""

from __future__ import annotations

import asyncio
import contextlib

from agent.config import AgentConfig
from agent.connection import VirtConnection
from agent.dispatch import Dispatcher, HandlerContext, Routes
from agent.domains import Domains
from agent.events import Event
from agent.logs import get_logger
from handlers import default_routes

log = get_logger("service")


class Agent:
    """One agent: ``await agent.run(stop)`` until ``stop`` is set."""

    def __init__(self, config: AgentConfig, routes: Routes | None = None) -> None:
        self.config = config
        self.connection = VirtConnection(config.libvirt, self._submit, self._resync)
        self.domains = Domains(self.connection)
        self.dispatcher = Dispatcher(
            routes if routes is not None else default_routes(),
            HandlerContext(connection=self.connection, domains=self.domains),
        )

    def _submit(self, event: Event) -> None:
        self.dispatcher.submit(event)

    async def _resync(self) -> None:
        for event in await self.domains.resync():
            self.dispatcher.submit(event)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (or the task is cancelled); then shut down cleanly."""
        await asyncio.to_thread(self.config.agent.state_dir.mkdir, parents=True, exist_ok=True)
        log.info(
            "agent starting",
            uri=self.config.libvirt.uri,
            state_dir=str(self.config.agent.state_dir),
        )
        connection = asyncio.create_task(self.connection.run(), name="libvirt-connection")
        stopping = asyncio.create_task(stop.wait(), name="stop-requested")
        try:
            await asyncio.wait({connection, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if connection.done():
                connection.result()  # the connection loop only ends by failing: surface it
        finally:
            stopping.cancel()
            connection.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connection
            await self.dispatcher.close()
            log.info("agent stopped")
