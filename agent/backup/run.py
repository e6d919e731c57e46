"""One backup of one domain: plan, begin, copy, end, publish; or undo everything.

:meth:`Backups.run` in steps:

1. **Plan** per disk, full or incremental and why (:mod:`agent.backup.plan`); refuse
   before touching anything if the scratch or repository filesystem cannot hold the
   worst case (every disk copied, every block rewritten by the guest meanwhile).
2. **Intent.** Write ``<state_dir>/run/jobs/<uuid>.json`` naming the checkpoint,
   staging directory, socket and scratch files this job will create, so that an agent
   killed at any later point finds and removes them at its next start (:meth:`recover`).
3. **Begin** a pull-mode backup (``virDomainBackupBegin``) that creates the new
   checkpoint in the same QEMU transaction; record the checkpoint (pending).
4. **Copy** each disk, disks in parallel, from QEMU's NBD export (Unix socket in the
   agent's private directory) into a staged repository image served by a local
   qemu-nbd (:mod:`agent.backup.copy`).
5. **End** the job (``virDomainAbortJob``: for pull mode this is the normal end) and
   wait for ``JOB_COMPLETED``.
6. **Publish** the backup atomically with its manifest, mark the checkpoint backed up
   (which prunes older ones), apply retention, drop the intent.

If anything fails or is cancelled after step 2, the job is aborted, the new checkpoint
deleted (the older one still covers everything since it), the staged files removed:
nothing half-written is published, and the next backup is correct. Once the backup is
published (its rename is the commit point) it stands: a failure from then on, or an
agent killed before it rewrote its intent, finishes the job forward instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
from lxml import etree

from agent.backup.copy import (
    RateLimit,
    Run,
    copy_runs,
    first_cause,
    runs_to_copy,
    table_openers_first,
)
from agent.backup.data_plane import DataPlane
from agent.backup.plan import BackupMode, BackupPlan, DiskPlan, RepositoryTip, plan_backup
from agent.chain.checkpoints import Chains
from agent.chain.rules import new_checkpoint_name
from agent.core.config import AgentConfig
from agent.core.errors import (
    AgentError,
    BackupError,
    BackupNotFoundError,
    PublishUndecidedError,
    RepositorySpaceError,
    VirtError,
)
from agent.core.faults import Faults, no_faults
from agent.core.logs import get_logger
from agent.core.shielding import to_completion
from agent.nbd.client import BASE_ALLOCATION as ALLOCATION
from agent.nbd.client import Extent, NbdClient, connect_many, extents
from agent.qemu.qemu_nbd import serve_image
from agent.repository.store import DiskManifest, Manifest, Repository
from agent.virt.connection import VirtConnection
from agent.virt.domains import Domains
from agent.virt.events import JobCompleted
from agent.virt.inventory import DomainInfo

log = get_logger("backup")


@dataclass(frozen=True, slots=True)
class BackupResult:
    backup_id: str
    domain: str
    checkpoint: str
    disks: tuple[DiskManifest, ...]
    seconds: float

    @property
    def bytes_copied(self) -> int:
        return sum(d.bytes_copied for d in self.disks)


@dataclass(frozen=True, slots=True)
class _Job:
    """What one running job created, so it can be undone (also written as the intent)."""

    uuid: str
    domain: str
    backup_id: str
    checkpoint: str
    staging: Path
    socket: Path
    scratch: Mapping[str, Path]
    published: bool = False

    def to_json(self) -> str:
        return json.dumps(
            {
                "uuid": self.uuid,
                "domain": self.domain,
                "backup_id": self.backup_id,
                "checkpoint": self.checkpoint,
                "staging": str(self.staging),
                "socket": str(self.socket),
                "scratch": {t: str(p) for t, p in self.scratch.items()},
                "published": self.published,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> _Job:
        data = json.loads(text)
        return cls(
            uuid=data["uuid"],
            domain=data["domain"],
            backup_id=data["backup_id"],
            checkpoint=data["checkpoint"],
            staging=Path(data["staging"]),
            socket=Path(data["socket"]),
            scratch={t: Path(p) for t, p in data["scratch"].items()},
            published=bool(data.get("published", False)),
        )


Progress = Callable[[int, int], None]


class Backups:
    """Backup jobs of this host (see the module docstring)."""

    def __init__(
        self,
        config: AgentConfig,
        connection: VirtConnection,
        domains: Domains,
        chains: Chains,
        repository: Repository,
        *,
        faults: Faults = no_faults,
    ) -> None:
        self._config = config
        self._connection = connection
        self._domains = domains
        self._chains = chains
        self.repository = repository
        self._faults = faults
        self._locks: dict[str, asyncio.Lock] = {}
        self._running: set[str] = set()
        self._publishing: set[str] = set()  # domains whose running backup began to publish
        self._completions: dict[str, asyncio.Future[Mapping[str, Any]]] = {}
        self._data_plane = DataPlane()

    # -- events ----------------------------------------------------------------------

    def job_completed(self, event: JobCompleted) -> None:
        """Called by the agent as JOB_COMPLETED arrives: wakes the job waiting for this domain."""
        future = self._completions.get(event.domain.uuid)
        operation = event.stats.get("operation")
        if operation is not None and operation != libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP:
            return  # a migration or save job, not ours
        if future is not None and not future.done():
            future.set_result(dict(event.stats))

    # -- the job ---------------------------------------------------------------------

    async def run(
        self,
        uuid: str,
        mode: BackupMode = BackupMode.AUTO,
        *,
        progress: Progress | None = None,
        keep_last: int | None = None,
    ) -> BackupResult:
        """Back up the running domain ``uuid``; ``keep_last`` overrides [retention]'s
        number for the domain."""
        if uuid in self._running:
            raise BackupError("a backup of this domain is already running", code="busy")
        self._running.add(uuid)
        timeout = self._config.backup.job_timeout
        try:
            # _run in this task (asyncio.timeout, not wait_for): however many cancellations
            # arrive, the lock is released only once its undo is over.
            async with self.domain_lock(uuid), asyncio.timeout(timeout):
                return await self._run(uuid, mode, progress, keep_last)
        except TimeoutError as exc:
            raise BackupError(
                f"the backup did not finish within {timeout:g} s; it was undone (or, had it "
                "been published already, it stands)",
                code="timeout",
            ) from exc
        finally:
            self._running.discard(uuid)
            self._publishing.discard(uuid)

    def domain_lock(self, uuid: str) -> asyncio.Lock:
        """Held by a backup for its whole run, and by the handlers that change the
        domain's chain, so neither sees the other's work half-done."""
        return self._locks.setdefault(uuid, asyncio.Lock())

    async def _run(
        self, uuid: str, mode: BackupMode, progress: Progress | None, keep_last: int | None
    ) -> BackupResult:
        started = time.monotonic()
        phases = _Phases()
        info = await self._domains.refresh(uuid)
        if info is None or not info.state.active:
            raise BackupError("the domain is not running", code="domain-not-running")
        plan, latest = await self._plan(info, mode)
        await self._check_space(plan)
        backup_id = self.repository.new_backup_id()
        staging = await self.repository.stage(info.name, backup_id)
        job = self._new_job(info, plan, backup_id, staging)
        await self._write_intent(job)
        self._faults("backup:planned")
        phases.mark("plan")
        try:
            manifest = await self._execute(info, plan, job, latest, progress, phases)
        except BaseException as exc:
            if isinstance(exc, PublishUndecidedError):  # neither published nor undoable
                log.error("backup left for the next start to decide", backup_id=job.backup_id)
                raise BackupError(str(exc), code="publish-undecided", domain=info.name) from exc
            # Unless it was published. To its end even through a second cancellation: the
            # domain's lock must not be released while the undo changes its checkpoints.
            await to_completion(self._undo_logged(job))
            if isinstance(exc, AgentError | OSError | ValueError) and not isinstance(
                exc, BackupError
            ):
                raise BackupError(
                    f"backup of {info.name} failed: {exc}", code="copy-failed", domain=info.name
                ) from exc
            raise
        # Published: from here on a failure is finished forward, never undone (at the next
        # start if not now: an intent that still says unpublished is checked against the
        # repository).
        job = dataclasses.replace(job, published=True)
        try:
            await self._write_intent(job)
            await self._finish(info, job, keep_last)
        except (AgentError, OSError) as exc:
            log.error(
                "backup published, but marking it in the ledger failed; retried at next start",
                backup_id=job.backup_id,
                error=str(exc),
            )
        phases.mark("finish")
        log.info("backup phases", backup_id=job.backup_id, seconds=phases.seconds)
        log.info(
            "backup done",
            backup_id=job.backup_id,
            seconds=round(time.monotonic() - started, 3),
            disks={d.target: (d.mode, d.reason) for d in manifest.disks},
        )
        return BackupResult(
            job.backup_id, info.name, job.checkpoint, manifest.disks, time.monotonic() - started
        )

    async def _plan(self, info: DomainInfo, mode: BackupMode) -> tuple[BackupPlan, Manifest | None]:
        """The plan, and the repository's newest backup (usually the increment's parent)."""
        records, chains, latest = await asyncio.gather(
            self._chains.ledger.checkpoints(info.name),
            self._chains.ledger.disk_chains(info.name),
            self.repository.latest(info.name),
        )
        tip = None
        if latest is not None:
            tip = RepositoryTip(
                latest.backup_id, latest.checkpoint, frozenset(d.target for d in latest.disks)
            )
        plan = plan_backup(info, records, chains, tip, mode)
        for disk in plan.disks:
            if disk.full and disk.reason not in (None, "full-requested"):
                log.info("full backup of disk", disk=disk.target, reason=disk.reason)
        return plan, latest

    async def _check_space(self, plan: BackupPlan) -> None:
        """Worst case: every disk copied whole, and every block rewritten during the copy."""
        worst = sum(d.size for d in plan.disks)
        scratch, repository = self._config.scratch_path, self.repository.root
        for path in (scratch, repository):
            await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
        checks = [
            ("scratch directory", scratch, await asyncio.to_thread(_free_bytes, scratch)),
            ("repository", repository, await self.repository.free_bytes()),
        ]
        for what, path, free in checks:
            if free < worst:
                raise RepositorySpaceError(
                    f"{what} {path} has {free} bytes free, a backup of {plan.domain} may need "
                    f"{worst}; refusing to start",
                    path=str(path),
                )

    def _new_job(self, info: DomainInfo, plan: BackupPlan, backup_id: str, staging: Path) -> _Job:
        return _Job(
            uuid=info.uuid,
            domain=info.name,
            backup_id=backup_id,
            checkpoint=new_checkpoint_name(),
            staging=staging,
            socket=self._config.socket_path / f"{backup_id}.sock",
            scratch={
                d.target: self._config.scratch_path / f"{backup_id}-{d.target}.qcow2"
                for d in plan.disks
            },
        )

    async def _execute(
        self,
        info: DomainInfo,
        plan: BackupPlan,
        job: _Job,
        latest: Manifest | None,
        progress: Progress | None,
        phases: _Phases,
    ) -> Manifest:
        created = time.time()
        parent = None
        if plan.parent_backup is not None:
            parent = (
                latest
                if latest is not None and latest.backup_id == plan.parent_backup
                else await self.repository.backup(info.name, plan.parent_backup)
            )
        completion = asyncio.get_running_loop().create_future()
        self._completions[info.uuid] = completion
        # The repository images are created and served while libvirt begins the job;
        # the copy itself waits for ``begun``.
        begun: concurrent.futures.Future[None] = concurrent.futures.Future()
        copy = asyncio.create_task(self._copy_all(plan, job, parent, progress, begun))
        try:
            await self._connection.call(
                "begin backup",
                _begin,
                info.uuid,
                _backup_xml(plan, job),
                _checkpoint_xml(plan, job),
            )
            phases.mark("begin")
            self._faults("backup:begun")
            # (cancelled if the copy failed already: then awaiting it below raises why)
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                begun.set_result(None)
            if copy.done():
                await copy  # failed already: say why now, before recording anything
            checkpoint = await self._chains.record(info, job.checkpoint, judge=False)
            phases.mark("record")
            disks = await copy
            phases.mark("copy")
            self._faults("backup:copied")
            domain_xml, _ = await asyncio.gather(
                self._connection.call("read domain XML", _domain_xml, info.uuid),
                self._end_job(info, completion),
            )
            phases.mark("end")
        except BaseException:
            await _settle(copy)  # its finally blocks (qemu-nbd, sockets) before any undo
            raise
        finally:
            self._completions.pop(info.uuid, None)
        manifest = Manifest(
            backup_id=job.backup_id,
            domain=info.name,
            domain_uuid=info.uuid,
            created_at=created,
            completed_at=time.time(),
            parent=parent.backup_id if parent is not None else None,
            checkpoint=job.checkpoint,
            checkpoint_xml=checkpoint.xml,
            domain_xml=domain_xml,
            disks=disks,
        )
        self._publishing.add(info.uuid)  # from here, a failure asks the repository first
        await self.repository.publish(info.name, job.staging, manifest)
        phases.mark("publish")
        self._faults("backup:published")
        return manifest

    async def _copy_all(
        self,
        plan: BackupPlan,
        job: _Job,
        parent: Manifest | None,
        progress: Progress | None,
        begun: concurrent.futures.Future[None],
    ) -> tuple[DiskManifest, ...]:
        limit = (
            RateLimit(self._config.backup.bandwidth_limit)
            if self._config.backup.bandwidth_limit
            else None
        )
        main = asyncio.get_running_loop()
        forward = None
        if progress is not None:
            report = progress

            # Each report wakes this loop from the data plane's thread: not for every
            # one of an increment's hundreds of runs.
            def to_main(done: int, total: int) -> None:
                main.call_soon_threadsafe(report, done, total)

            forward = throttled(to_main, PROGRESS_INTERVAL)

        tally = _Tally(forward, faults=self._faults)
        # The bytes move on the data plane's loop, so this loop stays responsive.
        return await self._data_plane.run(self._copy_disks(plan, job, parent, limit, tally, begun))

    async def _copy_disks(
        self,
        plan: BackupPlan,
        job: _Job,
        parent: Manifest | None,
        limit: RateLimit | None,
        tally: _Tally,
        begun: concurrent.futures.Future[None],
    ) -> tuple[DiskManifest, ...]:
        try:
            async with asyncio.TaskGroup() as group:
                # One failing disk cancels the others before anything is undone.
                copies = [
                    group.create_task(self._copy_disk(disk, job, parent, limit, tally, begun))
                    for disk in plan.disks
                ]
        except BaseExceptionGroup as failed:
            raise first_cause(failed) from failed
        return tuple(copy.result() for copy in copies)

    async def close(self) -> None:
        """Stop the data plane (at agent shutdown, after every job has ended)."""
        await self._data_plane.close()

    async def _copy_disk(
        self,
        disk: DiskPlan,
        job: _Job,
        parent: Manifest | None,
        limit: RateLimit | None,
        tally: _Tally,
        begun: concurrent.futures.Future[None],
    ) -> DiskManifest:
        """Create and serve the disk's repository image, then (once the job has begun)
        copy what the export's block status says into it."""
        settings = self._config.backup
        contexts = [ALLOCATION] + ([] if disk.full else [f"qemu:dirty-bitmap:backup-{disk.target}"])
        async with contextlib.AsyncExitStack() as stack:
            size = disk.size
            # Unless libvirt did not report the capacity (then the export will tell).
            opened = await self._open_target(stack, disk, job, parent, size) if size else None
            await asyncio.wrap_future(begun)
            sources = await connect_many(
                settings.connections,
                socket_path=job.socket,
                export=disk.target,
                meta_contexts=contexts,
            )
            stack.push_async_callback(_close_all, sources)
            exported = sources[0].info.size
            if opened is None:
                size = exported
                opened = await self._open_target(stack, disk, job, parent, size)
            elif exported != size:
                raise BackupError(
                    f"QEMU exports {disk.target} with {exported} bytes, libvirt reported "
                    f"{size}: the disk changed size",
                    code="disk-resized",
                    domain=job.domain,
                )
            image, backing, targets = opened
            runs = await _runs(sources[0], contexts)
            if not disk.full:  # an overlay, written through the page cache
                runs = table_openers_first(runs)
            tally.expect(sum(r.length for r in runs))
            checksums = await copy_runs(
                sources,
                targets,
                runs,
                request_size=settings.request_size,
                read_size=settings.read_size,
                in_flight=settings.in_flight,
                punch_holes=disk.full,
                limit=limit,
                progress=tally.add,
            )
            # The target advertises multi-conn whenever there are several connections:
            # one flush covers the writes completed on all of them.
            await targets[0].flush()
        return DiskManifest(
            target=disk.target,
            image=image,
            mode=disk.mode,
            reason=disk.reason,
            virtual_size=size,
            bytes_copied=sum(r.length for r in runs),
            backing=backing,
            checksums=tuple(checksums),
        )

    async def _open_target(
        self,
        stack: contextlib.AsyncExitStack,
        disk: DiskPlan,
        job: _Job,
        parent: Manifest | None,
        size: int,
    ) -> tuple[str, str | None, list[NbdClient]]:
        """The staged image (name, backing), served by a local qemu-nbd, and connections
        to it."""
        settings = self._config.backup
        image, backing = await self.repository.create_image(
            job.staging, disk.target, size, backing=None if disk.full else parent
        )
        socket = self._config.socket_path / f"{job.backup_id}-{disk.target}.sock"
        # An overlay is served with its backing: a write covering part of a cluster
        # must be completed from the parent backup's data, not with zeroes. Direct I/O
        # speeds up the big copies of full disks, but costs ~50 ms to tear down: not
        # worth it for an incremental's few changed blocks (fsync'd at publish anyway).
        served = await stack.enter_async_context(
            serve_image(
                job.staging / image,
                socket,
                clients=settings.connections,
                backing=not disk.full,
                direct=disk.full,
            )
        )
        targets = await connect_many(settings.connections, socket_path=served)
        stack.push_async_callback(_close_all, targets)
        return image, backing, targets

    async def _end_job(
        self, info: DomainInfo, completion: asyncio.Future[Mapping[str, Any]]
    ) -> None:
        await self._connection.call("end backup job", _abort_job, info.uuid)
        # JOB_COMPLETED wakes us as it arrives; an event lost with the connection would
        # not, so libvirt is also asked, every second, whether the job is over.
        deadline = time.monotonic() + self._config.libvirt.call_timeout
        while True:
            try:
                stats = await asyncio.wait_for(asyncio.shield(completion), 1.0)
                break
            except TimeoutError:
                if not await self._connection.call("read job", _job_active, info.uuid):
                    stats = await self._connection.call(
                        "read job stats", _completed_stats, info.uuid
                    )
                    break
                if time.monotonic() > deadline:
                    raise BackupError(
                        "libvirt's backup job did not end after it was asked to",
                        code="job-stuck",
                        domain=info.name,
                    ) from None
        if not stats.get("success", False):
            raise BackupError(
                f"libvirt reported the backup job failed: {stats.get('errmsg')}",
                code="job-failed",
                domain=info.name,
            )

    async def _finish(self, info: DomainInfo, job: _Job, keep_last: int | None) -> None:
        await self._chains.backup_succeeded(info.name, job.checkpoint)
        keep = self._config.retention.keep_last_for(info.name) if keep_last is None else keep_last
        if keep:
            dropped = await self.repository.apply_retention(info.name, keep)
            if dropped:
                log.info("retention dropped backups", dropped=dropped)
        await self._drop_intent(job)

    # -- undo and recovery -------------------------------------------------------------

    async def _undo_logged(self, job: _Job) -> None:
        """Undo, without letting a failure of the undo hide why the backup failed.

        A backup published already stands, and is finished instead: publishing (a
        rename) is the commit point, and a cancellation can arrive just after it. Only
        a job that began to publish asks the repository (libvirt's job has ended by
        then): one that cannot tell is left, intent and all, to the next start.
        """
        try:
            published = job.uuid in self._publishing and await self._published(job)
        except Exception as exc:
            log.error(
                "cannot tell whether the failed backup was published; decided at next start",
                backup_id=job.backup_id,
                error=str(exc),
            )
            return
        try:
            if published:
                log.warning(
                    "backup failed after it was published; it stands", backup_id=job.backup_id
                )
                await self._roll_forward(job)
            else:
                await self._undo(job)
        except Exception as exc:
            log.error(
                "undoing a failed backup failed; retried at next start",
                backup_id=job.backup_id,
                error=str(exc),
            )

    async def _undo(self, job: _Job) -> None:
        """Remove everything a failed job created; every step tolerates what is gone.

        The intent is kept (and the undo retried at the next start) unless libvirt's
        backup job is known to be over: a job left running blocks every later backup.
        """
        log.warning("undoing backup", backup_id=job.backup_id, checkpoint=job.checkpoint)
        try:
            await self._connection.call(
                "abort backup job", _abort_own_job, job.uuid, str(job.socket)
            )
            ended = True
        except VirtError as exc:
            log.error("could not end libvirt's backup job", backup_id=job.backup_id, error=str(exc))
            ended = False
        try:
            await self._chains.discard_if_recorded(job.domain, job.uuid, job.checkpoint)
        finally:
            await self.repository.discard(job.staging)
        await asyncio.to_thread(_remove_files, [*job.scratch.values(), job.socket])
        if ended:
            await self._drop_intent(job)

    async def _roll_forward(self, job: _Job) -> None:
        """A job that ended after publishing (checked by :meth:`_published`): its backup
        stands; finish marking it."""
        await self._chains.backup_succeeded(job.domain, job.checkpoint)
        await self._drop_intent(job)

    async def _published(self, job: _Job) -> bool:
        """Whether the job's backup is in the repository. An intent that says published
        must find it there (else an error); one that does not may be from an agent
        killed between the rename and rewriting the intent."""
        try:
            await self.repository.backup(job.domain, job.backup_id)
        except BackupNotFoundError:
            if job.published:
                raise
            return False
        return True

    async def recover(self) -> list[str]:
        """At start-up: finish or undo the jobs a previous agent left behind (killed)."""
        handled = []
        for path in await self.leftovers():
            try:
                job = _Job.from_json(await asyncio.to_thread(path.read_text))
                await (self._roll_forward(job) if await self._published(job) else self._undo(job))
            except (AgentError, OSError, ValueError, KeyError) as exc:
                log.error(
                    "could not recover a left-over backup job yet", intent=str(path), error=str(exc)
                )
                continue
            handled.append(job.backup_id)
        for stale in await self.repository.cleanup_staging():
            log.info("removed staged backup left by a crash", path=str(stale))
        return handled

    async def leftovers(self) -> list[Path]:
        """Intents of jobs not yet undone (an undo keeps its intent until libvirt's job
        is known to be over); empty once recovery is complete."""
        jobs_dir = self._config.run_path / "jobs"
        return await asyncio.to_thread(
            lambda: sorted(jobs_dir.glob("*.json")) if jobs_dir.exists() else []
        )

    async def _write_intent(self, job: _Job) -> None:
        await asyncio.to_thread(_private_dir, job.socket.parent)
        await asyncio.to_thread(_write_private, self._intent_path(job), job.to_json())

    async def _drop_intent(self, job: _Job) -> None:
        await asyncio.to_thread(_remove_files, [self._intent_path(job)])

    def _intent_path(self, job: _Job) -> Path:
        return self._config.run_path / "jobs" / f"{job.uuid}.json"


async def _close_all(clients: list[NbdClient]) -> None:
    for client in clients:
        await client.close()


async def _settle(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` unless it is over, and wait until it is, even if the caller is
    cancelled meanwhile (then that is raised afterwards): the undo that follows must
    not race the copy's own clean-up. The task's outcome is dropped (the caller is
    already failing for a reason of its own)."""
    task.cancel()
    try:
        await to_completion(asyncio.wait([task]))
    finally:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" warning


async def _runs(source: NbdClient, contexts: list[str]) -> list[Run]:
    """What to copy: allocation, and for an incremental the dirty bitmap, from the export."""
    allocation = [e async for e in extents(source, ALLOCATION)]
    dirty: list[Extent] | None = None
    if len(contexts) > 1:
        dirty = [e async for e in extents(source, contexts[1])]
    return runs_to_copy(allocation, dirty)


class _Phases:
    """Seconds spent in each phase of a job, for the log (where time goes, per phase)."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.seconds: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[phase] = round(now - self._last, 3)
        self._last = now


# How often a running copy reports its progress, at most (seconds).
PROGRESS_INTERVAL = 0.1


def throttled(
    report: Progress, interval: float, *, clock: Callable[[], float] = time.monotonic
) -> Progress:
    """``report``, passed on at most once per ``interval`` seconds, and always when
    ``done`` reaches ``total``."""
    last = -math.inf

    def forward(done: int, total: int) -> None:
        nonlocal last
        now = clock()
        if done >= total or now - last >= interval:
            last = now
            report(done, total)

    return forward


class _Tally:
    """Bytes copied so far across the disks of one job; the ``copy:half`` crash point."""

    def __init__(self, progress: Progress | None, faults: Faults) -> None:
        self._progress = progress
        self._total = 0
        self._done = 0
        self._faults = faults

    def expect(self, amount: int) -> None:
        """A disk's block status is known: its bytes join the total."""
        self._total += amount

    def add(self, amount: int) -> None:
        before, self._done = self._done, self._done + amount
        if before * 2 < self._total <= self._done * 2:
            self._faults("copy:half")
        if self._progress is not None:
            self._progress(self._done, self._total)


def _backup_xml(plan: BackupPlan, job: _Job) -> str:
    root = etree.Element("domainbackup", mode="pull")
    if plan.base is not None:
        etree.SubElement(root, "incremental").text = plan.base
    etree.SubElement(root, "server", transport="unix", socket=str(job.socket))
    disks = etree.SubElement(root, "disks")
    for disk in plan.disks:
        attrs = {"name": disk.target, "backup": "yes", "type": "file", "backupmode": disk.mode}
        if not disk.full and disk.since is not None:
            attrs["incremental"] = disk.since
        element = etree.SubElement(disks, "disk", attrs)
        etree.SubElement(element, "scratch", file=str(job.scratch[disk.target]))
        etree.SubElement(element, "driver", type="qcow2")
    return etree.tostring(root, encoding="unicode")


def _checkpoint_xml(plan: BackupPlan, job: _Job) -> str:
    root = etree.Element("domaincheckpoint")
    etree.SubElement(root, "name").text = job.checkpoint
    disks = etree.SubElement(root, "disks")
    for disk in plan.disks:
        etree.SubElement(disks, "disk", name=disk.target, checkpoint="bitmap")
    return etree.tostring(root, encoding="unicode")


def _free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _private_dir(path: Path) -> None:
    # QEMU's backup export listens here: only the agent may reach it.
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def _write_private(path: Path, text: str) -> None:
    # The run directory holds QEMU's backup sockets: only the agent may read it.
    path.parent.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent.parent, 0o700)
    path.parent.mkdir(exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def _remove_files(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


# Blocking libvirt calls (worker threads via VirtConnection.call).


def _begin(conn: Any, uuid: str, backup_xml: str, checkpoint_xml: str) -> None:
    conn.lookupByUUIDString(uuid).backupBegin(backup_xml, checkpoint_xml, 0)


def _abort_job(conn: Any, uuid: str) -> None:
    conn.lookupByUUIDString(uuid).abortJob()


def _abort_own_job(conn: Any, uuid: str, socket: str) -> None:
    """Abort the domain's backup job only if it is ours (it exports on our socket)."""
    try:
        dom = conn.lookupByUUIDString(uuid)
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in _NO_JOB:
            return  # no domain, or no backup job: nothing to abort
        raise
    if socket in xml:
        try:
            dom.abortJob()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in _NO_JOB:
                raise


_NO_JOB = frozenset(
    {libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_DOMAIN_BACKUP, libvirt.VIR_ERR_OPERATION_INVALID}
)


def _job_active(conn: Any, uuid: str) -> bool:
    info = conn.lookupByUUIDString(uuid).jobInfo()
    return bool(info[0] != libvirt.VIR_DOMAIN_JOB_NONE)


def _completed_stats(conn: Any, uuid: str) -> dict[str, Any]:
    stats = conn.lookupByUUIDString(uuid).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    return dict(stats)


def _domain_xml(conn: Any, uuid: str) -> str:
    return str(conn.lookupByUUIDString(uuid).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
