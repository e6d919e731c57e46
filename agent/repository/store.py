"""The backup repository: finished backups as qcow2 chains, one JSON manifest per backup.

Each disk of a domain is a qcow2 chain: the full backup's image, then one overlay per
incremental backup whose backing file is the previous backup's image of that disk, named
by a *relative* path. The repository can thus be copied or moved anywhere and restored
without the agent: ``qemu-img convert`` on any backup's image gives the whole disk as it
was at that backup. A disk can be full in a backup whose other disks are incremental (its
chain broke, or it was added): its image then has no backing file. Layout::

    <root>/
        <domain-name>/
            retention.json                   only while apply_retention runs: its intent
            backups/
                <backup-id>/                 published: complete, fsync'd, never modified
                    manifest.json            (except by retention, see below)
                    <target>.qcow2           full, or overlay: backing ../<parent-id>/<target>.qcow2
                .staging-<backup-id>/        a backup being written (same content)
                .merge-<backup-id>/          retention: merged images waiting to replace its own
                .dropped-<backup-id>/        retention: a dropped backup being deleted

Backup ids (``20261125T183301Z-1a2b3c``) sort by time; :meth:`Repository.backups` orders by
the manifests' ``created_at`` (then id), so two backups in one second still come in order.

*Staging is a sibling of the published directories*, not a separate tree: an overlay's
backing path ``../<parent-id>/<target>.qcow2`` then resolves the same before and after
publishing. So the writer can (and must, see below) open a staged overlay *with* its
backing chain, and publishing is one ``rename`` within one directory. A backup appears
only complete: :meth:`Repository.publish` writes the manifest, fsyncs every file and the
staging directory, renames it to ``<backup-id>`` and fsyncs ``backups/``. A crash leaves
the whole backup or a hidden leftover that :meth:`Repository.cleanup_staging` removes.

Why the writer needs the backing chain: qcow2 allocates whole clusters (64 KiB). A write
covering part of an unallocated cluster of an overlay copies the rest of the cluster from
the backing file; opened with ``"backing": null`` it copies zeros instead, and the restored
disk silently loses the untouched part of that cluster.

Verification (:meth:`Repository.verify`) checks the structure of each image with
``qemu-img info`` (qcow2, virtual size, backing path as in the manifest, backing file
present), then re-reads every range the manifest has a checksum for *from that image
layer only*: ``qemu-img map`` of the image opened without its backing gives each extent's
host offset in the qcow2 file, which is read directly (a thread, ``pread``); unallocated
and zero extents read as zeros in a standalone image, and are an error in an overlay (the
bytes written there are missing). Extents qemu-img gives no host offset for (compressed
clusters) are read by ``qemu-img convert`` of just that extent to a temporary raw file.

Retention (:meth:`Repository.apply_retention`) drops the oldest backups; every kept image
that had a dropped image as backing is replaced by a standalone copy (``qemu-img convert``
of its chain, checked with ``qemu-img compare``), so later overlays, which still point at
it by the same path, restore exactly as before. The steps, and why a crash at any point is
safe (the next ``apply_retention`` or ``cleanup_staging`` finishes the job from the intent):

1. verify the backups involved: corrupt data is never baked into a new base.
2. write ``retention.json`` (the ids to drop) atomically. Before it nothing has changed.
3. per kept backup that depends on a dropped one, per such disk: convert into
   ``.merge-<id>/``, compare, fsync, rename over the image. The merged image has the same
   guest-visible content, so the backup restores the same whether or not it was replaced;
   a redo skips images whose header already has no backing.
4. write the new manifest (``parent`` null, those disks' ``backing`` null, ``merged_from``)
   and rename it over the old one: this commits the merge of that backup.
5. per dropped backup, newest first: rename to ``.dropped-<id>`` (it vanishes from
   listings at once, never half-deleted), then delete. Nothing kept refers to it any more
   (steps 3-4), and the dropped backups still listed only refer to older ones.
6. remove ``retention.json``.

Every file operation runs in a worker thread and every qemu-img call goes through
:func:`agent.qemu.images.run_qemu_img` (bounded, killed and reaped on timeout or cancellation),
so the event loop never blocks. OSError and qemu-img failures become RepositoryError.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import xxhash

from agent.core.errors import (
    BackupNotFoundError,
    DestinationExistsError,
    ImageError,
    PublishUndecidedError,
    RepositoryError,
)
from agent.core.faults import Faults, no_faults
from agent.core.logs import get_logger
from agent.core.shielding import to_completion
from agent.qemu import images

log = get_logger("repository")


class _Digest(Protocol):
    """What verify needs of a hash object (hashlib's and xxhash's both fit)."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


MANIFEST_FORMAT: Final = "libvirt-backup-agent/backup"
MANIFEST_VERSION: Final = 2  # 2: per-range checksum algorithm (XXH3-128); 1: SHA-256
CHECKSUM: Final = "xxh3-128"
INTENT_FORMAT: Final = "libvirt-backup-agent/retention"
INTENT_VERSION: Final = 1

MANIFEST_FILE: Final = "manifest.json"
INTENT_FILE: Final = "retention.json"
BACKUPS_DIR: Final = "backups"
STAGING_PREFIX: Final = ".staging-"
MERGE_PREFIX: Final = ".merge-"
DROPPED_PREFIX: Final = ".dropped-"

BACKUP_ID_RE: Final = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_XXH3_128_RE: Final = re.compile(r"[0-9a-f]{32}")
# The checksum algorithms manifests may name, and what their hex digests look like.
_DIGEST_RE: Final = {"sha256": _SHA256_RE, "xxh3-128": _XXH3_128_RE}
_BACKING_RE: Final = re.compile(r"\.\./(?P<id>[^/]+)/(?P<image>[^/]+)")
_MODES: Final = ("full", "incremental")
_CHUNK: Final = 1 << 20  # bytes read (or zeros hashed) per step when checking a range
_FALLBACK_CHUNK: Final = 64 << 20  # bound on one temporary raw file of a compressed extent


# --- the manifest ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RangeChecksum:
    """The checksum (``algorithm``, hex ``digest``) of the bytes written at
    ``[offset, offset + length)`` into one image.

    New backups use XXH3-128: it finds corruption as surely as SHA-256 and costs a
    hundredth of its CPU, which on a busy host is what a full backup is short of. (A
    checksum next to the data cannot stop anyone able to rewrite both anyway.)
    Manifests of version 1 carry SHA-256, and are still verified with it.
    """

    offset: int
    length: int
    digest: str
    algorithm: str = CHECKSUM


def new_digest(algorithm: str) -> _Digest:
    """A fresh incremental hash object for ``algorithm``."""
    if algorithm == "xxh3-128":
        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise RepositoryError(f"unknown checksum algorithm {algorithm!r}")


def digest_of(data: bytes | memoryview) -> str:
    """The checksum new backups record for ``data`` (:data:`CHECKSUM`)."""
    return xxhash.xxh3_128_hexdigest(data)


@dataclass(frozen=True, slots=True)
class DiskManifest:
    """One disk of a backup: its image (relative to the backup directory) and what is in it.

    ``reason`` says why a disk is full when the backup as a whole was not (e.g.
    ``disk-added``); ``backing`` is the image's backing path (``../<id>/<image>``) or None.
    """

    target: str
    image: str
    mode: str
    reason: str | None
    virtual_size: int
    bytes_copied: int
    backing: str | None
    checksums: tuple[RangeChecksum, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """Everything about one backup; ``manifest.json`` in its directory.

    ``merged_from`` lists the dropped backups whose data retention merged into this one;
    such a backup has no ``parent`` and its merged disks no ``backing``, whatever their mode.
    """

    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION
    backup_id: str
    domain: str
    domain_uuid: str
    created_at: float
    completed_at: float
    parent: str | None
    checkpoint: str
    checkpoint_xml: str
    domain_xml: str
    disks: tuple[DiskManifest, ...]
    merged_from: tuple[str, ...] = ()

    def disk(self, target: str) -> DiskManifest | None:
        """The disk called ``target`` in this backup, if it has one."""
        return next((d for d in self.disks if d.target == target), None)

    def to_json(self) -> str:
        # The same document as dataclasses.asdict gives, built field by field: asdict
        # deep-copies every value, 8 ms for the thousand checksums of a 2 GiB full.
        data = _fields(self)
        # Always the current format: checksums are written in version 2's shape (a version
        # 1 manifest rewritten by retention keeps its SHA-256 digests, with their name).
        data["version"] = MANIFEST_VERSION
        data["disks"] = [
            {**_fields(d), "checksums": [_fields(c) for c in d.checksums]} for d in self.disks
        ]
        return json.dumps(data, indent=2) + "\n"

    @property
    def mode(self) -> str:
        """``full`` or ``incremental`` when every disk agrees, else ``mixed``."""
        modes = {d.mode for d in self.disks}
        return modes.pop() if len(modes) == 1 else "mixed"

    def summary(self) -> dict[str, object]:
        """What ``backups --json`` and ``GET /v1/domains/{domain}/backups`` show."""
        return {
            "id": self.backup_id,
            "domain": self.domain,
            "domain_uuid": self.domain_uuid,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "mode": self.mode,
            "parent": self.parent,
            "checkpoint": self.checkpoint,
            "bytes": sum(d.bytes_copied for d in self.disks),
            "disks": [
                {
                    "target": d.target,
                    "mode": d.mode,
                    "reason": d.reason,
                    "bytes": d.bytes_copied,
                    "virtual_size": d.virtual_size,
                    "image": d.image,
                }
                for d in self.disks
            ],
        }

    @classmethod
    def from_json(cls, text: str, *, path: str) -> Manifest:
        """Parse and strictly validate a manifest; RepositoryError names the bad field."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise RepositoryError(f"manifest {path}: not JSON: {exc}", path=path) from exc
        try:
            return _parse_manifest(_Fields(data, ""))
        except _FieldError as exc:
            raise RepositoryError(f"manifest {path}: field {exc}", path=path) from exc


class _FieldError(Exception):
    """A manifest field is missing or wrong; the message starts with its dotted name."""


class _Fields:
    """Typed access to one JSON object of a manifest, with field names for errors."""

    def __init__(self, value: object, where: str):
        if not isinstance(value, dict):
            raise _FieldError(f"{where or '(document)'}: expected an object")
        self._obj: dict[str, Any] = value
        self._where = where
        self._seen: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self._where}.{key}" if self._where else key

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        self._seen.add(key)
        if key not in self._obj:
            raise _FieldError(f"{self.name(key)}: missing")
        value = self._obj[key]
        if value is None and optional:
            return None
        # bool is an int subclass, but a flag is never a size, offset or version.
        if isinstance(value, bool) or not isinstance(value, kind):
            raise _FieldError(f"{self.name(key)}: wrong type {type(value).__name__}")
        return value

    def text(self, key: str, pattern: re.Pattern[str] | None = None) -> str:
        value: str = self.get(key, str)
        if pattern is not None and not pattern.fullmatch(value):
            raise _FieldError(f"{self.name(key)}: invalid value {value!r}")
        return value

    def maybe_text(self, key: str, pattern: re.Pattern[str] | None = None) -> str | None:
        if self.get(key, str, optional=True) is None:
            return None
        return self.text(key, pattern)

    def count(self, key: str, *, minimum: int = 0) -> int:
        value: int = self.get(key, int)
        if value < minimum:
            raise _FieldError(f"{self.name(key)}: {value} is less than {minimum}")
        return value

    def number(self, key: str) -> float:
        return float(self.get(key, (int, float)))

    def items(self, key: str) -> list[tuple[str, Any]]:
        values: list[Any] = self.get(key, list)
        return [(f"{self.name(key)}[{i}]", v) for i, v in enumerate(values)]

    def fail(self, key: str, message: str) -> _FieldError:
        return _FieldError(f"{self.name(key)}: {message}")

    def done(self) -> None:
        # Unknown fields are refused: a newer writer must bump the version.
        if extra := sorted(set(self._obj) - self._seen):
            raise _FieldError(f"{self.name(extra[0])}: unknown field")


def _parse_manifest(f: _Fields) -> Manifest:
    if f.text("format") != MANIFEST_FORMAT:
        raise f.fail("format", f"not {MANIFEST_FORMAT!r}")
    version = f.count("version")
    if version not in (1, MANIFEST_VERSION):
        raise f.fail("version", f"unsupported (this agent reads 1 and {MANIFEST_VERSION})")
    merged_from = tuple(_item_id(where, v) for where, v in f.items("merged_from"))
    disks = tuple(
        _parse_disk(_Fields(v, where), merged_from, version) for where, v in f.items("disks")
    )
    if len({d.target for d in disks}) != len(disks):
        raise f.fail("disks", "duplicate target")
    manifest = Manifest(
        format=MANIFEST_FORMAT,
        version=version,
        backup_id=f.text("backup_id", BACKUP_ID_RE),
        domain=f.text("domain"),
        domain_uuid=f.text("domain_uuid"),
        created_at=f.number("created_at"),
        completed_at=f.number("completed_at"),
        parent=f.maybe_text("parent", BACKUP_ID_RE),
        checkpoint=f.text("checkpoint"),
        checkpoint_xml=f.text("checkpoint_xml"),
        domain_xml=f.text("domain_xml"),
        disks=disks,
        merged_from=merged_from,
    )
    f.done()
    return manifest


def _item_id(where: str, value: object) -> str:
    if not isinstance(value, str) or not BACKUP_ID_RE.fullmatch(value):
        raise _FieldError(f"{where}: not a backup id")
    return value


def _parse_disk(f: _Fields, merged_from: tuple[str, ...], version: int) -> DiskManifest:
    virtual_size = f.count("virtual_size", minimum=1)
    disk = DiskManifest(
        target=f.text("target", _NAME_RE),
        image=f.text("image", _NAME_RE),
        mode=f.text("mode"),
        reason=f.maybe_text("reason"),
        virtual_size=virtual_size,
        bytes_copied=f.count("bytes_copied"),
        backing=f.maybe_text("backing", _BACKING_RE),
        checksums=_parse_checksums(f, virtual_size, version),
    )
    if disk.mode not in _MODES:
        raise f.fail("mode", f"{disk.mode!r} is not one of {', '.join(_MODES)}")
    if disk.mode == "full" and disk.backing is not None:
        raise f.fail("backing", "a full image has no backing file")
    # Retention makes an incremental image standalone; without that it needs a backing.
    if disk.mode == "incremental" and disk.backing is None and not merged_from:
        raise f.fail("backing", "an incremental image needs a backing file")
    f.done()
    return disk


def _parse_checksums(f: _Fields, virtual_size: int, version: int) -> tuple[RangeChecksum, ...]:
    """The disk's checksums. A full backup has one per 2 MiB (50,000 for 100 GiB), and
    the newest manifest is read before every backup: a well-formed entry is accepted in
    one test; anything else is parsed field by field, which names what is wrong."""
    values: list[Any] = f.get("checksums", list)
    checksums = []
    for index, value in enumerate(values):
        checksum = _well_formed_checksum(value, virtual_size) if version > 1 else None
        if checksum is None:
            where = f"{f.name('checksums')}[{index}]"
            checksum = _parse_checksum(_Fields(value, where), virtual_size, version)
        checksums.append(checksum)
    return tuple(checksums)


def _well_formed_checksum(value: object, virtual_size: int) -> RangeChecksum | None:
    """``value`` as a checksum if it is exactly what :func:`_parse_checksum` accepts
    (version 2: offset, length, algorithm, digest, nothing else), else None."""
    if type(value) is not dict or len(value) != 4:
        return None
    offset, length = value.get("offset"), value.get("length")
    algorithm, digest = value.get("algorithm"), value.get("digest")
    if type(offset) is not int or type(length) is not int or type(digest) is not str:
        return None
    if type(algorithm) is not str or (pattern := _DIGEST_RE.get(algorithm)) is None:
        return None
    if offset < 0 or length < 1 or offset + length > virtual_size:
        return None
    if not pattern.fullmatch(digest):
        return None
    return RangeChecksum(offset, length, digest, algorithm)


def _parse_checksum(f: _Fields, virtual_size: int, version: int) -> RangeChecksum:
    offset, length = f.count("offset"), f.count("length", minimum=1)
    if version == 1:
        checksum = RangeChecksum(offset, length, f.text("sha256", _SHA256_RE), "sha256")
    else:
        algorithm = f.text("algorithm")
        pattern = _DIGEST_RE.get(algorithm)
        if pattern is None:
            raise f.fail("algorithm", f"unknown checksum algorithm {algorithm!r}")
        checksum = RangeChecksum(offset, length, f.text("digest", pattern), algorithm)
    if checksum.offset + checksum.length > virtual_size:
        raise f.fail("length", "range ends beyond the virtual size")
    f.done()
    return checksum


# --- verification results --------------------------------------------------------------


def restore_chain(manifests: Sequence[Manifest], target: str) -> list[str]:
    """The backups a restore of disk ``target`` at the newest of ``manifests`` (oldest
    first) reads, newest first: back to that disk's last full copy. Empty if the newest
    backup has no such disk."""
    if not manifests:
        return []
    by_id = {m.backup_id: m for m in manifests}
    chain: list[str] = []
    current: Manifest | None = manifests[-1]
    while current is not None and (own := current.disk(target)) is not None:
        chain.append(current.backup_id)
        if own.mode == "full" or current.parent is None:
            break
        current = by_id.get(current.parent)
    return chain


def damaged_disks(manifests: Sequence[Manifest], problems: Sequence[Problem]) -> dict[str, str]:
    """The disks whose restore at the newest backup reads a backup verify found a
    ``problem`` in (what was found, per disk): an increment on top of that damage would
    restore wrong, so their next backup must copy them in full."""
    chains: dict[str, set[str]] = {}
    damaged: dict[str, str] = {}
    for p in problems:
        if p.target not in chains:
            chains[p.target] = set(restore_chain(manifests, p.target))
        if p.target not in damaged and p.backup_id in chains[p.target]:
            damaged[p.target] = f"{p.backup_id} {p.image.name}: {p.message}"
    return damaged


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong in one image; ``offset``/``length`` give the range when it is data."""

    backup_id: str
    target: str
    image: Path
    offset: int | None
    length: int | None
    message: str


@dataclass(frozen=True, slots=True)
class _LayerInfo:
    format: str
    virtual_size: int
    backing: str | None
    backing_format: str | None


@dataclass(frozen=True, slots=True)
class _Extent:
    start: int
    length: int
    present: bool
    data: bool
    host: int | None


@dataclass(frozen=True, slots=True)
class _Piece:
    """Part of a checked range: zeros, bytes at ``host`` in the file, or (neither) via qemu."""

    start: int
    length: int
    zero: bool
    host: int | None


class _UnreadableError(Exception):
    """A checksum range cannot be read from the layer; the message says why."""


# --- the repository --------------------------------------------------------------------


class Repository:
    """One repository directory (local or on a shared filesystem); see the module docstring.

    ``timeout`` bounds quick qemu-img calls (create, info, map); ``copy_timeout`` bounds
    those that copy a whole disk (restore, retention merge). ``faults`` is the crash-point
    hook (:mod:`agent.core.faults`) called between retention steps.
    """

    def __init__(
        self,
        root: Path,
        *,
        timeout: float = 60.0,
        copy_timeout: float = 24 * 3600.0,
        faults: Faults = no_faults,
    ):
        self.root = root
        self._timeout = timeout
        self._copy_timeout = copy_timeout
        self._faults = faults
        self._locks: dict[str, asyncio.Lock] = {}
        # Per staging directory, the headers of the images create_image made there, read
        # back right after creating them (see publish). Images are created on the data
        # plane's thread: only single dict operations here, no iteration.
        self._created: dict[Path, dict[str, _LayerInfo]] = {}

    # -- reading ------------------------------------------------------------------------

    async def domain_named(self, domain: str) -> str | None:
        """The name the repository keeps ``domain`` under: ``domain`` itself if it has
        backups here by that name, else the domain whose newest backup has ``domain``
        as its UUID (a domain libvirt no longer has is known here by name only); None
        if the repository has no backup of it."""
        if await asyncio.to_thread(_has_backups, self._backups_dir(domain)):
            return domain
        if not _UUID_RE.fullmatch(domain):
            return None
        # The domain whose newest backup is the newest of those naming this UUID (after a
        # rename, the old name's backups name it too); an unreadable one is not it.
        found: tuple[float, str] | None = None
        for name in await asyncio.to_thread(_domain_names, self.root):
            try:
                latest = await self.latest(name)
            except RepositoryError:
                continue
            if latest is not None and latest.domain_uuid.lower() == domain.lower():
                found = max(found or (latest.completed_at, name), (latest.completed_at, name))
        return found[1] if found is not None else None

    async def backups(self, domain: str) -> list[Manifest]:
        """The published backups of ``domain``, oldest first (none if it has no directory)."""
        return await asyncio.to_thread(_read_backups, self._backups_dir(domain))

    async def backup(self, domain: str, backup_id: str) -> Manifest:
        backups_dir = self._backups_dir(domain)
        if not BACKUP_ID_RE.fullmatch(backup_id):
            raise BackupNotFoundError(f"{backup_id!r} is not a backup id", path=str(backups_dir))
        return await asyncio.to_thread(_read_backup, backups_dir / backup_id, domain)

    async def latest(self, domain: str) -> Manifest | None:
        """The newest published backup of ``domain`` (as the last of :meth:`backups`).

        Reads only the manifests of the newest second's backups (an id starts with its
        UTC second): every backup starts a chain's plan, and the manifest of a 2 GiB
        full takes 8 ms to read, of a 100 GiB one 50 times that.
        """
        return await asyncio.to_thread(_read_latest, self._backups_dir(domain))

    async def free_bytes(self) -> int:
        """Bytes an unprivileged writer can still use on the repository's filesystem."""

        def statvfs() -> int:
            with _os_errors("cannot stat filesystem of", self.root):
                st = os.statvfs(self.root)
            return st.f_bavail * st.f_frsize

        return await asyncio.to_thread(statvfs)

    # -- writing a backup ---------------------------------------------------------------

    def new_backup_id(self) -> str:
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)

    async def stage(self, domain: str, backup_id: str) -> Path:
        """Create and return the staging directory of a new backup ``backup_id``."""
        if not BACKUP_ID_RE.fullmatch(backup_id):
            raise RepositoryError(f"{backup_id!r} is not a backup id")
        return await asyncio.to_thread(_make_staging, self._backups_dir(domain), backup_id)

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
        await asyncio.to_thread(_check_new_image, staging, image, backing_path)
        args = ["create", "-q", "-f", "qcow2"]
        if backing_path is not None:
            # No -u: the backing resolves from staging, so qemu-img checks it opens as qcow2.
            args += ["-b", backing_path, "-F", "qcow2"]
        path = staging / image
        await self._qemu_img([*args, str(path), str(virtual_size)], path)
        self._created.setdefault(staging, {})[image] = await self._layer_info(path)
        return image, backing_path

    async def publish(self, domain: str, staging: Path, manifest: Manifest) -> Path:
        """Make the staged backup visible, complete and durable; return its directory."""
        backups_dir = self._backups_dir(domain)
        _check_staging(staging)
        if staging != backups_dir / f"{STAGING_PREFIX}{manifest.backup_id}":
            raise RepositoryError(
                f"{staging} is not the staging directory of {domain} {manifest.backup_id}",
                path=str(staging),
            )
        async with self._lock(domain):
            # Round trip: what is published must be readable by from_json's strict checks.
            # A manifest of a large disk is megabytes of JSON: not on the event loop.
            # Together; the first failure cancels the rest (their qemu-img processes too).
            try:
                async with asyncio.TaskGroup() as group:
                    text = group.create_task(
                        asyncio.to_thread(_round_trip, manifest, staging / MANIFEST_FILE)
                    )
                    group.create_task(asyncio.to_thread(_check_publishable, staging, manifest))
                    # The header (format, virtual size, backing file) of an image
                    # create_image made was read back right after creating it: only qemu-img
                    # create writes those fields (qemu-nbd writes guest data), and reading
                    # them again here took a qemu-img process, 15-20 ms of every backup.
                    # Given up: proof that the image still opens after the copy (qemu-nbd
                    # failing mid-copy fails the copy; `verify` reads every image).
                    created = self._created.get(staging, {})
                    structures = [
                        group.create_task(
                            self._structure(staging, d, "", header=created.get(d.image))
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
            # Once the thread renames, the backup is published whatever happens to this
            # task: a cancellation waits for the thread, so that an undo never races it.
            # Bounded (a hung NFS mount): then nobody can tell, and nobody may undo.
            try:
                published = await to_completion(
                    asyncio.to_thread(_publish, staging, manifest, text.result()),
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

    async def discard(self, staging: Path) -> None:
        """Delete a staged backup (after a failure); nothing if it is already gone."""
        _check_staging(staging)
        self._created.pop(staging, None)
        await asyncio.to_thread(_remove_tree, staging)

    async def cleanup_staging(self) -> list[Path]:
        """At agent start: finish interrupted retentions and remove every hidden leftover.

        Removes ``.staging-*`` (backups being written when the agent died), ``.merge-*`` and
        ``.dropped-*``; returns what it removed. Must not run while a backup is being staged.
        """
        removed: list[Path] = []
        for domain in await asyncio.to_thread(_domain_names, self.root):
            async with self._lock(domain):
                await self._finish_retention(domain)
                removed += await asyncio.to_thread(_remove_leftovers, self._backups_dir(domain))
        return removed

    # -- restore ------------------------------------------------------------------------

    async def restore(
        self,
        domain: str,
        backup_id: str,
        target: str,
        dest: Path,
        *,
        fmt: str = "qcow2",
        progress: Callable[[float], None] | None = None,
    ) -> None:
        """Write disk ``target`` as it was at ``backup_id`` to ``dest``, a standalone image.

        Written to ``<dest>.part`` and renamed when complete and fsync'd; an existing
        ``dest`` is refused. ``progress`` gets the fraction done as qemu-img reports it.
        """
        if fmt not in ("qcow2", "raw"):
            raise RepositoryError(f"cannot restore to format {fmt!r} (qcow2 or raw)")
        manifest = await self.backup(domain, backup_id)
        disk = manifest.disk(target)
        if disk is None:
            have = ", ".join(d.target for d in manifest.disks)
            raise RepositoryError(f"backup {backup_id} has no disk {target!r} (it has {have})")
        source = self._backups_dir(domain) / backup_id / disk.image
        part = dest.with_name(dest.name + ".part")
        await asyncio.to_thread(_prepare_destination, dest, part)
        if progress is not None:
            progress(0.0)
        try:
            args = ["convert", "-f", "qcow2", "-O", fmt, str(source), str(part)]
            if progress is not None:
                args.insert(1, "-p")
            await self._qemu_img(args, source, long=True, progress=progress)
            await asyncio.to_thread(_commit_file, part, dest)
        except BaseException:
            await _clean_up(_unlink, part, self._timeout)
            raise
        if progress is not None:
            progress(1.0)

    # -- verify -------------------------------------------------------------------------

    async def verify(self, domain: str, backup_id: str | None = None) -> list[Problem]:
        """Check one backup (or all of ``domain``'s) against its manifest; [] if all is well."""
        if backup_id is not None:
            manifests = [await self.backup(domain, backup_id)]
        else:
            manifests = await self.backups(domain)
        return await self._verify(domain, manifests)

    async def _verify(self, domain: str, manifests: Sequence[Manifest]) -> list[Problem]:
        problems: list[Problem] = []
        for manifest in manifests:
            directory = self._backups_dir(domain) / manifest.backup_id
            for disk in manifest.disks:
                problems += await self._verify_disk(directory, manifest.backup_id, disk)
        return problems

    async def _verify_disk(
        self, directory: Path, backup_id: str, disk: DiskManifest
    ) -> list[Problem]:
        problems, info = await self._structure(directory, disk, backup_id)
        if problems or info is None:
            return problems
        path = directory / disk.image
        try:
            extents = await self._layer_map(path)
        except RepositoryError as exc:
            return [Problem(backup_id, disk.target, path, None, None, str(exc))]
        overlay = info.backing is not None
        for checksum in disk.checksums:
            if message := await self._check_range(path, extents, checksum, overlay=overlay):
                problems.append(
                    Problem(backup_id, disk.target, path, checksum.offset, checksum.length, message)
                )
        return problems

    async def _structure(
        self,
        directory: Path,
        disk: DiskManifest,
        backup_id: str,
        *,
        header: _LayerInfo | None = None,
    ) -> tuple[list[Problem], _LayerInfo | None]:
        """What is wrong with the image's header and backing file, compared to ``disk``.

        ``header``: the image's header as already read (else qemu-img reads it now).
        """
        path = directory / disk.image

        def problem(message: str) -> Problem:
            return Problem(backup_id, disk.target, path, None, None, message)

        if not await asyncio.to_thread(path.is_file):
            return [problem(f"image {path} is missing")], None
        try:
            info = header if header is not None else await self._layer_info(path)
        except RepositoryError as exc:
            return [problem(str(exc))], None
        found = []
        if info.format != "qcow2":
            found.append(f"{path} is {info.format}, not qcow2")
        if info.virtual_size != disk.virtual_size:
            found.append(
                f"{path} has virtual size {info.virtual_size}, manifest says {disk.virtual_size}"
            )
        if info.backing != disk.backing:
            found.append(f"{path} has backing {info.backing!r}, manifest says {disk.backing!r}")
        elif info.backing is not None and info.backing_format != "qcow2":
            found.append(f"{path} names backing format {info.backing_format!r}, not qcow2")
        if info.backing is not None:
            backing_file = _resolve(directory, info.backing)
            if not await asyncio.to_thread(backing_file.is_file):
                found.append(f"backing file {backing_file} of {path} is missing")
        return [problem(message) for message in found], info

    async def _check_range(
        self, path: Path, extents: Sequence[_Extent], checksum: RangeChecksum, *, overlay: bool
    ) -> str | None:
        """Why the range's bytes in this layer do not match the checksum, or None."""
        where = f"{path} [{checksum.offset}, {checksum.offset + checksum.length})"
        try:
            pieces = _pieces(extents, checksum.offset, checksum.length, overlay=overlay)
            digest = new_digest(checksum.algorithm)
            for piece in pieces:
                if piece.zero or piece.host is not None:
                    await asyncio.to_thread(_hash_local, path, piece, digest)
                else:
                    await self._hash_via_qemu(path, piece, digest)
        except _UnreadableError as exc:
            return f"{where}: {exc}"
        if digest.hexdigest() != checksum.digest:
            return f"{where}: checksum mismatch (data differs from what was written)"
        return None

    async def _hash_via_qemu(self, path: Path, piece: _Piece, digest: _Digest) -> None:
        # Clusters without a host offset (compressed) are decoded by qemu-img: the extent is
        # converted, in bounded chunks, through a raw offset/size window of the bare layer.
        tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="verify-"))
        try:
            end = piece.start + piece.length
            for start in range(piece.start, end, _FALLBACK_CHUNK):
                size = min(_FALLBACK_CHUNK, end - start)
                # The raw window must be in whole sectors; the extra bytes are not hashed.
                low, high = start // 512 * 512, -(-(start + size) // 512) * 512
                window = {"driver": "raw", "offset": low, "size": high - low, "file": _bare(path)}
                args = ["convert", "-O", "raw", "json:" + json.dumps(window), str(tmp / "chunk")]
                await self._qemu_img(args, path, long=True)
                await asyncio.to_thread(_hash_file, tmp / "chunk", start - low, size, digest)
        finally:
            await _clean_up(_remove_tree, tmp, self._timeout)

    # -- retention ----------------------------------------------------------------------

    async def apply_retention(self, domain: str, keep_last: int) -> list[str]:
        """Drop the oldest backups of ``domain`` so that ``keep_last`` remain; return their ids.

        Finishes an interrupted retention first. Every remaining backup restores exactly
        as before; see the module docstring for the steps and their crash safety.
        """
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, not {keep_last}")
        async with self._lock(domain):
            await self._finish_retention(domain)
            manifests = await self.backups(domain)
            if len(manifests) <= keep_last:
                return []
            drop = [m.backup_id for m in manifests[:-keep_last]]
            by_id = {m.backup_id: m for m in manifests}
            dependents = [m for m in manifests[-keep_last:] if _depends_on(m, set(drop))]
            chains = {i for m in dependents for i in _chain_ids(m, by_id, drop)}
            involved = [*(by_id[i] for i in drop if i in chains), *dependents]
            if problems := await self._verify(domain, involved):
                raise RepositoryError(
                    f"retention of {domain} refused: {len(problems)} problem(s) in the backups "
                    f"to merge, first: {problems[0].message}",
                    path=str(problems[0].image),
                )
            intent = self._domain_dir(domain) / INTENT_FILE
            await asyncio.to_thread(_write_intent, intent, drop)
            self._faults("retention:intent-written")
            await self._run_retention(domain, drop)
            return drop

    async def _finish_retention(self, domain: str) -> None:
        intent = self._domain_dir(domain) / INTENT_FILE
        drop = await asyncio.to_thread(_read_intent, intent)
        if drop is not None:
            await self._run_retention(domain, drop)

    async def _run_retention(self, domain: str, drop: Sequence[str]) -> None:
        """Steps 3-6; idempotent, so a redo after a crash at any point finishes the job."""
        backups_dir = self._backups_dir(domain)
        manifests = await self.backups(domain)
        by_id = {m.backup_id: m for m in manifests}
        dropped = set(drop)
        for manifest in manifests:
            if manifest.backup_id not in dropped and _depends_on(manifest, dropped):
                await self._merge_backup(backups_dir, manifest, by_id, drop)
        # Newest first: a dropped backup still listed after a crash keeps its whole chain
        # (only older backups), so every listed backup restores at every moment.
        for backup_id in reversed(drop):
            tomb = backups_dir / f"{DROPPED_PREFIX}{backup_id}"
            await asyncio.to_thread(_rename_away, backups_dir / backup_id, tomb)
            self._faults(f"retention:dropped:{backup_id}")
            await asyncio.to_thread(_remove_tree, tomb)
            self._faults(f"retention:deleted:{backup_id}")
        await asyncio.to_thread(_remove_durably, self._domain_dir(domain) / INTENT_FILE)

    async def _merge_backup(
        self, backups_dir: Path, manifest: Manifest, by_id: dict[str, Manifest], drop: Sequence[str]
    ) -> None:
        directory = backups_dir / manifest.backup_id
        merge_dir = backups_dir / f"{MERGE_PREFIX}{manifest.backup_id}"
        await asyncio.to_thread(_fresh_dir, merge_dir)
        disks = []
        for disk in manifest.disks:
            if _backing_id(disk) not in drop:
                disks.append(disk)
                continue
            live = directory / disk.image
            # Header without backing: replaced before a crash; its content is already right.
            if (await self._layer_info(live)).backing is not None:
                await self._merge_image(live, merge_dir / disk.image, manifest.backup_id, disk)
            disks.append(dataclasses.replace(disk, backing=None))
        merged = dataclasses.replace(
            manifest,
            parent=None if manifest.parent in drop else manifest.parent,
            disks=tuple(disks),
            merged_from=_merged_from(manifest, by_id, drop),
        )
        await asyncio.to_thread(_replace_manifest, merge_dir, directory, merged)
        self._faults(f"retention:manifest-replaced:{manifest.backup_id}")

    async def _merge_image(
        self, live: Path, merged: Path, backup_id: str, disk: DiskManifest
    ) -> None:
        # convert reads the image through its whole chain; compare re-reads both to be sure
        # before the only other copy of the older data is deleted.
        convert = ["convert", "-f", "qcow2", "-O", "qcow2", str(live), str(merged)]
        await self._qemu_img(convert, live, long=True)
        compare = ["compare", "-q", "-f", "qcow2", "-F", "qcow2", str(live), str(merged)]
        await self._qemu_img(compare, live, long=True)
        await asyncio.to_thread(_fsync, merged)
        self._faults(f"retention:merged:{backup_id}:{disk.target}")
        await asyncio.to_thread(_replace_file, merged, live)
        self._faults(f"retention:replaced:{backup_id}:{disk.target}")

    # -- helpers ------------------------------------------------------------------------

    def _domain_dir(self, domain: str) -> Path:
        if not domain or domain in (".", "..") or "/" in domain or "\0" in domain:
            raise RepositoryError(f"{domain!r} cannot be a domain directory name")
        return self.root / domain

    def _backups_dir(self, domain: str) -> Path:
        return self._domain_dir(domain) / BACKUPS_DIR

    def _lock(self, domain: str) -> asyncio.Lock:
        return self._locks.setdefault(domain, asyncio.Lock())

    async def _qemu_img(
        self,
        args: list[str],
        image: Path,
        *,
        long: bool = False,
        progress: Callable[[float], None] | None = None,
    ) -> str:
        timeout = self._copy_timeout if long else self._timeout
        try:
            return await images.run_qemu_img(
                args, timeout=timeout, image=str(image), progress=progress
            )
        except ImageError as exc:
            raise RepositoryError(str(exc), path=str(image)) from exc

    async def _layer_info(self, path: Path) -> _LayerInfo:
        # Plain `info` does not open the backing file, so it works when that is missing.
        out = await self._qemu_img(["info", "--output=json", "-U", str(path)], path)
        try:
            data = json.loads(out)
            return _LayerInfo(
                format=_typed(data["format"], str),
                virtual_size=_typed(data["virtual-size"], int),
                backing=_typed(data.get("backing-filename"), str, optional=True),
                backing_format=_typed(data.get("backing-filename-format"), str, optional=True),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise RepositoryError(f"qemu-img info {path}: unexpected output: {exc}") from exc

    async def _layer_map(self, path: Path) -> list[_Extent]:
        """The extents of this layer alone: opened with no backing, everything is depth 0."""
        out = await self._qemu_img(
            ["map", "--output=json", "json:" + json.dumps(_bare(path))], path
        )
        try:
            return [
                _Extent(
                    start=_typed(e["start"], int),
                    length=_typed(e["length"], int),
                    present=_typed(e["present"], bool),
                    data=_typed(e["data"], bool),
                    host=_typed(e.get("offset"), int, optional=True),
                )
                for e in json.loads(out)
            ]
        except (ValueError, KeyError, TypeError) as exc:
            raise RepositoryError(f"qemu-img map {path}: unexpected output: {exc}") from exc


# --- pure helpers ----------------------------------------------------------------------


def _typed(value: Any, kind: type, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{value!r} is not {kind.__name__}")
    return value


def _resolve(directory: Path, relative: str) -> Path:
    """``relative`` (a backing path) seen from ``directory``, without ``..`` (no I/O)."""
    return Path(os.path.normpath(directory / relative))


def _bare(path: Path) -> dict[str, Any]:
    """A ``json:`` blockdev spec opening the qcow2 image without its backing chain."""
    return {
        "driver": "qcow2",
        "backing": None,
        "file": {"driver": "file", "filename": str(path.absolute())},
    }


def _check_name(name: str, what: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise RepositoryError(f"{name!r} is not a valid {what}")


def _check_staging(staging: Path) -> None:
    # discard() deletes the tree: refuse anything that is not one of our staging dirs.
    backup_id = staging.name.removeprefix(STAGING_PREFIX)
    if (
        staging.name == backup_id
        or not BACKUP_ID_RE.fullmatch(backup_id)
        or staging.parent.name != BACKUPS_DIR
    ):
        raise RepositoryError(f"{staging} is not a staging directory", path=str(staging))


def _backing_path(backing: Manifest, target: str) -> str:
    disk = backing.disk(target)
    if disk is None:
        raise RepositoryError(
            f"backup {backing.backup_id} has no disk {target!r} to base an overlay on; "
            "back the disk up in full"
        )
    return f"../{backing.backup_id}/{disk.image}"


def _backing_id(disk: DiskManifest) -> str | None:
    match = _BACKING_RE.fullmatch(disk.backing) if disk.backing else None
    return match["id"] if match else None


def _depends_on(manifest: Manifest, ids: set[str]) -> bool:
    return manifest.parent in ids or any(_backing_id(d) in ids for d in manifest.disks)


def _chain_ids(manifest: Manifest, by_id: dict[str, Manifest], drop: Sequence[str]) -> set[str]:
    """The dropped backups that the backing chains of ``manifest``'s disks pass through."""
    seen: set[str] = set()
    for disk in manifest.disks:
        current: DiskManifest | None = disk
        while current is not None and (backing_id := _backing_id(current)) in drop:
            assert backing_id is not None and current.backing is not None
            seen.add(backing_id)
            older = by_id.get(backing_id)
            image = Path(current.backing).name
            current = next((d for d in older.disks if d.image == image), None) if older else None
    return seen


def _merged_from(
    manifest: Manifest, by_id: dict[str, Manifest], drop: Sequence[str]
) -> tuple[str, ...]:
    """What ``manifest`` had merged before, plus the dropped backups merged into it now."""
    chain = _chain_ids(manifest, by_id, drop)
    ids: list[str] = []
    for backup_id in drop:
        if backup_id in chain and backup_id in by_id:
            ids += [*by_id[backup_id].merged_from, backup_id]
    return tuple(dict.fromkeys([*ids, *manifest.merged_from]))


def _pieces(extents: Sequence[_Extent], offset: int, length: int, *, overlay: bool) -> list[_Piece]:
    """How to read ``[offset, offset + length)`` of one layer, extent by extent."""
    pieces: list[_Piece] = []
    position, end = offset, offset + length
    for extent in extents:
        extent_end = extent.start + extent.length
        if extent_end <= position:
            continue
        if extent.start > position:
            break
        take = min(end, extent_end) - position
        if overlay and not extent.present:
            raise _UnreadableError(
                f"[{position}, {position + take}) is not allocated in this image "
                "(it would read from the backing file)"
            )
        host = None if extent.host is None else extent.host + position - extent.start
        pieces.append(_Piece(position, take, zero=not extent.data, host=host))
        position += take
        if position == end:
            return pieces
    raise _UnreadableError(f"qemu-img map does not cover offset {position}")


# --- blocking helpers (always called through asyncio.to_thread) ------------------------


@contextlib.contextmanager
def _os_errors(what: str, path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise RepositoryError(f"{what} {path}: {exc.strerror or exc}", path=str(path)) from exc


def _fsync(path: Path, *, directory: bool = False) -> None:
    with _os_errors("cannot fsync", path):
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
        try:
            os.fsync(fd)
        except OSError as exc:
            # Some network filesystems cannot fsync a directory; their metadata is
            # synchronous on the server, so there is nothing more to do.
            if not directory or exc.errno not in (errno.EINVAL, errno.ENOTSUP):
                raise
        finally:
            os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    """Write ``path`` atomically: a temporary sibling, fsync'd, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with _os_errors("cannot write", tmp):
        tmp.write_text(text, encoding="utf-8")
    _fsync(tmp)
    _replace_file(tmp, path)


def _replace_file(source: Path, dest: Path) -> None:
    with _os_errors("cannot rename into", dest):
        os.replace(source, dest)
    _fsync(dest.parent, directory=True)


def _remove_durably(path: Path) -> None:
    with _os_errors("cannot remove", path), contextlib.suppress(FileNotFoundError):
        path.unlink()
    _fsync(path.parent, directory=True)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _remove_tree(path: Path) -> None:
    with _os_errors("cannot remove", path), contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def _fresh_dir(path: Path) -> None:
    _remove_tree(path)
    with _os_errors("cannot create", path):
        path.mkdir()


def _rename_away(path: Path, tomb: Path) -> None:
    with _os_errors("cannot rename", path):
        if path.exists():
            _remove_tree(tomb)
            path.rename(tomb)
    _fsync(path.parent, directory=True)


def _read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_FILE
    with _os_errors("cannot read", path):
        text = path.read_text(encoding="utf-8")
    manifest = Manifest.from_json(text, path=str(path))
    if manifest.backup_id != directory.name:
        raise RepositoryError(
            f"manifest {path}: backup_id {manifest.backup_id!r} is not its directory's name",
            path=str(path),
        )
    return manifest


def _read_backup(directory: Path, domain: str) -> Manifest:
    if not (directory / MANIFEST_FILE).is_file():
        raise BackupNotFoundError(
            f"no backup {directory.name} of {domain} in {directory.parent}", path=str(directory)
        )
    return _read_manifest(directory)


_UUID_RE = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


# Writing the manifest, the fsyncs (the images' data was flushed by the copy) and the
# rename: seconds, unless the filesystem hangs.
PUBLISH_TIMEOUT = 600.0


async def _clean_up(remove: Callable[[Path], None], path: Path, timeout: float) -> None:
    """Remove ``path`` after a failure, to the end even if cancelled meanwhile, but not
    beyond ``timeout`` (a hung filesystem): then it is left, and said."""
    try:
        await to_completion(asyncio.to_thread(remove, path), timeout=timeout)
    except TimeoutError:
        log.error("could not remove in time; left behind", path=str(path), timeout=timeout)


def _backup_ids(backups_dir: Path) -> list[str]:
    """The published backups' directories (none if there is no directory): hidden
    entries are staging, merge and dropped dirs; anything else is not ours."""
    with _os_errors("cannot list", backups_dir):
        try:
            return [n for n in os.listdir(backups_dir) if BACKUP_ID_RE.fullmatch(n)]
        except FileNotFoundError:
            return []


def _has_backups(backups_dir: Path) -> bool:
    return bool(_backup_ids(backups_dir))


def _read_backups(backups_dir: Path) -> list[Manifest]:
    manifests = [_read_manifest(backups_dir / n) for n in _backup_ids(backups_dir)]
    return sorted(manifests, key=lambda m: (m.created_at, m.backup_id))


def _read_latest(backups_dir: Path) -> Manifest | None:
    names = _backup_ids(backups_dir)
    if not names:
        return None
    second = max(n.split("-", 1)[0] for n in names)
    newest = [_read_manifest(backups_dir / n) for n in names if n.startswith(second + "-")]
    return max(newest, key=lambda m: (m.created_at, m.backup_id))


def _domain_names(root: Path) -> list[str]:
    with _os_errors("cannot list", root):
        try:
            return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        except FileNotFoundError:
            return []


def _make_staging(backups_dir: Path, backup_id: str) -> Path:
    final = backups_dir / backup_id
    staging = backups_dir / f"{STAGING_PREFIX}{backup_id}"
    if final.exists():
        raise RepositoryError(f"backup {backup_id} already exists at {final}", path=str(final))
    with _os_errors("cannot create", staging):
        backups_dir.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    return staging


def _check_new_image(staging: Path, image: str, backing: str | None) -> None:
    if not staging.is_dir():
        raise RepositoryError(f"staging directory {staging} does not exist", path=str(staging))
    if (staging / image).exists():
        raise RepositoryError(f"{staging / image} already exists", path=str(staging / image))
    if backing is not None and not (staging / backing).is_file():
        path = staging / backing
        raise RepositoryError(f"backing image {path} does not exist", path=str(path))


def _check_publishable(staging: Path, manifest: Manifest) -> None:
    final = staging.parent / manifest.backup_id
    if final.exists():
        raise RepositoryError(
            f"backup {manifest.backup_id} already exists at {final}", path=str(final)
        )
    if manifest.parent is not None and not (staging.parent / manifest.parent).is_dir():
        path = staging.parent / manifest.parent
        raise RepositoryError(f"parent backup {path} does not exist", path=str(path))
    if not manifest.disks:
        raise RepositoryError(f"backup {manifest.backup_id} has no disks", path=str(staging))


def _fields(value: Any) -> dict[str, Any]:
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


def _round_trip(manifest: Manifest, path: Path) -> str:
    """``manifest`` as JSON, once it is known to read back as the same manifest."""
    text = manifest.to_json()
    if Manifest.from_json(text, path=str(path)) != dataclasses.replace(
        manifest, version=MANIFEST_VERSION
    ):
        raise RepositoryError(f"{path}: the manifest does not read back as written", path=str(path))
    return text


def _publish(staging: Path, manifest: Manifest, text: str) -> Path:
    final = staging.parent / manifest.backup_id
    with _os_errors("cannot write", staging / MANIFEST_FILE):
        (staging / MANIFEST_FILE).write_text(text, encoding="utf-8")
    with _os_errors("cannot list", staging):
        files = sorted(staging.iterdir())
    for path in files:
        _fsync(path)
    _fsync(staging, directory=True)
    with _os_errors("cannot publish", final):
        if final.exists():  # raced with another writer since the check
            raise FileExistsError(errno.EEXIST, "backup already exists")
        staging.rename(final)
    # The new entry, and (first backup) the domain and backups dirs, must survive a crash.
    for directory in (staging.parent, staging.parent.parent, staging.parent.parent.parent):
        _fsync(directory, directory=True)
    return final


def _remove_leftovers(backups_dir: Path) -> list[Path]:
    prefixes = (STAGING_PREFIX, MERGE_PREFIX, DROPPED_PREFIX)
    with _os_errors("cannot list", backups_dir):
        try:
            leftovers = sorted(p for p in backups_dir.iterdir() if p.name.startswith(prefixes))
        except FileNotFoundError:
            return []
    for path in leftovers:
        _remove_tree(path)
    if leftovers:
        _fsync(backups_dir, directory=True)
    return leftovers


def _replace_manifest(merge_dir: Path, directory: Path, manifest: Manifest) -> None:
    staged = merge_dir / MANIFEST_FILE
    text = _round_trip(manifest, staged)
    with _os_errors("cannot write", staged):
        staged.write_text(text, encoding="utf-8")
    _fsync(staged)
    _replace_file(staged, directory / MANIFEST_FILE)
    _remove_tree(merge_dir)


def _write_intent(path: Path, drop: Sequence[str]) -> None:
    intent = {"format": INTENT_FORMAT, "version": INTENT_VERSION, "drop": list(drop)}
    _write_durably(path, json.dumps(intent, indent=2) + "\n")


def _read_intent(path: Path) -> list[str] | None:
    with _os_errors("cannot read", path):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
    try:
        data = json.loads(text)
        if data["format"] != INTENT_FORMAT or data["version"] != INTENT_VERSION:
            raise ValueError("unknown format or version")
        drop = data["drop"]
        if not isinstance(drop, list) or not all(
            isinstance(i, str) and BACKUP_ID_RE.fullmatch(i) for i in drop
        ):
            raise ValueError("'drop' is not a list of backup ids")
    except (ValueError, KeyError, TypeError) as exc:
        raise RepositoryError(
            f"retention intent {path} is malformed: {exc}", path=str(path)
        ) from exc
    return drop


def _prepare_destination(dest: Path, part: Path) -> None:
    if dest.exists() or dest.is_symlink():
        raise DestinationExistsError(f"restore destination {dest} already exists", path=str(dest))
    if not dest.parent.is_dir():
        raise RepositoryError(f"directory {dest.parent} does not exist", path=str(dest.parent))
    # <dest>.part is this restore's own temporary name; one left by a crash is replaced.
    with _os_errors("cannot remove", part), contextlib.suppress(FileNotFoundError):
        part.unlink()


def _commit_file(part: Path, dest: Path) -> None:
    _fsync(part)
    if dest.exists():
        raise RepositoryError(f"restore destination {dest} appeared meanwhile", path=str(dest))
    _replace_file(part, dest)


def _hash_local(path: Path, piece: _Piece, digest: _Digest) -> None:
    if piece.zero:
        zeros = bytes(min(_CHUNK, piece.length))
        for start in range(0, piece.length, _CHUNK):
            digest.update(zeros[: min(_CHUNK, piece.length - start)])
        return
    assert piece.host is not None
    with _os_errors("cannot read", path), path.open("rb") as file:
        for start in range(0, piece.length, _CHUNK):
            size = min(_CHUNK, piece.length - start)
            data = os.pread(file.fileno(), size, piece.host + start)
            if len(data) != size:
                raise _UnreadableError(f"{path} ends inside a data cluster (file truncated?)")
            digest.update(data)


def _hash_file(path: Path, skip: int, length: int, digest: _Digest) -> None:
    with _os_errors("cannot read", path), path.open("rb") as file:
        file.seek(skip)
        while length > 0 and (chunk := file.read(min(_CHUNK, length))):
            digest.update(chunk)
            length -= len(chunk)
    if length:
        raise _UnreadableError(f"qemu-img convert of {path} returned too little data")
