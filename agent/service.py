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
from collections.abc import AsyncIterator

from agent.backup import Backups
from agent.checkpoints import Chains
from agent.config import AgentConfig
from agent.connection import VirtConnection
from agent.dispatch import Dispatcher, HandlerContext, Routes
from agent.domains import Domains
from agent.errors import AgentError
from agent.events import DomainRef, Event, ReconcileRequested
from agent.faults import Faults, from_environment
from agent.ledger import Ledger
from agent.logs import get_logger
from agent.repository import Repository
from agent.statelock import state_lock
from handlers import default_routes

log = get_logger("service")


class Agent:
    """One agent: ``await agent.run(stop)`` until ``stop`` is set.

    ``dispatcher``, ``chains`` and ``backups`` exist once it has opened the ledger.
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
        self.backups: Backups
        self.dispatcher: Dispatcher
        self._recovered = False
        self.ready = asyncio.Event()  # connected, resynchronised, leftovers undone

    def _submit(self, event: Event) -> None:
        self.dispatcher.submit(event)

    async def _resync(self) -> None:
        for event in await self.domains.resync():
            self.dispatcher.submit(event)
        if not self._recovered:
            # Jobs a killed agent left behind (libvirt jobs, checkpoints, staged files),
            # undone before any reconcile could redefine their checkpoints.
            try:
                handled = await self.backups.recover()
            except AgentError as exc:
                log.error("recovering left-over backup jobs failed", error=str(exc))
            else:
                self._recovered = True
                if handled:
                    log.warning("finished backups left by an earlier agent", backups=handled)
        try:
            tracked = set(await self.chains.ledger.domains())
        except AgentError as exc:
            log.error("cannot read the ledger; chains not reconciled", error=str(exc))
            tracked = set()
        for uuid, info in self.domains.all().items():
            if info.name in tracked:
                ref = DomainRef(name=info.name, uuid=uuid)
                self.dispatcher.submit(ReconcileRequested(domain=ref, reason="connected"))
        self.ready.set()

    @contextlib.asynccontextmanager
    async def started(
        self, *, wait_ready: float | None = None
    ) -> AsyncIterator[asyncio.Task[None]]:
        """The agent running inside the block; stopped cleanly on the way out.

        With ``wait_ready`` (seconds) the block starts only once the agent is connected,
        has resynchronised and has undone jobs an earlier agent left behind. Yields the
        connection task (it only ends by failing).
        """
        cfg = self.config
        async with state_lock(cfg.agent.state_dir), self._running(wait_ready) as connection:
            yield connection

    @contextlib.asynccontextmanager
    async def _running(self, wait_ready: float | None) -> AsyncIterator[asyncio.Task[None]]:
        cfg = self.config
        log.info("agent starting", uri=cfg.libvirt.uri, state_dir=str(cfg.agent.state_dir))
        ledger = await Ledger.open(cfg.ledger_path)
        self._wire(ledger)
        connection = asyncio.create_task(self.connection.run(), name="libvirt-connection")
        try:
            if wait_ready is not None:
                await asyncio.wait_for(self.ready.wait(), wait_ready)
                await self.dispatcher.drain()
            yield connection
        finally:
            connection.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connection
            await self.dispatcher.close()
            await ledger.close()
            log.info("agent stopped")

    def _wire(self, ledger: Ledger) -> None:
        cfg = self.config
        self.chains = Chains(
            ledger, self.connection, self.domains, keep=cfg.checkpoints.keep, faults=self._faults
        )
        self.backups = Backups(
            cfg,
            self.connection,
            self.domains,
            self.chains,
            Repository(cfg.repository_path),
            faults=self._faults,
        )
        self.dispatcher = Dispatcher(
            self._routes,
            HandlerContext(
                connection=self.connection,
                domains=self.domains,
                chains=self.chains,
                backups=self.backups,
            ),
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (or the task is cancelled); then shut down cleanly."""
        async with self.started() as connection:
            stopping = asyncio.create_task(stop.wait(), name="stop-requested")
            try:
                await asyncio.wait({connection, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if connection.done():
                    connection.result()  # the connection loop only ends by failing: surface it
            finally:
                stopping.cancel()
