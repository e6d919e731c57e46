"""The agent as a whole: connection, inventory, ledger, chains, event dispatch, jobs,
the HTTP API, NATS messages, local schedules and metrics, wired.

:class:`Agent` is what ``backup-agent run`` starts and what the tests run in-process.
On every (re)connection it resynchronises: it reads every domain, dispatches the
changes it missed as synthetic events, and asks for a reconcile of every domain the
ledger knows (libvirt may have forgotten their checkpoints while the agent was away:
a libvirtd restart drops a transient domain's checkpoints). On the first connection
that is every domain, so each is seen, and each chain repaired, once at start.

Start-up order: the stores open and the HTTP API listens at once (``/healthz`` answers,
``/readyz`` says what is missing); once libvirt is connected the job runner takes over
the store (running jobs become ``agent-restarted``), NATS and the schedules start, and
systemd hears ``READY=1``. The jobs a killed agent left behind are finished or undone
meanwhile, domain by domain (:mod:`agent.backup.recovery`; ``/readyz`` names the domains
not done yet); a domain's reconcile waits for its recovery.
Shutdown runs the other way: stop taking requests, let running jobs finish within
``[jobs] shutdown_grace``, cancel the rest (each undoes its work), close everything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from agent.backup.plan import DiskCoverage
from agent.backup.recovery import Recovery
from agent.backup.run import Backups
from agent.chain.checkpoints import Chains
from agent.chain.ledger import Ledger
from agent.control.api import ApiParts, serving
from agent.control.dispatch import Dispatcher, HandlerContext, Routes
from agent.control.job_requests import Job, JobKind, JobState
from agent.control.job_store import JobStore
from agent.control.jobs import JobOutcome, Jobs
from agent.control.messages import SchedulerMessages
from agent.control.metrics import (
    Metrics,
    StateCollector,
    chain_length,
    domain_coverage,
    watch_loop_lag,
)
from agent.control.schedules import Schedules
from agent.core.config import AgentConfig
from agent.core.errors import AgentError, ConfigError, InventoryError
from agent.core.faults import Faults, from_environment
from agent.core.logs import get_logger
from agent.core.sdnotify import notify
from agent.core.space import SpaceBook, size_and_free
from agent.core.statelock import state_lock
from agent.qemu.qemu_nbd import setpriv_problem
from agent.repository.store import Repository
from agent.virt.connection import ConnState, VirtConnection
from agent.virt.domains import Domains
from agent.virt.events import DomainRef, Event, JobCompleted, ReconcileRequested
from agent.virt.inventory import parse_disks
from handlers import default_routes
from handlers.job_kinds import job_disks, job_runners

log = get_logger("service")

_GAUGES_EVERY = 15.0  # seconds between refreshes of the gauges read from disk
_REPLAYED_JOBS = 100_000  # ended backup jobs of each state read back at start, at most


class Agent:
    """One agent: ``await agent.run(stop)`` until ``stop`` is set.

    ``dispatcher``, ``chains``, ``backups`` and ``jobs`` exist once it has opened its
    stores. With ``services=False`` (one-shot commands) there is no API, no job runner,
    no NATS and no schedules: only the connection, the chains and the backups.
    """

    def __init__(
        self,
        config: AgentConfig,
        routes: Routes | None = None,
        faults: Faults | None = None,
        *,
        services: bool = True,
    ) -> None:
        self.config = config
        self._routes = routes if routes is not None else default_routes()
        self._faults = faults if faults is not None else from_environment()
        self._services = services
        self.connection = VirtConnection(config.libvirt, self._submit, self._resync)
        self.domains = Domains(self.connection)
        self.metrics = Metrics(domain_name=self.domains.name_of)
        self.chains: Chains
        self.backups: Backups
        self.dispatcher: Dispatcher
        self.jobs: Jobs
        self.recovery: Recovery
        self.messages: SchedulerMessages | None = None
        self.urls: list[str] = []  # where the API listens, once it does
        self.ready = asyncio.Event()  # connected and resynchronised
        self.taking_jobs = asyncio.Event()  # the job runner, NATS and schedules started

    def _submit(self, event: Event) -> None:
        self.metrics.event(type(event).__name__)
        if isinstance(event, JobCompleted):
            # The backup waiting for this holds its domain's lock; queued behind a handler
            # that needs the lock, the event would reach it only after a timeout.
            self.backups.job_completed(event)
        self.dispatcher.submit(event)

    async def _resync(self) -> None:
        for event in await self.domains.resync():
            self.dispatcher.submit(event)
        # Jobs left behind (a killed agent, an undo libvirt was away for): their domains
        # are reconciled once recovery has undone them, not before (a reconcile must not
        # redefine or judge a checkpoint that is being undone).
        leftover = set(await self.recovery.scan())
        tracked = await self._tracked()
        for uuid, info in self.domains.all().items():
            if info.name in tracked and uuid not in leftover:
                self._reconcile(uuid, "connected")
        self.recovery.wake()
        self.ready.set()

    async def _tracked(self) -> set[str]:
        try:
            return set(await self.chains.ledger.domains())
        except AgentError as exc:
            log.error("cannot read the ledger; chains not reconciled", error=str(exc))
            return set()

    def _reconcile(self, uuid: str, reason: str) -> None:
        info = self.domains.get(uuid)
        if info is not None:
            ref = DomainRef(name=info.name, uuid=uuid)
            self.dispatcher.submit(ReconcileRequested(domain=ref, reason=reason))

    async def _recovered_domain(self, uuid: str) -> None:
        info = self.domains.get(uuid)
        if info is not None and info.name in await self._tracked():
            self._reconcile(uuid, "recovered")

    @contextlib.asynccontextmanager
    async def started(
        self, *, wait_ready: float | None = None
    ) -> AsyncIterator[asyncio.Task[None]]:
        """The agent running inside the block; stopped cleanly on the way out.

        With ``wait_ready`` (seconds) the block starts only once the agent is connected,
        has resynchronised and has tried once to finish or undo every job an earlier
        agent left behind. Yields the connection task (it only ends by failing).
        """
        cfg = self.config
        async with state_lock(cfg.agent.state_dir), self._running(wait_ready) as connection:
            yield connection

    @contextlib.asynccontextmanager
    async def _running(self, wait_ready: float | None) -> AsyncIterator[asyncio.Task[None]]:
        cfg = self.config
        log.info("agent starting", uri=cfg.libvirt.uri, state_dir=str(cfg.agent.state_dir))
        await _check_setpriv(cfg.agent.setpriv)
        async with contextlib.AsyncExitStack() as stack:
            ledger = await Ledger.open(cfg.ledger_path)
            stack.push_async_callback(ledger.close)
            store = await JobStore.open(cfg.jobs_path)
            stack.push_async_callback(store.close)
            self._wire(ledger, store)
            stack.push_async_callback(self.backups.close)
            stack.push_async_callback(self.dispatcher.close)
            if self._services:
                self.urls = await stack.enter_async_context(serving(self._api_parts(), cfg))
            background = _Background()
            stack.push_async_callback(background.stop)
            connection = background.start(self.connection.run(), "libvirt-connection")
            background.start(self.recovery.run(), "recovery")
            background.start(watch_loop_lag(self.metrics), "loop-lag")
            background.start(self._refresh_gauges(), "gauges")
            if self._services:
                stack.push_async_callback(self._stop_jobs)
                background.start(self._take_jobs(background), "take-jobs")
            if wait_ready is not None:
                async with asyncio.timeout(wait_ready):
                    await self.ready.wait()
                    await self.recovery.first_pass.wait()
                await self.dispatcher.drain()
            yield connection
        log.info("agent stopped")

    async def _take_jobs(self, background: _Background) -> None:
        """Once connected: run jobs, then listen to NATS and the schedules. Recovery goes
        on meanwhile: a backup of a domain still recovering finishes its recovery first."""
        await self.ready.wait()
        # The start-up reconciles first: a job would otherwise hold a domain's lock while
        # that domain's events wait behind a reconcile that needs it.
        await self.dispatcher.drain()
        # The failure gauges from the jobs that ended before this start, before any job
        # ends now (those restarted or run from here on are counted as they end).
        await self._replay_job_ends()
        restarted = await self.jobs.start(self._published_backup)
        if restarted:
            log.warning("jobs were running when the agent died", jobs=[j.id for j in restarted])
        cfg = self.config
        if cfg.nats.url:
            self.messages = SchedulerMessages(
                cfg.nats, cfg.resolved_host_id, self.jobs, faults=self._faults
            )
            background.start(self.messages.run(), "nats")
        if cfg.schedules:
            schedules = Schedules(cfg.schedules, self.jobs, self.jobs.store, self._running_names)
            background.start(schedules.run(), "schedules")
        await self._metrics_from_repository()
        self.taking_jobs.set()
        notify("READY=1")
        log.info(
            "taking jobs",
            api=self.urls,
            nats=bool(cfg.nats.url),
            schedules=[s.name for s in cfg.schedules],
        )

    async def _published_backup(self, job: Job) -> JobOutcome | None:
        """A backup job the killed agent ran that had published its backup: it stands."""
        if job.request.kind != "backup":
            return None
        manifest = await self.backups.published_job(job.id)
        if manifest is None:
            return None
        try:  # in the domain's order, as the job that ran would have said
            order = [d.target for d in parse_disks(manifest.domain_xml)]
        except InventoryError:
            order = []
        disks = job_disks(manifest.disks, manifest.excluded, order)
        result = {"checkpoint": manifest.checkpoint, "finished_by": "start-up recovery"}
        return JobOutcome(backup_id=manifest.backup_id, disks=disks, result=result)

    async def _stop_jobs(self) -> None:
        notify("STOPPING=1")
        await self.jobs.stop()

    def _domain_key(self, domain: str) -> str:
        """One key per domain, whether a job names it by name or by UUID."""
        info = self.domains.find(domain)
        return info.uuid if info is not None else domain

    def _running_names(self) -> list[str]:
        return [info.name for info in self.domains.all().values() if info.state.active]

    def _api_parts(self) -> ApiParts:
        return ApiParts(
            jobs=self.jobs,
            chains=self.chains,
            domains=self.domains,
            connection=self.connection,
            repository=self.backups.repository,
            metrics=self.metrics,
            backup=self.config.backup,
            nats=self._nats_connected,
            recovering=self._recovering,
        )

    def _recovering(self) -> dict[str, str]:
        """Domains not recovered yet, by name (a UUID libvirt no longer knows stays a UUID)."""
        return {self.domains.name_of(uuid): why for uuid, why in self.recovery.recovering.items()}

    def _wire(self, ledger: Ledger, store: JobStore) -> None:
        cfg = self.config
        self.chains = Chains(
            ledger,
            self.connection,
            self.domains,
            keep=cfg.checkpoints.keep,
            faults=self._faults,
            on_redefine=self.metrics.redefined,
        )
        self.backups = Backups(
            cfg,
            self.connection,
            self.domains,
            self.chains,
            Repository(
                cfg.repository_path,
                faults=self._faults,
                state_dir=cfg.agent.state_dir,
                io_timeout=cfg.repository.io_timeout,
                # The one book of space held by running jobs: backups and retention.
                space=SpaceBook(),
            ),
            faults=self._faults,
        )
        self.recovery = Recovery(
            self.backups.undo,
            self.backups.recover_domain,
            self.backups.sweep_staging,
            timeout=cfg.agent.recovery_timeout,
            connected=lambda: self.connection.state is ConnState.CONNECTED,
            on_recovered=self._recovered_domain,
        )
        context = HandlerContext(
            connection=self.connection,
            domains=self.domains,
            chains=self.chains,
            backups=self.backups,
        )
        self.dispatcher = Dispatcher(self._routes, context)
        self.jobs = Jobs(
            store,
            job_runners(context, cfg),
            cfg.jobs,
            domain_key=self._domain_key,
            can_start=lambda: self.connection.state is ConnState.CONNECTED,
        )
        self.jobs.subscribe(self.metrics.job_changed)
        self.metrics.add_collector(
            StateCollector(
                connected=lambda: self.connection.state is ConnState.CONNECTED,
                reconnects=lambda: self.connection.reconnects,
                job_counts=self.jobs.counts,
                messages=self._message_counts,
                nats=self._nats_connected,
                recovering=lambda: self._recovering().keys(),
                coverage=self._coverage,
                metrics=self.metrics,
            )
        )

    def _coverage(self) -> dict[str, tuple[DiskCoverage, ...]]:
        """Each live domain's disks, by name: backed up how, or left out why."""
        backup = self.config.backup
        return {info.name: domain_coverage(info, backup) for info in self.domains.all().values()}

    async def _count_chain(self, domain: str) -> None:
        try:
            backups = await self.backups.repository.backups(domain)
        except AgentError as exc:
            log.warning("cannot read the repository's backups", domain=domain, error=str(exc))
            return
        if backups:
            self.metrics.chain_length.labels(domain=domain).set(chain_length(backups))
            newest = max(b.completed_at for b in backups)
            self.metrics.last_success.labels(domain=domain).set(newest)
            self.metrics.backed_up.add(domain)

    async def _metrics_from_repository(self) -> None:
        """At start: each domain's last backup and chain, so a restart loses no series."""
        try:
            names = set(await self.chains.ledger.domains())
        except AgentError:
            names = set()
        names |= {info.name for info in self.domains.all().values()}
        for name in sorted(names):
            await self._count_chain(name)

    async def _replay_job_ends(self) -> None:
        """The backup jobs the job store holds that had ended (all it keeps, [jobs]
        keep_finished_days), oldest first, into the failure gauges."""
        try:
            ended = [
                j
                for state in (JobState.SUCCEEDED, JobState.FAILED)
                for j in await self.jobs.find(state=state, limit=_REPLAYED_JOBS)
                if j.kind is JobKind.BACKUP
            ]
        except AgentError as exc:
            log.warning("cannot read the job store", error=str(exc))
            return
        for job in sorted(ended, key=lambda j: j.finished_at or 0.0):
            self.metrics.ended(job)

    async def _refresh_gauges(self, interval: float = _GAUGES_EVERY) -> None:
        """Until cancelled: the broken chains (ledger) and the repository's space, read
        in the background for ``/metrics``, each on its own: each read is bounded, and
        one that fails leaves its last values (the repository's are dropped: a space
        that cannot be measured is not shown as free) and is logged when it starts
        failing, not at every attempt."""
        repository = self.backups.repository
        failing: set[str] = set()

        def failed(what: str, exc: BaseException) -> None:
            if what not in failing:
                log.warning("a gauge cannot be refreshed", gauge=what, error=str(exc))
            failing.add(what)

        while True:
            try:
                chains = []
                for name in sorted(await self.chains.ledger.domains()):
                    found = await self.chains.ledger.disk_chains(name)
                    chains += [c for _, c in sorted(found.items()) if not c.valid]
                self.metrics.broken_chains = tuple(chains)
                failing.discard("chains")
            except Exception as exc:  # (anything: the next tick tries again)
                failed("chains", exc)
            try:
                self.metrics.repository_space = await size_and_free(repository.fs, "repository")
                failing.discard("repository space")
            except Exception as exc:  # (anything: the next tick tries again)
                self.metrics.repository_space = None
                failed("repository space", exc)
            await asyncio.sleep(interval)

    def _nats_connected(self) -> bool | None:
        return None if self.messages is None else self.messages.connected

    def _message_counts(self) -> dict[str, int]:
        if self.messages is None:
            return {}
        rejected = self.messages.messages_rejected
        return {"accepted": self.messages.messages_received - rejected, "rejected": rejected}

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


class _Background:
    """Tasks that run alongside the agent; stopped (cancelled and awaited) together."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(_log_failure)
        self._tasks.append(task)
        return task

    async def stop(self) -> None:
        for task in reversed(self._tasks):
            task.cancel()
        # Failures were logged when they happened (the connection's is raised by run()).
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _log_failure(task: asyncio.Task[None]) -> None:
    if (
        not task.cancelled()
        and task.exception() is not None
        and task.get_name() != "libvirt-connection"
    ):
        log.error("background task failed", task=task.get_name(), error=repr(task.exception()))


async def _check_setpriv(path: str) -> None:
    """A missing setpriv is an error at start; going without one is said, once."""
    problem = await asyncio.to_thread(setpriv_problem, path)
    if problem is not None:
        raise ConfigError(f"[agent] setpriv {problem}", key="agent.setpriv")
    if not path:
        log.warning(
            "qemu-nbd runs without setpriv ([agent] setpriv is empty): with root's full "
            "privileges, and it may outlive a killed agent"
        )
