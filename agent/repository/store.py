"""The backup repository: finished backups as qcow2 chains, one JSON manifest per backup.

Each disk of a domain is a qcow2 chain: the full backup's image, then one overlay per
incremental backup whose backing file is the previous backup's image of that disk, named
by a *relative* path. The repository can thus be copied or moved anywhere and restored
without the agent: ``qemu-img convert`` on any backup's image gives the whole disk as it
was at that backup. A disk can be full in a backup whose other disks are incremental (its
chain broke, or it was added): its image then has no backing file.

:class:`Repository` is the public surface; the work is done in its sibling modules:

``manifest``   what a backup holds (:class:`Manifest`) and its strictly read JSON file
``layout``     the directories and files, durable file operations, staging and publishing
``listing``    a domain's backups read with what is damaged named (:class:`.listing.Damage`)
``layers``     qemu-img, bounded, and what it says about one image layer
``verify``     images checked against their manifests (:class:`Problem`)
``restore``    one disk at one backup written out as a standalone image
``retention``  the oldest backups dropped, crash-safely, the rest restoring as before

A backup appears only complete (:meth:`Repository.publish`, see :mod:`.layout`): staged
in ``.staging-<id>`` beside the published backups, then renamed.

Why the writer needs the backing chain: qcow2 allocates whole clusters (64 KiB). A write
covering part of an unallocated cluster of an overlay copies the rest of the cluster from
the backing file; opened with ``"backing": null`` it copies zeros instead, and the restored
disk silently loses the untouched part of that cluster. Staging beside the published
backups is what lets a staged overlay's relative backing path resolve.

Every file operation runs in a worker thread and every qemu-img call is bounded
(:mod:`.layers`), so the event loop never blocks. OSError and qemu-img failures become
RepositoryError.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from agent.core.blocking import Filesystem
from agent.core.errors import (
    BackupNotFoundError,
    PublishUndecidedError,
    RepositoryError,
    RetentionRefusedError,
)
from agent.core.faults import Faults, no_faults
from agent.core.logs import get_logger
from agent.core.shielding import to_completion
from agent.core.space import SpaceBook, measure
from agent.repository import layout
from agent.repository.layers import QemuImg, _LayerInfo
from agent.repository.layout import (
    BACKUPS_DIR,
    INTENT_FILE,
    STAGING_PREFIX,
    _backing_path,
    _check_name,
    _check_new_image,
    _check_publishable,
    _check_staging,
    _domain_names,
    _has_backups,
    _make_staging,
    _os_errors,
    _read_backup,
    _remove_leftovers,
    _remove_tree,
    _round_trip,
)
from agent.repository.listing import (
    LinkCache,
    Listing,
    Tip,
    mark_damaged,
    read_listing,
    read_newest,
    read_tip,
)
from agent.repository.manifest import (
    BACKUP_ID_RE,
    MANIFEST_FILE,
    DiskManifest,
    Manifest,
)
from agent.repository.marker import RepositoryMarker
from agent.repository.restore import restore_image
from agent.repository.retention import (
    Retention,
    _read_intent,
    _write_intent,
    plan,
    undropped_damage,
)
from agent.repository.verify import (
    Problem,
    Verifier,
    with_damage,
)

# Imported from here by the layers above (their defining modules are named above).

log = get_logger("repository")

_UUID_RE = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")

# Writing the manifest, the fsyncs (the images' data was flushed by the copy) and the
# rename: seconds, unless the filesystem hangs.
PUBLISH_TIMEOUT = 600.0


class Repository:
    """One repository directory (local or on a shared filesystem); see the module docstring.

    ``timeout`` bounds quick qemu-img calls (create, info, map); ``copy_timeout`` bounds
    those that copy a whole disk (restore, retention merge). ``faults`` is the crash-point
    hook (:mod:`agent.core.faults`) called between retention steps.

    With ``state_dir`` (the agent's), the repository's marker is checked against the id
    recorded there before every write and restore (:mod:`.marker`): a path that is not
    this agent's repository (not mounted, another one mounted) is refused, and nothing
    written. Without it (tools, tests of the layout) nothing is checked.
    """

    def __init__(
        self,
        root: Path,
        *,
        timeout: float = 60.0,
        copy_timeout: float = 24 * 3600.0,
        faults: Faults = no_faults,
        state_dir: Path | None = None,
        io_timeout: float = 120.0,
        space: SpaceBook | None = None,
    ):
        self.root = root
        # Filesystem calls a failed job's undo and the space check wait on: bounded, on
        # the root's own threads (agent.core.blocking). ``space``: the agent's one book
        # of space held by running jobs (agent.core.space), shared with the backups.
        self.fs = Filesystem(root, timeout=io_timeout)
        self.space = space if space is not None else SpaceBook()
        self._marker = (
            None if state_dir is None else RepositoryMarker(root, state_dir, timeout=io_timeout)
        )
        self._qemu = QemuImg(timeout=timeout, copy_timeout=copy_timeout)
        self._faults = faults
        self._locks: dict[str, asyncio.Lock] = {}
        # Per staging directory, the headers of the images create_image made there, read
        # back right after creating them (see publish). Images are created on the data
        # plane's thread: only single dict operations here, no iteration.
        self._created: dict[Path, dict[str, _LayerInfo]] = {}
        # Per domain, the links of the manifests its chains were last read through (tip).
        self._link_caches: dict[str, LinkCache] = {}

    # -- reading ------------------------------------------------------------------------

    async def domain_named(self, domain: str) -> str | None:
        """The name the repository keeps ``domain`` under: ``domain`` itself if it has
        backups here by that name, else the domain whose newest backup has ``domain``
        as its UUID (a domain libvirt no longer has is known here by name only); None
        if the repository has no backup of it."""
        await self.check_marker()  # not "no backups" (or another's) if ours is not there
        if await self.fs.call("list backups", _has_backups, self._backups_dir(domain)):
            return domain
        if not _UUID_RE.fullmatch(domain):
            return None
        # The domain whose newest backup is the newest of those naming this UUID (after a
        # rename, the old name's backups name it too); an unreadable one is not it.
        found: tuple[float, str] | None = None
        for name in await self.fs.call("list domains", _domain_names, self.root):
            try:
                latest = await self.latest(name)
            except RepositoryError:  # (its backups directory cannot even be listed)
                continue
            if latest is not None and latest.domain_uuid.lower() == domain.lower():
                found = max(found or (latest.completed_at, name), (latest.completed_at, name))
        return found[1] if found is not None else None

    async def backups(self, domain: str) -> list[Manifest]:
        """The published backups of ``domain`` whose manifests read, oldest first (none if
        it has no directory); :meth:`listing` says what is damaged."""
        return list((await self.listing(domain)).manifests)

    async def listing(self, domain: str) -> Listing:
        """Every backup of ``domain``: those whose manifests read, and what is damaged
        (manifests that do not read, disks whose chain is broken); see :mod:`.listing`.
        A damaged file never hides the others. The backups an unfinished retention is
        dropping are not listed: their bottom images may hold a newer point already."""
        listing = await self.fs.call("read manifests", read_listing, self._backups_dir(domain))
        dropping = await self._dropping(domain)
        if not dropping:
            return listing
        return Listing(
            tuple(m for m in listing.manifests if m.backup_id not in dropping),
            tuple(d for d in listing.damaged if d.backup_id not in dropping),
        )

    async def backup(self, domain: str, backup_id: str) -> Manifest:
        backups_dir = self._backups_dir(domain)
        if not BACKUP_ID_RE.fullmatch(backup_id):
            raise BackupNotFoundError(f"{backup_id!r} is not a backup id", path=str(backups_dir))
        if backup_id in await self._dropping(domain):
            raise BackupNotFoundError(
                f"backup {backup_id} of {domain} is being dropped by retention",
                path=str(backups_dir / backup_id),
            )
        return await self.fs.call("read a manifest", _read_backup, backups_dir / backup_id, domain)

    async def _dropping(self, domain: str) -> set[str]:
        """The backups an unfinished retention of ``domain`` drops (its intent)."""
        intent = self._domain_dir(domain) / INTENT_FILE
        # (unreadable: an error naming it, never the backups it drops shown as sound)
        drop = await self.fs.call("read the retention intent", _read_intent, intent)
        return set(drop or ())

    async def latest(self, domain: str) -> Manifest | None:
        """The newest published backup of ``domain`` whose manifest reads (as the last
        of :meth:`backups`).

        Reads only the manifests of the newest second's backups (an id starts with its
        UTC second) unless none of them reads: every backup starts a chain's plan, and
        the manifest of a 2 GiB full takes 8 ms to read, of a 100 GiB one 50 times that.
        """
        newest, _ = await self.fs.call("read manifests", read_newest, self._backups_dir(domain))
        return newest

    async def tip(self, domain: str) -> Tip:
        """What a backup's plan needs of the repository: :meth:`latest`, its disks whose
        chain is broken, and any damaged backup at least as new (:func:`.read_tip`).

        Under the domain's lock, so that a retention's renames are never seen half-way
        as a broken chain. The older manifests of the chain are read once per agent (by
        their file identity, :class:`.LinkCache`).
        """
        cache = self._link_caches.setdefault(domain, LinkCache())
        async with self._lock(domain):
            return await self.fs.call("read manifests", read_tip, self._backups_dir(domain), cache)

    async def free_bytes(self) -> int:
        """Bytes an unprivileged writer can still use on the repository's filesystem."""

        def statvfs() -> int:
            with _os_errors("cannot stat filesystem of", self.root):
                st = os.statvfs(self.root)
            return st.f_bavail * st.f_frsize

        return await self.fs.call("statvfs", statvfs)

    # -- which repository this is (agent.repository.marker) ----------------------------

    async def ensure_ready(self, *, create: bool = True) -> None:
        """Before anything writes: the path is this agent's repository (initialised or
        adopted if the agent records none yet; a missing or empty path only with
        ``create``) on a writable filesystem; else RepositoryMarkerError or
        RepositoryReadOnlyError, and nothing was written."""
        if self._marker is not None:
            await self._marker.ensure_ready(create=create)

    async def check_marker(self) -> None:
        """Before reading: if the agent records a repository id, the path holds that
        repository (RepositoryMarkerError otherwise). Writes nothing."""
        if self._marker is not None:
            await self._marker.check()

    # -- writing a backup ---------------------------------------------------------------

    def new_backup_id(self) -> str:
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)

    async def stage(self, domain: str, backup_id: str) -> Path:
        """Create and return the staging directory of a new backup ``backup_id``."""
        await self.ensure_ready()
        if not BACKUP_ID_RE.fullmatch(backup_id):
            raise RepositoryError(f"{backup_id!r} is not a backup id")
        async with self._lock(domain):  # not while a sweep goes through the domain
            return await self.fs.call(
                "make the staging directory", _make_staging, self._backups_dir(domain), backup_id
            )

    async def create_image(
        self, staging: Path, target: str, virtual_size: int, *, backing: Manifest | None
    ) -> tuple[str, str | None]:
        """Create ``<staging>/<target>.qcow2``: full, or an overlay of ``backing``'s image.

        Returns the image's name and its backing path (``../<id>/<image>``, valid from the
        staging directory as from the published one), or None for a full image.
        ``virtual_size`` must be a multiple of 512 (qcow2 would round it up).
        """
        _check_staging(staging)
        _check_name(target, "disk target")
        if virtual_size <= 0 or virtual_size % 512:
            raise RepositoryError(f"virtual size {virtual_size} is not a positive multiple of 512")
        image = f"{target}.qcow2"
        backing_path = None if backing is None else _backing_path(backing, target)
        await self.fs.call("check a new image", _check_new_image, staging, image, backing_path)
        args = ["create", "-q", "-f", "qcow2"]
        if backing_path is not None:
            # No -u: the backing resolves from staging, so qemu-img checks it opens as qcow2.
            args += ["-b", backing_path, "-F", "qcow2"]
        path = staging / image
        await self._qemu.run([*args, str(path), str(virtual_size)], path)
        self._created.setdefault(staging, {})[image] = await self._layer_info(path)
        return image, backing_path

    async def publish(self, domain: str, staging: Path, manifest: Manifest) -> Path:
        """Make the staged backup visible, complete and durable; return its directory."""
        await self.check_marker()
        _check_staging(staging)
        if staging != self._backups_dir(domain) / f"{STAGING_PREFIX}{manifest.backup_id}":
            raise RepositoryError(
                f"{staging} is not the staging directory of {domain} {manifest.backup_id}",
                path=str(staging),
            )
        async with self._lock(domain):
            text = await self._checked_for_publishing(staging, manifest)
            # Once the thread renames, the backup is published whatever happens to this
            # task: a cancellation waits for the thread, so that an undo never races it.
            # Bounded (a hung NFS mount): then nobody can tell, and nobody may undo.
            try:
                published = await to_completion(
                    asyncio.to_thread(layout._publish, staging, manifest, text),
                    timeout=PUBLISH_TIMEOUT,
                )
            except TimeoutError as exc:
                raise PublishUndecidedError(
                    f"publishing {manifest.backup_id} did not finish within "
                    f"{PUBLISH_TIMEOUT:g} s; it is decided at the agent's next start",
                    path=str(staging),
                ) from exc
            self._created.pop(staging, None)
            return published

    async def _checked_for_publishing(self, staging: Path, manifest: Manifest) -> str:
        """The manifest's JSON, once it and the staged images are fit to publish."""
        # Round trip: what is published must be readable by from_json's strict checks.
        # A manifest of a large disk is megabytes of JSON: not on the event loop.
        # Together; the first failure cancels the rest (their qemu-img processes too).
        verifier = Verifier(self._qemu, self._layer_info)
        try:
            async with asyncio.TaskGroup() as group:
                text = group.create_task(
                    asyncio.to_thread(_round_trip, manifest, staging / MANIFEST_FILE)
                )
                group.create_task(
                    self.fs.call("check the staged backup", _check_publishable, staging, manifest)
                )
                # The header (format, virtual size, backing file) of an image create_image
                # made was read back right after creating it: only qemu-img create writes
                # those fields (qemu-nbd writes guest data), and reading them again here
                # took a qemu-img process, 15-20 ms of every backup. Given up: proof that
                # the image still opens after the copy (qemu-nbd failing mid-copy fails
                # the copy; `verify` reads every image).
                created = self._created.get(staging, {})
                structures = [
                    group.create_task(
                        verifier.structure(staging, d, "", header=created.get(d.image))
                    )
                    for d in manifest.disks
                ]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from failed  # tasks raise plain exceptions
        problems = [p for task in structures for p in task.result()[0]]
        if problems:
            raise RepositoryError(
                f"cannot publish {manifest.backup_id}: {problems[0].message}",
                path=str(problems[0].image),
            )
        return text.result()

    async def discard(self, staging: Path) -> None:
        """Delete a staged backup (after a failure); nothing if it is already gone."""
        _check_staging(staging)
        self._created.pop(staging, None)
        await self.fs.call("remove staged backup", _remove_tree, staging)

    async def cleanup_staging(
        self, *, skip: Callable[[str], bool] = lambda domain: False
    ) -> list[Path]:
        """Finish interrupted retentions and remove every hidden leftover, except in the
        domains ``skip`` names (checked under the domain's lock, which :meth:`stage` takes
        too: a backup that is about to stage, or staging, must be named by then).

        Removes ``.staging-*`` (backups being written when the agent died), ``.merge-*`` and
        ``.dropped-*``; returns what it removed.
        Refused (RepositoryMarkerError) where another repository, or none, is mounted:
        its leftovers are not this agent's.
        """
        await self.check_marker()
        removed: list[Path] = []
        for domain in await self.fs.call("list domains", _domain_names, self.root):
            async with self._lock(domain):
                if skip(domain):
                    continue
                await self._finish_retention(domain)
                removed += await self.fs.call(
                    "remove leftovers", _remove_leftovers, self._backups_dir(domain)
                )
        return removed

    # -- restore ------------------------------------------------------------------------

    async def point_image(
        self, domain: str, backup_id: str, target: str
    ) -> tuple[Path, DiskManifest]:
        """The image whose chain reads disk ``target`` as it was at ``backup_id``, and the
        disk's manifest (the marker checked first)."""
        await self.check_marker()
        manifest = await self.backup(domain, backup_id)
        disk = manifest.disk(target)
        if disk is None:
            have = ", ".join(d.target for d in manifest.disks)
            raise RepositoryError(f"backup {backup_id} has no disk {target!r} (it has {have})")
        return self._backups_dir(domain) / backup_id / disk.image, disk

    async def restore(
        self,
        domain: str,
        backup_id: str,
        target: str,
        dest: Path,
        *,
        fmt: str = "qcow2",
        mode: int = 0o600,
        progress: Callable[[float], None] | None = None,
        check_digest: bool = True,
    ) -> None:
        """Write disk ``target`` as it was at ``backup_id`` to ``dest``, a standalone image
        with permissions ``mode``, checked against the point's digest (unless not
        ``check_digest``; a backup that recorded none is not).

        Written to ``<dest>.part`` and renamed when complete and fsync'd; an existing
        ``dest`` is refused. ``progress`` gets the fraction done as qemu-img reports it.
        """
        if fmt not in ("qcow2", "raw"):
            raise RepositoryError(f"cannot restore to format {fmt!r} (qcow2 or raw)")
        source, disk = await self.point_image(domain, backup_id, target)
        await restore_image(
            self._qemu,
            source,
            dest,
            fmt=fmt,
            mode=mode,
            progress=progress,
            expected=disk.point_digest if check_digest else None,
        )

    # -- verify -------------------------------------------------------------------------

    async def verify(self, domain: str, backup_id: str | None = None) -> list[Problem]:
        """Check one backup (or all of ``domain``'s) against its manifest; [] if all is well.

        A damaged backup (:meth:`listing`) is a problem too: a manifest that does not
        read (target ``-``), a disk whose chain reads a damaged backup.
        """
        listing = await self.listing(domain)
        if backup_id is None:
            manifests, damaged = list(listing.manifests), listing.damaged
        else:
            damaged = listing.damage_of(backup_id)
            whole = [d for d in damaged if d.target is None]
            manifests = [] if whole else [await self.backup(domain, backup_id)]
        verifier = Verifier(self._qemu, self._layer_info)
        problems = await verifier.backups(self._backups_dir(domain), manifests)
        return with_damage(problems, damaged, [m.backup_id for m in listing.manifests])

    # -- retention ----------------------------------------------------------------------

    async def apply_retention(self, domain: str, keep_last: int) -> list[str]:
        """Drop the oldest backups of ``domain`` so that ``keep_last`` remain; return their ids.

        Finishes an interrupted retention first. Every remaining backup restores exactly
        as before; see :mod:`agent.repository.retention` for the steps and their crash
        safety.
        """
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, not {keep_last}")
        await self.check_marker()
        async with self._lock(domain):
            await self._finish_retention(domain)
            listing = await self.listing(domain)
            manifests = list(listing.manifests)
            if len(manifests) <= keep_last:
                return []
            if listing.damaged:
                _refuse_retention(domain, listing, "drops nothing")
                first = listing.damaged[0]
                raise RetentionRefusedError(
                    f"retention of {domain} refused: backup {first.backup_id} is damaged "
                    f"({first.error}); nothing was merged or dropped. Repair or remove it "
                    f"(`backup-agent backups {domain}` names it) and retention resumes",
                    path=str(first.path),
                )
            drop, _ = plan(manifests, keep_last)
            problems, sums = await self._retention(domain).preflight(manifests, drop)
            if problems:
                # Kept, and named from now on: the next backups of those disks are full.
                await self.mark_damaged(problems)
                raise RetentionRefusedError(
                    f"retention of {domain} refused: {len(problems)} problem(s) in the backups "
                    f"to merge, first: {problems[0].message}",
                    path=str(problems[0].image),
                )
            intent = self._domain_dir(domain) / INTENT_FILE
            await self.fs.call("write the retention intent", _write_intent, intent, drop, sums)
            self._faults("retention:intent-written")
            await self._retention(domain).run(drop)
            return drop

    async def mark_damaged(self, problems: Sequence[Problem]) -> list[Path]:
        """Note beside each image with a data problem what was found (its first one), so
        that listings name it damaged until an operator removes the note (.listing);
        the images noted."""
        found: dict[Path, str] = {}
        for p in problems:
            if p.offset is not None and p.image.name.endswith(".qcow2"):
                found.setdefault(p.image, p.message)
        noted = []
        for image, message in found.items():
            try:
                await self.fs.call("note a damaged image", mark_damaged, image, message)
            except OSError as exc:  # (a read-only repository: named by this run only)
                log.warning("cannot note a damaged image", image=str(image), error=str(exc))
                continue
            noted.append(image)
        return noted

    async def _finish_retention(self, domain: str) -> None:
        intent = self._domain_dir(domain) / INTENT_FILE
        drop = await self.fs.call("read the retention intent", _read_intent, intent)
        if drop is None:
            return
        # Left unfinished, every listed backup still restores (see .retention); finished
        # across a damaged backup, the merge could bake the damage in or drop its base.
        listing = await self.listing(domain)
        if undropped_damage(listing, drop):
            _refuse_retention(domain, listing, "stays unfinished (every backup restores)")
            return
        await self._retention(domain).run(drop)

    def _retention(self, domain: str) -> Retention:
        return Retention(
            self._backups_dir(domain),
            self._domain_dir(domain) / INTENT_FILE,
            qemu=self._qemu,
            layer_info=self._layer_info,
            faults=self._faults,
            reserve=functools.partial(self._reserved, f"retention of {domain}"),
            fs=self.fs,
        )

    @contextlib.asynccontextmanager
    async def _reserved(self, job: str, nbytes: int) -> AsyncIterator[None]:
        """``nbytes`` held in the agent's space book inside the block (retention's merge
        copies), or RepositorySpaceError before it if running jobs leave too little."""
        if nbytes <= 0:
            yield
            return
        need = await measure(self.fs, "repository", nbytes)
        reservation = self.space.reserve(job, [need])
        try:
            yield
        finally:
            self.space.release(reservation)

    # -- helpers ------------------------------------------------------------------------

    def _domain_dir(self, domain: str) -> Path:
        if not domain or domain in (".", "..") or "/" in domain or "\0" in domain:
            raise RepositoryError(f"{domain!r} cannot be a domain directory name")
        return self.root / domain

    def _backups_dir(self, domain: str) -> Path:
        return self._domain_dir(domain) / BACKUPS_DIR

    def _lock(self, domain: str) -> asyncio.Lock:
        return self._locks.setdefault(domain, asyncio.Lock())

    async def _layer_info(self, path: Path) -> _LayerInfo:
        return await self._qemu.layer_info(path)


def _refuse_retention(domain: str, listing: Listing, outcome: str) -> None:
    # Refused rather than worked around: dropping or merging next to a damaged backup can
    # delete the only copy of what an operator could still repair (its images, say).
    log.warning(
        "retention refused: the domain has a damaged backup; repair or remove it "
        "(`backup-agent backups DOMAIN` names it) and retention resumes",
        domain=domain,
        outcome=outcome,
        damaged=sorted({d.backup_id for d in listing.damaged}),
        first=listing.damaged[0].error,
    )
