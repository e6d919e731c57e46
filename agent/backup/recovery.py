"""Recovery: the jobs a killed agent, or an undo that could not finish, left behind,
finished or undone domain by domain while the agent runs.

At start the agent answers ``/healthz`` and its API at once; recovery runs once libvirt
is connected, one domain at a time, each under the domain's lock and within
``[agent] recovery_timeout``. Jobs of the other domains run meanwhile; a job of a
domain still recovering first finishes that domain's recovery itself
(:meth:`Backups.run`). What could not be done (libvirt away, a repository not answering)
is tried again on every reconnection to libvirt and on a back-off in between (5 s,
doubling to 5 min), and by the domain's next backup: never dropped.
:attr:`Recovery.recovering` names the domains not done yet (``/readyz``, metrics).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from agent.backup.undo import Undo, UndoPendingError
from agent.core.errors import AgentError
from agent.core.logs import get_logger

log = get_logger("backup")

FIRST_RETRY = 5.0
MAX_RETRY = 300.0


class Recovery:
    """The domains with left-over jobs, and the loop that works them off."""

    def __init__(
        self,
        undo: Undo,
        recover_domain: Callable[[str], Awaitable[str | None]],
        sweep: Callable[[], Awaitable[object]],
        *,
        timeout: float,
        connected: Callable[[], bool],
        on_recovered: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._undo = undo
        self._recover_domain = recover_domain
        self._sweep = sweep
        self._swept = False  # staging and retention leftovers no intent names: done once
        self._timeout = timeout
        self._connected = connected
        self._on_recovered = on_recovered
        self.recovering: dict[str, str] = {}  # UUID -> why it is not done yet
        self.first_pass = asyncio.Event()  # every domain tried once since start
        self._scanned = False  # the intents were read once: a pass before proves nothing
        self._wake = asyncio.Event()
        undo.on_pending = self._left

    def _left(self, uuid: str, why: str) -> None:
        self.recovering[uuid] = why

    async def scan(self) -> Sequence[str]:
        """Read which domains have left-over jobs (at start and on every reconnection)."""
        try:
            found = await self._undo.leftover_domains()
        except (AgentError, OSError) as exc:  # (a hung run directory: FilesystemHungError)
            log.error("cannot read the job intents", error=str(exc))
            return list(self.recovering)
        for uuid in found:
            self.recovering.setdefault(uuid, "not tried yet")
        self._scanned = True
        return found

    def wake(self) -> None:
        """Try again now (libvirt answered again, or an undo was left pending)."""
        self._wake.set()

    async def run(self) -> None:
        """Until cancelled: work off the left-over jobs, with back-off while some fail."""
        delay = FIRST_RETRY
        while True:
            if self._undo.pending.is_set() or not self._scanned:
                self._undo.pending.clear()
                await self.scan()
            # The sweep runs even with no intent left: a staging directory made just
            # before its intent was written has none.
            ready = self._connected() and self._scanned
            if ready and (self.recovering or not self._swept):
                delay = FIRST_RETRY if await self._pass() else min(delay * 2, MAX_RETRY)
            if ready:
                self.first_pass.set()
            left = self.recovering or not self._swept or not self._scanned
            await self._sleep(delay if left else None)

    async def _sleep(self, seconds: float | None) -> None:
        waits = [asyncio.create_task(self._wake.wait()), asyncio.create_task(self._pending())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        self._wake.clear()

    async def _pending(self) -> None:
        await self._undo.pending.wait()

    async def _pass(self) -> bool:
        """One try at every domain still recovering; True if none failed."""
        clean = True
        # Staging and retention left half-done (finished or removed) first: a domain is
        # not recovered while its repository directory still holds them.
        try:
            await self._sweep()
            self._swept = True
        except (AgentError, OSError) as exc:
            log.warning("cannot clean up the repository's staging yet", error=str(exc))
            clean = False
        for uuid in list(self.recovering):
            try:
                async with asyncio.timeout(self._timeout):
                    handled = await self._recover_domain(uuid)
            except TimeoutError:
                clean = False
                self.recovering[uuid] = f"not done within {self._timeout:g} s"
                log.error("recovery of a domain timed out", domain=uuid, timeout=self._timeout)
                continue
            except (UndoPendingError, AgentError, OSError) as exc:
                clean = False
                self.recovering[uuid] = str(exc)
                log.warning("recovery of a domain not done yet", domain=uuid, error=str(exc))
                continue
            del self.recovering[uuid]
            if handled is not None:
                log.warning("finished a backup left behind", domain=uuid, backup_id=handled)
            if self._on_recovered is not None:
                await self._on_recovered(uuid)
        return clean
