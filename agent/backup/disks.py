"""The disks of one job copied, in parallel, on the data plane's loop.

Each disk's staged repository image is created and served by a local qemu-nbd
(:mod:`agent.qemu.qemu_nbd`) while libvirt begins the job; once it has begun, the disk
is read from QEMU's NBD export (Unix socket in the agent's private directory), over up
to ``[backup] connections`` connections, and what its block status says is copied
(:mod:`agent.backup.copy`). A disk with no bitmap is read whole, block by block, and only
the blocks that differ from the previous point are written: into an image on top of the
previous point's (``layered``), or into a standalone one, which gets only the blocks that
are not zero (:mod:`agent.repository.blocks`). One failing disk cancels the others; every socket and
qemu-nbd is closed before the failure is raised, so an undo never races them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Mapping

from agent.backup.copy import (
    PointSums,
    RateLimit,
    Run,
    aligned,
    blocks_to_read,
    copy_runs,
    runs_to_copy,
    table_openers_first,
    together,
)
from agent.backup.data_plane import DataPlane
from agent.backup.job import Job
from agent.backup.plan import BackupPlan, DiskPlan
from agent.backup.progress import Progress, Tally, from_data_plane
from agent.core.config import AgentConfig
from agent.core.errors import BackupError
from agent.core.faults import Faults
from agent.nbd.client import NbdClient, connect_many
from agent.nbd.extents import extents
from agent.nbd.wire import BASE_ALLOCATION as ALLOCATION
from agent.nbd.wire import Extent
from agent.qemu.qemu_nbd import serve_image
from agent.repository.blocks import BLOCK, zero_digest
from agent.repository.manifest import DiskManifest, Manifest, RangeChecksum
from agent.repository.store import Repository
from agent.repository.windows import ZERO, as_hex, updated

# A disk's staged image: its name, its backing (an increment's parent) and connections
# to the qemu-nbd that serves it.
_Target = tuple[str, str | None, list[NbdClient]]


class DiskCopies:
    """Copies the disks of this host's jobs; owns the data plane they run on."""

    def __init__(self, config: AgentConfig, repository: Repository, faults: Faults) -> None:
        self._config = config
        self._repository = repository
        self._faults = faults
        self._data_plane = DataPlane()

    async def copy(
        self,
        plan: BackupPlan,
        job: Job,
        parent: Manifest | None,
        progress: Progress | None,
        begun: concurrent.futures.Future[None],
        blocks: Mapping[str, Mapping[int, str]],
    ) -> tuple[DiskManifest, ...]:
        """Every disk of ``plan`` into the job's staging directory; the export is read
        once ``begun`` is set (cancelled: the job did not begin). ``blocks``: for each disk
        with no bitmap, the digests of the blocks the previous point holds (empty for a
        standalone image)."""
        limit = (
            RateLimit(self._config.backup.bandwidth_limit)
            if self._config.backup.bandwidth_limit
            else None
        )
        tally = Tally(from_data_plane(progress), faults=self._faults)
        # The bytes move on the data plane's loop, so this loop stays responsive.
        return await self._data_plane.run(
            self._copy_disks(plan, job, parent, limit, tally, begun, blocks)
        )

    async def close(self) -> None:
        """Stop the data plane (at agent shutdown, after every job has ended)."""
        await self._data_plane.close()

    async def _copy_disks(
        self,
        plan: BackupPlan,
        job: Job,
        parent: Manifest | None,
        limit: RateLimit | None,
        tally: Tally,
        begun: concurrent.futures.Future[None],
        blocks: Mapping[str, Mapping[int, str]],
    ) -> tuple[DiskManifest, ...]:
        # One failing disk cancels the others before anything is undone.
        copies = [
            self._copy_disk(disk, job, parent, limit, tally, begun, blocks.get(disk.target))
            for disk in plan.disks
        ]
        return tuple(await together(copies))

    async def _copy_disk(
        self,
        disk: DiskPlan,
        job: Job,
        parent: Manifest | None,
        limit: RateLimit | None,
        tally: Tally,
        begun: concurrent.futures.Future[None],
        previous: Mapping[int, str] | None,
    ) -> DiskManifest:
        """Create and serve the disk's repository image, then (once the job has begun)
        copy what the export's block status says into it (a disk with no bitmap: its
        blocks that differ from ``previous``)."""
        contexts = [ALLOCATION] + ([] if disk.full else [f"qemu:dirty-bitmap:backup-{disk.target}"])
        if not disk.bitmap and previous is None:
            previous = {}  # (a standalone image: every block that is not zero)
        async with contextlib.AsyncExitStack() as stack:
            size = disk.size
            # Unless libvirt did not report the capacity (then the export will tell).
            opened = await self._open_target(stack, disk, job, parent, size) if size else None
            await asyncio.wrap_future(begun)
            sources = await self._connect_export(stack, disk, job, contexts)
            exported = sources[0].info.size
            if opened is None:
                size = exported
                opened = await self._open_target(stack, disk, job, parent, size)
            elif exported != size:
                raise _resized(disk, job, exported, size)
            image, backing, targets = opened
            runs = await _runs(sources[0], contexts, size if previous is not None else None)
            if previous is None:  # (blocks are whole windows already)
                runs = aligned(runs, size)
            if _overlay(disk):  # written through the page cache
                runs = table_openers_first(runs)
            tally.expect(sum(r.length for r in runs))
            blocks: list[RangeChecksum] = []
            # None: the parent's digest is not known, nor will this point's be (a disk
            # read in full sums all its blocks: it needs none).
            known = previous is not None or _parent_digest(disk, parent, size) is not None
            sums = PointSums() if known else None
            checksums = await self._copy_runs(
                disk, sources, targets, runs, limit, tally, previous, blocks, sums
            )
        if previous is None:
            copied = sum(r.length for r in runs)
        else:  # what grows the repository: the blocks of data written
            copied = sum(c.length for c in checksums if c.digest != zero_digest(c.length))
        return DiskManifest(
            target=disk.target,
            image=image,
            mode=disk.mode,
            reason=disk.reason,
            virtual_size=size,
            bytes_copied=copied,
            backing=backing,
            checksums=tuple(checksums),
            block_size=BLOCK if previous is not None else None,
            blocks=tuple(blocks),
            point_digest=(
                as_hex(sums.whole)
                if previous is not None and sums is not None
                else _point_digest(disk, parent, size, sums)
            ),
        )

    async def _connect_export(
        self, stack: contextlib.AsyncExitStack, disk: DiskPlan, job: Job, contexts: list[str]
    ) -> list[NbdClient]:
        """Connections to QEMU's export of the disk, closed with ``stack``."""
        sources = await connect_many(
            self._config.backup.connections,
            socket_path=job.socket,
            export=disk.target,
            meta_contexts=contexts,
        )
        stack.push_async_callback(_close_all, sources)
        return sources

    async def _open_target(
        self,
        stack: contextlib.AsyncExitStack,
        disk: DiskPlan,
        job: Job,
        parent: Manifest | None,
        size: int,
    ) -> _Target:
        """The staged image (name, backing), served by a local qemu-nbd, and connections
        to it."""
        settings = self._config.backup
        image, backing = await self._repository.create_image(
            job.staging, disk.target, size, backing=parent if _overlay(disk) else None
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
                backing=_overlay(disk),
                direct=not _overlay(disk),
                setpriv=self._config.agent.setpriv,
            )
        )
        targets = await connect_many(settings.connections, socket_path=served)
        stack.push_async_callback(_close_all, targets)
        return image, backing, targets

    async def _copy_runs(
        self,
        disk: DiskPlan,
        sources: list[NbdClient],
        targets: list[NbdClient],
        runs: list[Run],
        limit: RateLimit | None,
        tally: Tally,
        previous: Mapping[int, str] | None,
        blocks: list[RangeChecksum],
        sums: PointSums | None,
    ) -> list[RangeChecksum]:
        settings = self._config.backup
        checksums = await copy_runs(
            sources,
            targets,
            runs,
            # Blocks compared with the previous point's are written one request each.
            request_size=settings.request_size if previous is None else BLOCK,
            read_size=settings.read_size,
            in_flight=settings.in_flight,
            punch_holes=not _overlay(disk),
            limit=limit,
            progress=tally.add,
            previous=previous,
            blocks=blocks,
            sums=sums,
            # An increment's old bytes, read through its parent (a layered disk's blocks
            # read those they compare anyway).
            read_old=sums is not None and _overlay(disk) and previous is None,
        )
        # The target advertises multi-conn whenever there are several connections:
        # one flush covers the writes completed on all of them.
        await targets[0].flush()
        return checksums


def _resized(disk: DiskPlan, job: Job, exported: int, size: int) -> BackupError:
    return BackupError(
        f"QEMU exports {disk.target} with {exported} bytes, libvirt reported "
        f"{size}: the disk changed size",
        code="disk-resized",
        domain=job.domain,
    )


def _parent_digest(disk: DiskPlan, parent: Manifest | None, size: int) -> str | None:
    """The digest of the point the disk's image sits on: 0 for a standalone image; None
    where the parent's is not known (a backup of manifest version 3 or older)."""
    if not _overlay(disk):
        return ZERO
    below = parent.disk(disk.target) if parent is not None else None
    if below is None or below.virtual_size != size:  # (resized: the chain would say so)
        return None
    return below.point_digest


def _point_digest(
    disk: DiskPlan, parent: Manifest | None, size: int, sums: PointSums | None
) -> str | None:
    """The point's digest: the parent's minus what the copy overwrote, plus what it
    wrote; None if the parent's is not known."""
    start = _parent_digest(disk, parent, size)
    if start is None or sums is None:
        return None
    return updated(start, sums.old, sums.new)


def _overlay(disk: DiskPlan) -> bool:
    """Whether the disk's image sits on the parent backup's (an increment, or layered)."""
    return not disk.full or disk.layered


async def _runs(source: NbdClient, contexts: list[str], whole: int | None) -> list[Run]:
    """What to copy: allocation, and for an incremental the dirty bitmap, from the export;
    for a disk of ``whole`` bytes read in full, every block."""
    allocation = [e async for e in extents(source, ALLOCATION)]
    if whole is not None:
        return blocks_to_read(allocation, whole, BLOCK)
    dirty: list[Extent] | None = None
    if len(contexts) > 1:
        dirty = [e async for e in extents(source, contexts[1])]
    return runs_to_copy(allocation, dirty)


async def _close_all(clients: list[NbdClient]) -> None:
    for client in clients:
        await client.close()
