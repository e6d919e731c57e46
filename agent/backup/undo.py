"""Undoing a backup job that failed or was cancelled, and finishing or undoing the jobs
that a killed agent, or an undo that could not finish, left behind.

Undone, a job leaves nothing behind: libvirt's job is aborted (if it is ours), the new
checkpoint deleted (the older one still covers everything since it), the staged files,
scratch files and socket removed. Nothing half-written is published, and the next
backup is correct. Once the backup is published (its rename is the commit point) it
stands: a failure from then on, or an agent killed before it rewrote its intent,
finishes the job forward instead.

An undo never drops a step because the outside world is away. Its intent stays until
every step is done, and the steps run in an order that is safe to repeat:

1. **libvirt's job aborted** (``virDomainAbortJob``, only if it exports on the job's own
   socket). Fails while libvirtd is down, restarting or hung. After a ``backupBegin``
   that timed out on our side, the begin call itself is waited for first (it may still
   start the job), and until it has returned the job is not taken for over.
2. **The new checkpoint deleted** (ledger marked discarded, then libvirt). A libvirt
   failure here is left to the domain's next reconcile, which deletes the agent's own
   discarded or unknown checkpoints.
3. **The staged backup removed** from the repository (also done, on its own, when step 1
   fails: nothing in libvirt uses it). Fails on a hung or unmounted repository.
4. **Scratch files and the socket removed**: only once libvirt's job is over, as QEMU
   writes to the scratch files until then.
5. **The intent dropped.**

A step that fails leaves the intent, and the undo is tried again from step 1: by
:mod:`agent.backup.recovery` (at start, on every reconnection to libvirt, and on a
back-off in between) and by the domain's next backup before it begins.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.backup import libvirt_job
from agent.backup.job import Intents, Job
from agent.chain.checkpoints import Chains
from agent.core.errors import (
    AgentError,
    BackupError,
    BackupNotFoundError,
    VirtError,
    VirtTimeoutError,
)
from agent.core.logs import get_logger
from agent.repository.manifest import Manifest
from agent.repository.store import Repository
from agent.virt.connection import VirtConnection

log = get_logger("backup")


class UndoPendingError(BackupError):
    """A step of an undo could not be done now (libvirt or a filesystem away); the
    intent stays and the undo is tried again."""

    def __init__(self, message: str, *, domain: str | None = None):
        super().__init__(message, code="undo-pending", domain=domain)


class Undo:
    """Undoes or finishes the jobs of this host, from their intents."""

    def __init__(
        self,
        connection: VirtConnection,
        chains: Chains,
        repository: Repository,
        intents: Intents,
        *,
        begin_wait: float,
    ) -> None:
        self._connection = connection
        self._chains = chains
        self._repository = repository
        self._intents = intents
        self._begin_wait = begin_wait
        # Per domain UUID: a backupBegin that timed out on our side and may still start
        # libvirt's job; its job is not taken for over until the call has returned.
        self._begins: dict[str, asyncio.Future[Any]] = {}
        # Jobs (by the agent's job id) whose published backup was finished forward here.
        self._forward: dict[str, tuple[str, str]] = {}
        self.pending = asyncio.Event()  # set when an undo is left to be tried again
        # Told at once which domain's undo was left, and why (recovery tracks it).
        self.on_pending: Callable[[str, str], None] = lambda uuid, why: None

    def begin_unsettled(self, uuid: str, call: asyncio.Future[Any]) -> None:
        """A job's ``backupBegin`` timed out here, or its caller was cancelled, while the
        call still runs in libvirt."""
        self._begins[uuid] = call

    def left(self, uuid: str, why: str) -> None:
        """Something of the domain's job is left for recovery to finish or undo."""
        self.on_pending(uuid, why)
        self.pending.set()

    async def after_failure(self, job: Job, *, began_publishing: bool) -> None:
        """Undo, without letting a failure of the undo hide why the backup failed.

        A backup published already stands, and is finished instead: publishing (a
        rename) is the commit point, and a cancellation can arrive just after it. Only
        a job that began to publish asks the repository (libvirt's job has ended by
        then): one that cannot tell is left, intent and all, to be decided later.
        """
        try:
            published = began_publishing and await self._published(job)
            if published:
                log.warning(
                    "backup failed after it was published; it stands", backup_id=job.backup_id
                )
                await self._roll_forward(job)
            else:
                await self._undo(job)
        except Exception as exc:
            log.error(
                "undoing a failed backup could not finish; tried again later",
                backup_id=job.backup_id,
                domain=job.domain,
                error=str(exc),
            )
            self.left(job.uuid, str(exc))

    async def leftover(self, uuid: str) -> str | None:
        """Finish or undo the job a previous agent (or a failed undo) left for this domain.

        Returns the backup id handled (None if there was none); raises
        :class:`UndoPendingError` if it cannot be done now. The caller holds the domain's
        lock and no backup of the domain is running.
        """
        try:
            found = [p for p in await self._intents.leftovers() if p.stem == uuid]
            if not found:
                return None
            path = found[0]
            text = await self._intents.read(path)
            if text is None:
                return None
            job = Job.from_json(text)
        except (OSError, ValueError, KeyError) as exc:
            raise UndoPendingError(f"cannot read the intent of domain {uuid}: {exc}") from exc
        try:
            if await self._published(job):
                await self._roll_forward(job)
            else:
                await self._undo(job)
        except UndoPendingError:
            raise
        except (AgentError, OSError) as exc:
            raise UndoPendingError(
                f"the backup {job.backup_id} of {job.domain} could not be finished or undone "
                f"yet: {exc}",
                domain=job.domain,
            ) from exc
        return job.backup_id

    async def leftover_domains(self) -> list[str]:
        """UUIDs of the domains whose intents are still there."""
        return [path.stem for path in await self._intents.leftovers()]

    async def clean_staging(self, skip: Callable[[str], bool] = lambda domain: False) -> list[Path]:
        """Staged backups no intent names any more (a crash between the two), and
        retentions left half-done, except for the domains ``skip`` names (a backup runs)."""
        stale = await self._repository.cleanup_staging(skip=skip)
        for path in stale:
            log.info("removed staged backup left by a crash", path=str(path))
        return stale

    async def _undo(self, job: Job) -> None:
        """The steps of the module docstring; every one tolerates what is gone."""
        log.warning("undoing backup", backup_id=job.backup_id, checkpoint=job.checkpoint)
        try:
            await self._end_libvirt_job(job)
        except UndoPendingError:
            # The staged backup is ours alone: remove it now (nothing in libvirt uses it).
            await self._repository.discard(job.staging)
            raise
        await self._chains.discard_if_recorded(job.domain, job.uuid, job.checkpoint)
        await self._repository.discard(job.staging)
        await self._intents.remove_files(job)  # bounded: a hung scratch mount fails it
        await self._intents.drop(job)
        log.info("backup undone", backup_id=job.backup_id, domain=job.domain)

    async def _end_libvirt_job(self, job: Job) -> None:
        begin = self._begins.get(job.uuid)
        if begin is not None:
            try:
                await asyncio.wait_for(asyncio.shield(begin), self._begin_wait)
            except TimeoutError:
                raise UndoPendingError(
                    "libvirt has not answered the backup's begin call yet; its job is "
                    "aborted once it has",
                    domain=job.domain,
                ) from None
            except VirtTimeoutError as exc:  # a cancelled caller's call timed out since
                if exc.pending is not None and not exc.pending.done():
                    self._begins[job.uuid] = exc.pending
                    raise UndoPendingError(
                        "libvirt has not answered the backup's begin call yet; its job is "
                        "aborted once it has",
                        domain=job.domain,
                    ) from exc
            except Exception as exc:  # it failed: then libvirt started no job
                log.info("the backup's unsettled begin failed in the end", error=str(exc))
            self._begins.pop(job.uuid, None)
        try:
            await self._connection.call(
                "abort backup job", libvirt_job.abort_own_job, job.uuid, str(job.socket)
            )
        except VirtError as exc:
            raise UndoPendingError(
                f"libvirt's backup job of {job.domain} could not be ended yet: {exc}",
                domain=job.domain,
            ) from exc

    async def _roll_forward(self, job: Job) -> None:
        """A job that ended after publishing (checked by :meth:`_published`): its backup
        stands; finish marking it."""
        await self._chains.backup_succeeded(job.domain, job.checkpoint)
        await self._intents.drop(job)
        if job.job_id is not None:
            self._forward[job.job_id] = (job.domain, job.backup_id)
        log.info("published backup finished", backup_id=job.backup_id, domain=job.domain)

    async def published_job(self, job_id: str) -> Manifest | None:
        """The backup the agent's job ``job_id`` published before the agent died, if it
        did (see :meth:`Backups.published_job`)."""
        found = self._forward.get(job_id)
        if found is None:
            for path in await self._intents.leftovers():
                text = await self._intents.read(path)
                job = Job.from_json(text) if text is not None else None
                if job is not None and job.job_id == job_id and await self._published(job):
                    found = (job.domain, job.backup_id)
                    break
        found = found or self._forward.get(job_id)  # finished forward meanwhile
        if found is None:
            return None
        return await self._repository.backup(*found)

    async def _published(self, job: Job) -> bool:
        """Whether the job's backup is in the repository. An intent that says published
        must find it there (else an error); one that does not may be from an agent
        killed between the rename and rewriting the intent."""
        # Not found in a repository that is not mounted (or another one) says nothing:
        # RepositoryMarkerError then, and the job is decided once it is back.
        await self._repository.check_marker()
        try:
            await self._repository.backup(job.domain, job.backup_id)
        except BackupNotFoundError:
            if job.published:
                raise
            return False
        return True
