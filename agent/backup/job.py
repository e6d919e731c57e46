"""What a backup job creates, written down (its intent) before it creates any of it.

A job's intent, ``<state_dir>/run/jobs/<uuid>.json``, names the checkpoint, staging
directory, socket and scratch files the job will create, so that an agent killed at any
later point finds and removes them at its next start (:mod:`agent.backup.undo`). It is
rewritten once the backup is published (``published``: from then on the job is finished
forward, never undone), and dropped when the job is over or undone.

The run directory holds QEMU's backup sockets as well: it, and the intents in it, are
the agent's only (mode 0700).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.core.config import AgentConfig


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
        )


class Intents:
    """The intents of this host's jobs in ``<run_path>/jobs``, each named after its
    domain's UUID (one job per domain at a time)."""

    def __init__(self, config: AgentConfig) -> None:
        self._config = config

    async def write(self, job: Job) -> None:
        """Write (or rewrite) the job's intent, durably, and make its socket's directory."""
        await asyncio.to_thread(_private_dir, job.socket.parent)
        await asyncio.to_thread(_write_private, self._path(job), job.to_json())

    async def drop(self, job: Job) -> None:
        await asyncio.to_thread(remove_files, [self._path(job)])

    async def leftovers(self) -> list[Path]:
        """Intents of jobs not yet undone (an undo keeps its intent until libvirt's job
        is known to be over); empty once recovery is complete."""
        jobs_dir = self._config.run_path / "jobs"
        return await asyncio.to_thread(
            lambda: sorted(jobs_dir.glob("*.json")) if jobs_dir.exists() else []
        )

    def _path(self, job: Job) -> Path:
        return self._config.run_path / "jobs" / f"{job.uuid}.json"


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
    path.parent.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent.parent, 0o700)
    path.parent.mkdir(exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
