"""The agent as a whole: connection, inventory, ledger, chains and event dispatch, wired.

:class:`Agent` is what ``backup-agent run`` starts and what the tests run in-process.
On every (re)connection it resynchronises: it reads every domain, dispatches the
changes it missed as synthetic events, and asks for a reconcile of every domain the
ledger knows (libvirt may have forgotten their checkpoints while the agent was away:
a libvirtd restart drops a transient domain's checkpoints). On the first connection
that is every domain, so each is seen, and each chain repaired, once at start.
"""

from __future__ import annotations

import asyncio
import contextlib

from agent.checkpoints import Chains
from agent.config import AgentConfig
from agent.connection import VirtConnection
from agent.dispatch import Dispatcher, HandlerContext, Routes
from agent.domains import Domains
from agent.events import DomainRef, Event, ReconcileRequested
from agent.faults import Faults, from_environment
from agent.ledger import Ledger
from agent.logs import get_logger
from handlers import default_routes

log = get_logger("service")


class Agent:
    """One agent: ``await agent.run(stop)`` until ``stop`` is set.

    ``dispatcher`` and ``chains`` exist once ``run`` has opened the ledger.
    """

    def __init__(
        self, config: AgentConfig, routes: Routes | None = None, faults: Faults | None = None
    ) -> None:
        self.config = config
        self._routes = routes if routes is not None else default_routes()
        self._faults = faults if faults is not None else from_environment()
        self.connection = VirtConnection(config.libvirt, self._submit, self._resync)
        self.domains = Domains(self.connection)
        self.chains: Chains
        self.dispatcher: Dispatcher

    def _submit(self, event: Event) -> None:
        self.dispatcher.submit(event)

    async def _resync(self) -> None:
        for event in await self.domains.resync():
            self.dispatcher.submit(event)
        tracked = set(await self.chains.ledger.domains())
        for uuid, info in self.domains.all().items():
            if info.name in tracked:
                ref = DomainRef(name=info.name, uuid=uuid)
                self.dispatcher.submit(ReconcileRequested(domain=ref, reason="connected"))

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (or the task is cancelled); then shut down cleanly."""
        cfg = self.config
        await asyncio.to_thread(cfg.agent.state_dir.mkdir, parents=True, exist_ok=True)
        log.info("agent starting", uri=cfg.libvirt.uri, state_dir=str(cfg.agent.state_dir))
        ledger = await Ledger.open(cfg.ledger_path)
        self.chains = Chains(
            ledger, self.connection, self.domains, keep=cfg.checkpoints.keep, faults=self._faults
        )
        self.dispatcher = Dispatcher(
            self._routes,
            HandlerContext(connection=self.connection, domains=self.domains, chains=self.chains),
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
            await ledger.close()
            log.info("agent stopped")
