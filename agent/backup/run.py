"""One backup of one domain: plan, begin, copy, end, publish; or undo everything.

:meth:`Backups.run` in steps:

1. **Plan** per disk, full or incremental and why (:mod:`agent.backup.plan`); refuse
   before touching anything if the scratch or repository filesystem cannot hold the
   worst case (every disk copied, every block rewritten by the guest meanwhile) beside
   what the other running jobs hold (:mod:`agent.core.space`).
2. **Intent.** Write ``<state_dir>/run/jobs/<uuid>.json`` naming the checkpoint,
   staging directory, socket and scratch files this job will create, so that an agent
   killed at any later point finds and removes them at its next start (:meth:`recover`;
   :mod:`agent.backup.job`).
3. **Begin** a pull-mode backup (``virDomainBackupBegin``) that creates the new
   checkpoint in the same QEMU transaction; record the checkpoint (pending). The calls
   and XML: :mod:`agent.backup.libvirt_job`.
4. **Copy** each disk, disks in parallel, from QEMU's NBD export (Unix socket in the
   agent's private directory) into a staged repository image served by a local
   qemu-nbd (:mod:`agent.backup.disks`, :mod:`agent.backup.copy`).
5. **End** the job (``virDomainAbortJob``: for pull mode this is the normal end) and
   wait for ``JOB_COMPLETED``.
6. **Publish** the backup atomically with its manifest, mark the checkpoint backed up
   (which prunes older ones), apply retention, drop the intent.

If anything fails or is cancelled after step 2, the job is aborted, the new checkpoint
deleted (the older one still covers everything since it), the staged files removed:
nothing half-written is published, and the next backup is correct. Once the backup is
published (its rename is the commit point) it stands: a failure from then on, or an
agent killed before it rewrote its intent, finishes the job forward instead
(:mod:`agent.backup.undo`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from agent.backup import libvirt_job
from agent.backup.disks import DiskCopies
from agent.backup.job import Intents, Job
from agent.backup.plan import (
    REPOSITORY_DAMAGED,
    BackupMode,
    BackupPlan,
    RepositoryTip,
    layer_on,
    plan_backup,
)
from agent.backup.progress import Phases, Progress
from agent.backup.undo import Undo, UndoPendingError
from agent.chain.checkpoints import Chains
from agent.chain.damage import break_chains_at_damage
from agent.chain.rules import new_checkpoint_name
from agent.core.blocking import Filesystem
from agent.core.config import AgentConfig
from agent.core.durable import make_dir_durably
from agent.core.errors import (
    AgentError,
    BackupError,
    FilesystemHungError,
    NotConnectedError,
    PublishUndecidedError,
    RepositoryError,
    RepositoryReadOnlyError,
    RepositorySpaceError,
    RetentionRefusedError,
    VirtTimeoutError,
)
from agent.core.faults import Faults, no_faults
from agent.core.logs import get_logger
from agent.core.shielding import settle, to_completion
from agent.core.space import Reservation, measure
from agent.repository.blocks import BLOCK
from agent.repository.manifest import DiskManifest, ExcludedDisk, Manifest
from agent.repository.store import Repository
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
    excluded: tuple[ExcludedDisk, ...] = ()
    retention_refused: str | None = None  # why retention refused, if it did (damage)

    @property
    def bytes_copied(self) -> int:
        return sum(d.bytes_copied for d in self.disks)


@dataclass(frozen=True, slots=True)
class _Copied:
    """What begin, copy and end leave for the manifest."""

    checkpoint_xml: str
    disks: tuple[DiskManifest, ...]
    domain_xml: str


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
        self._staging: dict[str, str] = {}  # UUID -> name, from before its staging is made
        self._publishing: set[str] = set()  # domains whose running backup began to publish
        self._completions: dict[str, asyncio.Future[Mapping[str, Any]]] = {}
        self._reservations: dict[str, Reservation] = {}  # per domain: its job's space held
        self._intents = Intents(config)
        self._undo = Undo(
            connection,
            chains,
            repository,
            self._intents,
            begin_wait=config.libvirt.call_timeout,
        )
        self._disks = DiskCopies(config, repository, faults)

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
        job_id: str | None = None,
    ) -> BackupResult:
        """Back up the running domain ``uuid``; ``keep_last`` overrides [retention]'s
        number for the domain; ``job_id`` (the agent's job running it) goes into the
        intent, so that a next start can tell that job's backup was published."""
        if uuid in self._running:
            raise BackupError("a backup of this domain is already running", code="busy")
        self._running.add(uuid)
        timeout = self._config.backup.job_timeout
        try:
            # _run in this task (asyncio.timeout, not wait_for): however many cancellations
            # arrive, the lock is released only once its undo is over.
            async with self.domain_lock(uuid), asyncio.timeout(timeout):
                await self._leftover_first(uuid)
                return await self._run(uuid, mode, progress, keep_last, job_id)
        except TimeoutError as exc:
            raise BackupError(
                f"the backup did not finish within {timeout:g} s; it was undone (or, had it "
                "been published already, it stands)",
                code="timeout",
            ) from exc
        finally:
            self._running.discard(uuid)
            self._staging.pop(uuid, None)
            self._publishing.discard(uuid)
            self.repository.space.release(self._reservations.pop(uuid, None))

    async def _leftover_first(self, uuid: str) -> None:
        """A job an earlier agent or a failed undo left for this domain is finished or
        undone before a new one begins: its libvirt job would refuse the new one, and
        its intent would be overwritten."""
        try:
            handled = await self._undo.leftover(uuid)
        except UndoPendingError as exc:
            self._undo.left(uuid, str(exc))  # recovery tries it again, and says so
            raise BackupError(
                f"a backup left behind blocks this one: {exc}", code="undo-pending"
            ) from exc
        if handled is not None:
            log.warning("finished a backup left behind first", backup_id=handled)

    async def recover_domain(self, uuid: str) -> str | None:
        """Finish or undo the domain's left-over job, if any (:mod:`agent.backup.recovery`).
        Not while a backup of it runs: that backup does it first, and until it has the
        domain stays recovering (UndoPendingError)."""
        busy = UndoPendingError("a backup of the domain is running; it finishes this first")
        if uuid in self._running:
            raise busy
        async with self.domain_lock(uuid):
            if uuid in self._running:
                raise busy
            return await self._undo.leftover(uuid)

    async def sweep_staging(self) -> list[Path]:
        """Staging and retention leftovers that no intent names any more (a crash between
        the two), removed or finished, for every domain with no backup running."""
        busy = self._staging.values
        return await self._undo.clean_staging(skip=lambda domain: domain in busy())

    @property
    def undo(self) -> Undo:
        return self._undo

    def domain_lock(self, uuid: str) -> asyncio.Lock:
        """Held by a backup for its whole run, and by the handlers that change the
        domain's chain, so neither sees the other's work half-done."""
        return self._locks.setdefault(uuid, asyncio.Lock())

    async def close(self) -> None:
        """Stop the data plane (at agent shutdown, after every job has ended)."""
        await self._disks.close()

    async def _run(
        self,
        uuid: str,
        mode: BackupMode,
        progress: Progress | None,
        keep_last: int | None,
        job_id: str | None,
    ) -> BackupResult:
        started = time.monotonic()
        phases = Phases()
        info, plan, latest, job = await self._prepare(uuid, mode, job_id)
        phases.mark("plan")
        manifest = await self._execute_or_undo(info, plan, job, latest, progress, phases)
        # Published: what it wrote is in the free space now; retention's merge is measured
        # against that, not against this job's worst case as well.
        self.repository.space.release(self._reservations.pop(uuid, None))
        whole = [d.target for d in manifest.disks if d.block_size is not None]
        refused = await self._conclude(info, job, keep_last, whole)
        phases.mark("finish")
        log.info("backup phases", backup_id=job.backup_id, seconds=phases.seconds)
        log.info(
            "backup done",
            backup_id=job.backup_id,
            seconds=round(time.monotonic() - started, 3),
            disks={d.target: (d.mode, d.reason) for d in manifest.disks},
        )
        return BackupResult(
            job.backup_id,
            info.name,
            job.checkpoint,
            manifest.disks,
            time.monotonic() - started,
            manifest.excluded,
            refused,
        )

    # -- 1 and 2: plan, intent ---------------------------------------------------------

    async def _prepare(
        self, uuid: str, mode: BackupMode, job_id: str | None = None
    ) -> tuple[DomainInfo, BackupPlan, Manifest | None, Job]:
        """Plan the job, stage it, write its intent: nothing in libvirt changed yet."""
        # Not mounted, another one: nothing written. An agent upgraded from before markers
        # whose repository is not mounted yet must not start a new one on the bare path.
        first_ever = not await self._chains.ledger.has_backups()
        await self.repository.ensure_ready(create=first_ever)
        info = await self._domains.refresh(uuid)
        if info is None or not info.state.active:
            raise BackupError("the domain is not running", code="domain-not-running")
        plan, latest = await self._plan(info, mode)
        await self._check_space(plan)
        backup_id = self.repository.new_backup_id()
        self._staging[uuid] = info.name  # before it exists: the sweep leaves it alone
        staging = await self.repository.stage(info.name, backup_id)
        job = dataclasses.replace(self._new_job(info, plan, backup_id, staging), job_id=job_id)
        await self._intents.write(job)
        self._faults("backup:planned")
        return info, plan, latest, job

    async def _plan(self, info: DomainInfo, mode: BackupMode) -> tuple[BackupPlan, Manifest | None]:
        """The plan, and the repository's newest backup whose manifest reads (usually the
        increment's parent; never for a disk whose chain there is damaged)."""
        records, chains, found = await asyncio.gather(
            self._chains.ledger.checkpoints(info.name),
            self._chains.ledger.disk_chains(info.name),
            self.repository.tip(info.name),
        )
        latest, tip = found.manifest, None
        if latest is not None:
            broken = {t: d.error for t, d in found.broken.items()}
            targets = frozenset(d.target for d in latest.disks)
            layerable = {d.target: d.virtual_size for d in latest.disks if d.block_size == BLOCK}
            tip = RepositoryTip(latest.backup_id, latest.checkpoint, targets, broken, layerable)
        newer = found.newer[0].error if found.newer else None
        excluded = self._config.backup.excluded
        exclude = {d.target for d in info.disks if excluded(info.name, d.target)}
        plan = plan_backup(info, records, chains, tip, mode, damaged=newer, exclude=exclude)
        for left in plan.excluded:
            log.info("disk left out of the backup", disk=left.target, reason=left.reason)
        for disk in plan.disks:
            if disk.reason == REPOSITORY_DAMAGED:
                log.warning(
                    "the repository is damaged where this disk's chain goes on; copied in full",
                    domain=info.name,
                    disk=disk.target,
                    reason=disk.reason,
                    damage=newer or (tip.broken.get(disk.target) if tip is not None else None),
                )
            elif disk.full and disk.reason not in (None, "full-requested"):
                log.info("full backup of disk", disk=disk.target, reason=disk.reason)
        return plan, latest

    async def _check_space(self, plan: BackupPlan) -> None:
        """Worst case: every disk copied whole into the repository, and every block
        rewritten during the copy (its old data goes to the scratch files). Reserved in
        the agent's space book (:mod:`agent.core.space`) against what the other running
        jobs hold, until this job ends (:meth:`run`); both on one filesystem add up.
        The scratch directory is made if missing; the repository's root never is here
        (a bare mount point must not become a repository): a missing one is measured
        where it would be made. Each filesystem call is bounded by ``io_timeout``."""
        worst = sum(d.size for d in plan.disks)
        scratch = Filesystem(self._config.scratch_path, timeout=self._config.repository.io_timeout)
        # Mode as it always was (umask): QEMU, not only the agent, writes scratch files here.
        await scratch.call("make the scratch directory", make_dir_durably, scratch.root, mode=0o777)
        needs = await asyncio.gather(
            measure(scratch, "scratch directory", worst),
            measure(self.repository.fs, "repository", worst),
        )
        self._reservations[plan.uuid] = self.repository.space.reserve(
            f"a backup of {plan.domain}", needs
        )

    def _new_job(self, info: DomainInfo, plan: BackupPlan, backup_id: str, staging: Path) -> Job:
        return Job(
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

    # -- 3 to 6: begin, copy, end, publish; or undo ------------------------------------

    async def _execute_or_undo(
        self,
        info: DomainInfo,
        plan: BackupPlan,
        job: Job,
        latest: Manifest | None,
        progress: Progress | None,
        phases: Phases,
    ) -> Manifest:
        """The job's steps up to publishing; whatever stops them undoes the job (unless
        its backup was published)."""
        try:
            return await self._execute(info, plan, job, latest, progress, phases)
        except BaseException as exc:
            if isinstance(exc, PublishUndecidedError):  # neither published nor undoable
                log.error("backup left for the next start to decide", backup_id=job.backup_id)
                raise BackupError(str(exc), code="publish-undecided", domain=info.name) from exc
            # Unless it was published. To its end even through a second cancellation: the
            # domain's lock must not be released while the undo changes its checkpoints.
            began_publishing = job.uuid in self._publishing
            await to_completion(self._undo.after_failure(job, began_publishing=began_publishing))
            if isinstance(exc, FilesystemHungError):
                raise BackupError(
                    f"backup of {info.name} failed: {exc}", code="filesystem-hung", domain=info.name
                ) from exc
            if isinstance(exc, NotConnectedError):
                raise BackupError(
                    f"backup of {info.name} failed: libvirt went away during the backup "
                    f"(libvirtd restarted?): {exc}. It was undone; libvirt's backup job is "
                    "aborted as soon as libvirtd answers again",
                    code="libvirt-lost",
                    domain=info.name,
                ) from exc
            if isinstance(exc, AgentError | OSError | ValueError) and not isinstance(
                exc, BackupError
            ):
                raise BackupError(
                    f"backup of {info.name} failed: {exc}", code="copy-failed", domain=info.name
                ) from exc
            raise

    async def _execute(
        self,
        info: DomainInfo,
        plan: BackupPlan,
        job: Job,
        latest: Manifest | None,
        progress: Progress | None,
        phases: Phases,
    ) -> Manifest:
        created = time.time()
        parent = await self._parent(info, plan, latest)
        plan, blocks = await self._previous_blocks(info, plan, parent)
        if plan.parent_backup is None:
            parent = None  # (every layer planned had to become standalone)
        phases.mark("layers")  # the parent's manifest and blocks read: the agent's own
        copied = await self._run_job(info, plan, job, parent, progress, phases, blocks)
        manifest = Manifest(
            backup_id=job.backup_id,
            domain=info.name,
            domain_uuid=info.uuid,
            created_at=created,
            completed_at=time.time(),
            parent=parent.backup_id if parent is not None else None,
            checkpoint=job.checkpoint,
            checkpoint_xml=copied.checkpoint_xml,
            domain_xml=copied.domain_xml,
            disks=copied.disks,
            excluded=plan.excluded,
        )
        self._publishing.add(info.uuid)  # from here, a failure asks the repository first
        await self.repository.publish(info.name, job.staging, manifest)
        phases.mark("publish")
        self._faults("backup:published")
        return manifest

    async def _parent(
        self, info: DomainInfo, plan: BackupPlan, latest: Manifest | None
    ) -> Manifest | None:
        """The backup the increment's images sit on (usually the newest, read already)."""
        if plan.parent_backup is None:
            return None
        if latest is not None and latest.backup_id == plan.parent_backup:
            return latest
        return await self.repository.backup(info.name, plan.parent_backup)

    async def _previous_blocks(
        self, info: DomainInfo, plan: BackupPlan, parent: Manifest | None
    ) -> tuple[BackupPlan, dict[str, dict[int, str]]]:
        """The plan, and what its layered disks are compared with (:func:`layer_on`)."""
        if parent is None or not any(d.layered for d in plan.disks):
            return plan, {}
        manifests = await self.repository.backups(info.name)
        # (a disk's blocks: 512 Ki checksums a TiB, along the chain; not on the loop)
        return await asyncio.to_thread(layer_on, plan, parent, manifests)

    async def _run_job(
        self,
        info: DomainInfo,
        plan: BackupPlan,
        job: Job,
        parent: Manifest | None,
        progress: Progress | None,
        phases: Phases,
        blocks: dict[str, dict[int, str]],
    ) -> _Copied:
        """libvirt's job from begin to end, the disks copied meanwhile."""
        completion = asyncio.get_running_loop().create_future()
        self._completions[info.uuid] = completion
        # The repository images are created and served while libvirt begins the job;
        # the copy itself waits for ``begun``.
        begun: concurrent.futures.Future[None] = concurrent.futures.Future()
        copy = asyncio.create_task(self._disks.copy(plan, job, parent, progress, begun, blocks))
        try:
            return await self._begin_copy_end(info, plan, job, copy, begun, completion, phases)
        except BaseException:
            await settle(copy)  # its finally blocks (qemu-nbd, sockets) before any undo
            raise
        finally:
            self._completions.pop(info.uuid, None)

    async def _begin_copy_end(
        self,
        info: DomainInfo,
        plan: BackupPlan,
        job: Job,
        copy: asyncio.Task[tuple[DiskManifest, ...]],
        begun: concurrent.futures.Future[None],
        completion: asyncio.Future[Mapping[str, Any]],
        phases: Phases,
    ) -> _Copied:
        self._faults("backup:beginning")
        begin = asyncio.ensure_future(
            self._connection.call(
                "begin backup",
                libvirt_job.begin,
                info.uuid,
                libvirt_job.backup_xml(plan, job),
                libvirt_job.checkpoint_xml(plan, job),
            )
        )
        try:
            await asyncio.shield(begin)
        except BaseException as exc:
            # Cancelled, or timed out here: libvirt may still begin the job. The undo
            # waits for the call itself to return before it takes the job for over.
            if not begin.done():
                self._undo.begin_unsettled(info.uuid, begin)
            elif isinstance(exc, VirtTimeoutError) and exc.pending is not None:
                self._undo.begin_unsettled(info.uuid, exc.pending)
            raise
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
            self._connection.call("read domain XML", libvirt_job.domain_xml, info.uuid),
            libvirt_job.end_job(
                self._connection, info, completion, timeout=self._config.libvirt.call_timeout
            ),
        )
        phases.mark("end")
        self._faults("backup:ended")
        return _Copied(checkpoint.xml, disks, domain_xml)

    # -- after publishing --------------------------------------------------------------

    async def _conclude(
        self, info: DomainInfo, job: Job, keep_last: int | None, whole: list[str]
    ) -> str | None:
        """Mark the published backup in the ledger, apply retention, drop the intent;
        why retention refused, if it did."""
        # Published: from here on a failure is finished forward, never undone (at the next
        # start if not now: an intent that still says unpublished is checked against the
        # repository).
        job = dataclasses.replace(job, published=True)
        try:
            await self._intents.write(job)
            return await self._finish(info, job, keep_last, whole)
        except (AgentError, OSError) as exc:
            log.error(
                "backup published, but marking it in the ledger failed; finished by recovery",
                backup_id=job.backup_id,
                error=str(exc),
            )
            self._undo.left(job.uuid, f"finishing the published backup {job.backup_id}: {exc}")
            return None

    async def _finish(
        self, info: DomainInfo, job: Job, keep_last: int | None, whole: list[str]
    ) -> str | None:
        await self._chains.backup_succeeded(info.name, job.checkpoint, whole)
        self._faults("backup:marked")
        keep = self._config.retention.keep_last_for(info.name) if keep_last is None else keep_last
        refused = None
        if keep:
            try:
                dropped = await self.repository.apply_retention(info.name, keep)
            except RetentionRefusedError as exc:
                refused = str(exc)
                broken = await break_chains_at_damage(
                    self.repository, self._chains.ledger, info.name
                )
                log.error("retention refused", domain=info.name, error=refused, broken=broken)
            except RepositoryError as exc:
                if not _retention_can_wait(exc):
                    raise
                # An image busy (`backup-agent export` holds QEMU's lock on the chain it
                # serves: the merge stops before it changes one), a hung, full or
                # read-only filesystem: the repository's own intent has the next
                # retention (the domain's next backup) finish it. This backup stands.
                log.warning(
                    "retention not done now; the domain's next backup finishes it",
                    domain=info.name,
                    error=str(exc),
                )
            else:
                if dropped:
                    log.info("retention dropped backups", dropped=dropped)
        await self._intents.drop(job)
        return refused

    # -- recovery (agent.backup.undo, agent.backup.recovery) ---------------------------

    async def published_job(self, job_id: str) -> Manifest | None:
        """The backup a killed agent's job ``job_id`` had published, if it had: its
        intent says so (or the repository does), or recovery finished it forward."""
        return await self._undo.published_job(job_id)

    async def leftovers(self) -> list[Path]:
        """Intents of jobs not yet undone (an undo keeps its intent until libvirt's job
        is known to be over); empty once recovery is complete."""
        return await self._intents.leftovers()


def _retention_can_wait(exc: RepositoryError) -> bool:
    """A retention failure the next retention finishes: not one that says something is
    wrong in the repository (those are left to recovery, which names them)."""
    if isinstance(exc, FilesystemHungError | RepositorySpaceError | RepositoryReadOnlyError):
        return True
    return "another process using the image" in str(exc)  # qemu-img: an image's lock
