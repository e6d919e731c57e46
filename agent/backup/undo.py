"""Undoing a backup job that failed or was cancelled, and, at start-up, finishing or
undoing the jobs a killed agent left behind.

Undone, a job leaves nothing behind: libvirt's job is aborted (if it is ours), the new
checkpoint deleted (the older one still covers everything since it), the staged files,
scratch files and socket removed. Nothing half-written is published, and the next
backup is correct. Once the backup is published (its rename is the commit point) it
stands: a failure from then on, or an agent killed before it rewrote its intent,
finishes the job forward instead.
"""

from __future__ import annotations

import asyncio

from agent.backup import libvirt_job
from agent.backup.job import Intents, Job, remove_files
from agent.chain.checkpoints import Chains
from agent.core.errors import AgentError, BackupNotFoundError, VirtError
from agent.core.logs import get_logger
from agent.repository.store import Repository
from agent.virt.connection import VirtConnection

log = get_logger("backup")


class Undo:
    """Undoes or finishes the jobs of this host, from their intents."""

    def __init__(
        self,
        connection: VirtConnection,
        chains: Chains,
        repository: Repository,
        intents: Intents,
    ) -> None:
        self._connection = connection
        self._chains = chains
        self._repository = repository
        self._intents = intents

    async def after_failure(self, job: Job, *, began_publishing: bool) -> None:
        """Undo, without letting a failure of the undo hide why the backup failed.

        A backup published already stands, and is finished instead: publishing (a
        rename) is the commit point, and a cancellation can arrive just after it. Only
        a job that began to publish asks the repository (libvirt's job has ended by
        then): one that cannot tell is left, intent and all, to the next start.
        """
        try:
            published = began_publishing and await self._published(job)
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

    async def recover(self) -> list[str]:
        """At start-up: finish or undo the jobs a previous agent left behind (killed)."""
        handled = []
        for path in await self._intents.leftovers():
            try:
                job = Job.from_json(await asyncio.to_thread(path.read_text))
                await (self._roll_forward(job) if await self._published(job) else self._undo(job))
            except (AgentError, OSError, ValueError, KeyError) as exc:
                log.error(
                    "could not recover a left-over backup job yet", intent=str(path), error=str(exc)
                )
                continue
            handled.append(job.backup_id)
        for stale in await self._repository.cleanup_staging():
            log.info("removed staged backup left by a crash", path=str(stale))
        return handled

    async def _undo(self, job: Job) -> None:
        """Remove everything a failed job created; every step tolerates what is gone.

        The intent is kept (and the undo retried at the next start) unless libvirt's
        backup job is known to be over: a job left running blocks every later backup.
        """
        log.warning("undoing backup", backup_id=job.backup_id, checkpoint=job.checkpoint)
        try:
            await self._connection.call(
                "abort backup job", libvirt_job.abort_own_job, job.uuid, str(job.socket)
            )
            ended = True
        except VirtError as exc:
            log.error("could not end libvirt's backup job", backup_id=job.backup_id, error=str(exc))
            ended = False
        try:
            await self._chains.discard_if_recorded(job.domain, job.uuid, job.checkpoint)
        finally:
            await self._repository.discard(job.staging)
        await asyncio.to_thread(remove_files, [*job.scratch.values(), job.socket])
        if ended:
            await self._intents.drop(job)

    async def _roll_forward(self, job: Job) -> None:
        """A job that ended after publishing (checked by :meth:`_published`): its backup
        stands; finish marking it."""
        await self._chains.backup_succeeded(job.domain, job.checkpoint)
        await self._intents.drop(job)

    async def _published(self, job: Job) -> bool:
        """Whether the job's backup is in the repository. An intent that says published
        must find it there (else an error); one that does not may be from an agent
        killed between the rename and rewriting the intent."""
        try:
            await self._repository.backup(job.domain, job.backup_id)
        except BackupNotFoundError:
            if job.published:
                raise
            return False
        return True
