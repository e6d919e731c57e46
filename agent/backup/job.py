"""What a backup job creates, written down (its intent) before it creates any of it.

A job's intent, ``<state_dir>/run/jobs/<uuid>.json``, names the checkpoint, staging
directory, socket and scratch files the job will create, so that an agent killed at any
later point finds and removes them at its next start (:mod:`agent.backup.undo`). It is
rewritten once the backup is published (``published``: from then on the job is finished
forward, never undone), and dropped when the job is over or undone.

The run directory holds QEMU's backup sockets as well: it, and the intents in it, are
the agent's only (mode 0700). An intent is written to a temporary file, fsync'd, renamed
into place, and its directory fsync'd (and so are the directories made for it), so that
it survives a crash of the host as well as of the agent; a dropped intent's directory is
fsync'd too, so that a crash never brings back an intent whose job was undone.

Every filesystem call here, and removing a job's scratch files and socket, is bounded by
``[repository] io_timeout`` on the filesystem's own threads (:mod:`agent.core.blocking`):
on a hung mount the job fails (FilesystemHungError) and its intent stays for the next try.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.core.blocking import Filesystem
from agent.core.config import AgentConfig
from agent.core.durable import make_dir_durably, remove_durably, write_durably


@dataclass(frozen=True, slots=True)
class Job:
    """What one running job created, so it can be undone (also written as the intent)."""

    uuid: str
    domain: str
    backup_id: str
    checkpoint: str
    staging: Path
    socket: Path
    scratch: Mapping[str, Path]
    published: bool = False
    job_id: str | None = None  # the agent's job (API, NATS, schedule) that runs it, if any

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
                "job_id": self.job_id,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Job:
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
            job_id=data.get("job_id"),
        )


class Intents:
    """The intents of this host's jobs in ``<run_path>/jobs``, each named after its
    domain's UUID (one job per domain at a time)."""

    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        timeout = config.repository.io_timeout
        self._run = Filesystem(config.run_path, timeout=timeout)
        self._sockets = Filesystem(config.socket_path, timeout=timeout)
        self._scratch = Filesystem(config.scratch_path, timeout=timeout)

    async def write(self, job: Job) -> None:
        """Write (or rewrite) the job's intent, durably, and make its socket's directory."""
        await self._sockets.call("make the socket directory", _private_dir, job.socket.parent)
        await self._run.call("write a job intent", _write_private, self._path(job), job.to_json())

    async def drop(self, job: Job) -> None:
        await self._run.call("drop a job intent", remove_durably, self._path(job))

    async def remove_files(self, job: Job) -> None:
        """Remove the job's scratch files and socket (those already gone are fine)."""
        scratch = list(job.scratch.values())
        await self._scratch.call("remove scratch files", remove_files, scratch)
        # QEMU's export socket, and those of the job's local qemu-nbd servers (named in
        # agent.backup.disks) with their pid files: a killed agent leaves them all.
        sockets = [job.socket]
        for target in job.scratch:
            served = job.socket.with_name(f"{job.backup_id}-{target}.sock")
            sockets += [served, served.with_name(served.name + ".pid")]
        await self._sockets.call("remove the backup sockets", remove_files, sockets)

    async def read(self, path: Path) -> str | None:
        """An intent's text; None if it is gone (dropped meanwhile)."""
        return await self._run.call("read a job intent", _read_if_there, path)

    async def leftovers(self) -> list[Path]:
        """Intents of jobs not yet undone (an undo keeps its intent until libvirt's job
        is known to be over); empty once recovery is complete."""
        jobs_dir = self._config.run_path / "jobs"
        return await self._run.call(
            "list job intents",
            lambda: sorted(jobs_dir.glob("*.json")) if jobs_dir.exists() else [],
        )

    def _path(self, job: Job) -> Path:
        return self._config.run_path / "jobs" / f"{job.uuid}.json"


def _read_if_there(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def remove_files(paths: list[Path]) -> None:
    """Remove files and directories (with their contents); those already gone are fine."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def _private_dir(path: Path) -> None:
    # QEMU's backup export listens here: only the agent may reach it.
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def _write_private(path: Path, text: str) -> None:
    # The run directory holds QEMU's backup sockets: only the agent may read it.
    make_dir_durably(path.parent)
    os.chmod(path.parent.parent, 0o700)
    os.chmod(path.parent, 0o700)
    write_durably(path, text, mode=0o600)
