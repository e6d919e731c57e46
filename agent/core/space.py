"""Space admission across jobs: the bytes that running jobs may still write, per filesystem.

A job measures a filesystem's free space before it starts, but so does every other job
running meanwhile: two backups (or a backup and retention's merge copy) admitted against
the same free bytes can each fit alone and fill the filesystem together. So every job
that writes big files reserves its worst case here first, on the filesystem's device
(``st_dev``), and is refused if the free space less what the running jobs hold does not
cover it. A reservation is held until the job ends, whatever it has written meanwhile:
what a running job has written already is thus counted twice (in the free space
measured, and in its reservation), which errs on the side of refusing.

One :class:`SpaceBook` per agent (made in :mod:`agent.service`, shared by the backups and
the repository's retention); it is only used from the event loop.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.core.blocking import Filesystem
from agent.core.errors import RepositoryError, RepositorySpaceError


@dataclass(frozen=True, slots=True)
class Need:
    """``nbytes`` a job may write on the filesystem of ``path`` (``what``: e.g.
    "repository"), whose device is ``device`` and which has ``free`` bytes free now."""

    what: str
    path: str
    device: int
    free: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Reservation:
    """Held space of one job (release it with :meth:`SpaceBook.release`)."""

    key: int
    job: str
    held: tuple[tuple[int, int], ...]  # (device, bytes)


class SpaceBook:
    """The space running jobs hold, per device; see the module docstring."""

    def __init__(self) -> None:
        self._held: dict[int, tuple[str, tuple[tuple[int, int], ...]]] = {}
        self._keys = itertools.count()

    def reserve(self, job: str, needs: Sequence[Need]) -> Reservation:
        """Hold every need of ``job`` (needs on one device add up), or none of them:
        RepositorySpaceError naming what it needed, what was free and what running jobs
        hold, if a device cannot cover it."""
        by_device: dict[int, list[Need]] = {}
        for need in needs:
            by_device.setdefault(need.device, []).append(need)
        for device, on_device in by_device.items():
            self._check(job, device, on_device)
        totals = tuple((d, sum(n.nbytes for n in ns)) for d, ns in by_device.items())
        reservation = Reservation(next(self._keys), job, totals)
        self._held[reservation.key] = (job, totals)
        return reservation

    def release(self, reservation: Reservation | None) -> None:
        if reservation is not None:
            self._held.pop(reservation.key, None)

    def held(self, device: int) -> int:
        """Bytes running jobs hold on ``device``."""
        return sum(n for _, totals in self._held.values() for d, n in totals if d == device)

    def holders(self, device: int) -> list[tuple[str, int]]:
        """(job, bytes) of each job holding space on ``device``."""
        return [(job, n) for job, totals in self._held.values() for d, n in totals if d == device]

    def _check(self, job: str, device: int, needs: list[Need]) -> None:
        need = sum(n.nbytes for n in needs)
        free = min(n.free for n in needs)  # measured moments apart: the smaller one
        held = self.held(device)
        if free - held >= need:
            return
        what = " and ".join(f"{n.what} {n.path}" for n in needs)
        if len(needs) > 1:
            what += " (one filesystem) have"
        else:
            what += " has"
        holders = ", ".join(f"{j}: {n}" for j, n in self.holders(device))
        raise RepositorySpaceError(
            f"{what} {free} bytes free, of which running jobs hold {held}"
            f"{f' ({holders})' if holders else ''}; {job} may need {need}; refusing to start",
            path=needs[0].path,
            needed=need,
            free=free,
            held=held,
        )


async def measure(fs: Filesystem, what: str, nbytes: int) -> Need:
    """A need of ``nbytes`` on the filesystem of ``fs.root`` (``what``: e.g. "repository"),
    its device and free space measured there, bounded by the filesystem's deadline. A
    root that does not exist yet is measured where it would be made, and not made."""
    device, free = await fs.call(f"statvfs of the {what}", _device_and_free, fs.root)
    return Need(what, str(fs.root), device, free, nbytes)


async def size_and_free(fs: Filesystem, what: str) -> tuple[int, int]:
    """The size and free bytes of the filesystem of ``fs.root`` (as :func:`measure`
    measures it), bounded by the filesystem's deadline."""
    return await fs.call(f"statvfs of the {what}", _size_and_free, fs.root)


def _statvfs(path: Path) -> tuple[int, os.statvfs_result]:
    existing = path
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        return os.stat(existing).st_dev, os.statvfs(existing)
    except OSError as exc:
        raise RepositoryError(
            f"cannot stat the filesystem of {path}: {exc.strerror or exc}", path=str(path)
        ) from exc


def _device_and_free(path: Path) -> tuple[int, int]:
    device, stats = _statvfs(path)
    return device, stats.f_bavail * stats.f_frsize


def _size_and_free(path: Path) -> tuple[int, int]:
    _, stats = _statvfs(path)
    return stats.f_blocks * stats.f_frsize, stats.f_bavail * stats.f_frsize
