"""Verification: every image of a backup checked against its manifest.

:class:`Verifier` checks the structure of each image with ``qemu-img info`` (qcow2,
virtual size, backing path as in the manifest, backing file present), then re-reads every
range the manifest has a checksum for *from that image layer only*: ``qemu-img map`` of the
image opened without its backing gives each extent's host offset in the qcow2 file, which
is read directly (a thread, ``pread``); unallocated and zero extents read as zeros in a
standalone image, and are an error in an overlay (the bytes written there are missing).
Extents qemu-img gives no host offset for (compressed clusters) are read by ``qemu-img
convert`` of just that extent to a temporary raw file.

What is found is a list of :class:`Problem`, with what a listing found damaged
(:func:`with_damage`: manifests that do not read, chains that read them); and
:func:`damaged_disks` says which disks' restores read a damaged backup
(:func:`restore_chain`), so that their next backup is full.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.core.errors import RepositoryError
from agent.repository.layers import QemuImg, _bare, _Extent, _LayerInfo, _resolve
from agent.repository.layout import _clean_up, _os_errors, _remove_tree
from agent.repository.listing import Damage, time_order
from agent.repository.manifest import (
    BACKING_RE,
    Digest,
    DiskManifest,
    Manifest,
    RangeChecksum,
    new_digest,
)
from agent.repository.windows import WindowDigest

_CHUNK: Final = 1 << 20  # bytes read (or zeros hashed) per step when checking a range
_BATCH: Final = 64 << 20  # bytes of data hashed per thread call (many small ranges at once)
_FALLBACK_CHUNK: Final = 64 << 20  # bound on one temporary raw file of a compressed extent

LayerInfoReader = Callable[[Path], Awaitable[_LayerInfo]]


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong in one image; ``offset``/``length`` give the range when it is data."""

    backup_id: str
    target: str
    image: Path
    offset: int | None
    length: int | None
    message: str


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
        # Down the image's backing: an increment's, or a full read stored as what changed.
        below = BACKING_RE.fullmatch(own.backing) if own.backing is not None else None
        if below is None:
            break
        current = by_id.get(below["id"])
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


def with_damage(
    problems: Sequence[Problem], damaged: Sequence[Damage], order: Sequence[str]
) -> list[Problem]:
    """``problems`` with the damage a listing found (:mod:`.listing`) that they do not
    already name (the verifier finds a missing image itself), in the backups' ``order``
    (ids oldest first; one not in it, whose manifest does not read, by its id's second).

    A backup whose manifest does not read is a problem of disk ``-`` (the whole backup).
    """
    named = {(p.backup_id, p.target) for p in problems}
    extra = [
        Problem(d.backup_id, d.target or "-", d.path, None, None, d.error)
        for d in damaged
        if (d.backup_id, d.target or "-") not in named
    ]
    in_time = time_order(order)
    return sorted([*problems, *extra], key=lambda p: in_time(p.backup_id))


class Verifier:
    """Checks images against manifests with ``qemu``; ``layer_info`` reads an image's header."""

    def __init__(self, qemu: QemuImg, layer_info: LayerInfoReader):
        self._qemu = qemu
        self._layer_info = layer_info

    async def backups(self, backups_dir: Path, manifests: Sequence[Manifest]) -> list[Problem]:
        """What is wrong in these backups of one domain; [] if all is well."""
        problems: list[Problem] = []
        for manifest in manifests:
            directory = backups_dir / manifest.backup_id
            for disk in manifest.disks:
                problems += await self._verify_disk(directory, manifest.backup_id, disk)
        return problems

    async def disk(self, directory: Path, backup_id: str, disk: DiskManifest) -> list[Problem]:
        """What is wrong in one disk's image of the backup in ``directory``."""
        return await self._verify_disk(directory, backup_id, disk)

    async def _verify_disk(
        self, directory: Path, backup_id: str, disk: DiskManifest
    ) -> list[Problem]:
        problems, info = await self.structure(directory, disk, backup_id)
        if problems or info is None:
            return problems
        path = directory / disk.image
        try:
            extents = await self._qemu.layer_map(path)
        except RepositoryError as exc:
            return [Problem(backup_id, disk.target, path, None, None, str(exc))]
        overlay = info.backing is not None
        for checksum, message in await self._check_ranges(
            path, extents, disk.checksums, overlay=overlay
        ):
            problems.append(
                Problem(backup_id, disk.target, path, checksum.offset, checksum.length, message)
            )
        return problems

    async def structure(
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

    async def standalone(
        self, path: Path, checksums: Sequence[RangeChecksum]
    ) -> tuple[list[tuple[RangeChecksum, str]], list[_Extent]]:
        """The ``checksums`` that do not match the standalone image ``path``, each with
        what is wrong, and the image's extents (for :meth:`digest`)."""
        extents = await self._qemu.layer_map(path)
        return await self._check_ranges(path, extents, checksums, overlay=False), extents

    async def digest(
        self, path: Path, extents: Sequence[_Extent], offset: int, length: int, algorithm: str
    ) -> str:
        """The checksum of ``[offset, offset + length)`` of the standalone image ``path``;
        RepositoryError if it cannot be read."""
        [found] = await self.digests(path, extents, [(offset, length)], algorithm)
        return found

    async def digests(
        self,
        path: Path,
        extents: Sequence[_Extent],
        ranges: Sequence[tuple[int, int]],
        algorithm: str,
    ) -> list[str]:
        """The checksums of ``ranges`` (offset, length) of the standalone image ``path``,
        in order; RepositoryError if one cannot be read."""
        found = await self._digests(path, extents, ranges, [algorithm] * len(ranges), False)
        digests = []
        for (offset, length), result in zip(ranges, found, strict=True):
            if isinstance(result, _UnreadableError):
                raise RepositoryError(f"{path} [{offset}, {offset + length}): {result}")
            digests.append(result)
        return digests

    async def _check_ranges(
        self,
        path: Path,
        extents: Sequence[_Extent],
        checksums: Sequence[RangeChecksum],
        *,
        overlay: bool,
    ) -> list[tuple[RangeChecksum, str]]:
        """The ``checksums`` the layer's bytes do not match, each with why."""
        ranges = [(c.offset, c.length) for c in checksums]
        algorithms = [c.algorithm for c in checksums]
        found = await self._digests(path, extents, ranges, algorithms, overlay)
        wrong = []
        for checksum, result in zip(checksums, found, strict=True):
            where = f"{path} [{checksum.offset}, {checksum.offset + checksum.length})"
            if isinstance(result, _UnreadableError):
                wrong.append((checksum, f"{where}: {result}"))
            elif result != checksum.digest:
                wrong.append(
                    (checksum, f"{where}: checksum mismatch (data differs from what was written)")
                )
        return wrong

    async def _digests(
        self,
        path: Path,
        extents: Sequence[_Extent],
        ranges: Sequence[tuple[int, int]],
        algorithms: Sequence[str],
        overlay: bool,
    ) -> list[str | _UnreadableError]:
        """Each range's checksum, or why it cannot be read. Ranges whose bytes are all in
        the file (or zero) are hashed in batches of about :data:`_BATCH` bytes, each one
        thread call with the file opened once: a merge checks hundreds of small ranges,
        and a thread hop and an open each cost more than hashing 64 KiB."""
        results: list[str | _UnreadableError | None] = [None] * len(ranges)
        batch: list[tuple[int, list[_Piece], Digest]] = []
        size = 0
        starts = [e.start for e in extents]
        for index, ((offset, length), algorithm) in enumerate(zip(ranges, algorithms, strict=True)):
            try:
                pieces = _pieces(extents, offset, length, overlay=overlay, starts=starts)
            except _UnreadableError as exc:
                results[index] = exc
                continue
            digest = new_digest(algorithm, offset)
            if all(p.zero or p.host is not None for p in pieces):
                batch.append((index, pieces, digest))
                size += sum(p.length for p in pieces if not p.zero)
                if size >= _BATCH:
                    results = await self._hash_batch(path, batch, results)
                    batch, size = [], 0
                continue
            try:
                for piece in pieces:
                    if piece.zero or piece.host is not None:
                        await asyncio.to_thread(_hash_local, path, piece, digest)
                    else:
                        await self._hash_via_qemu(path, piece, digest)
                results[index] = digest.hexdigest()
            except _UnreadableError as exc:
                results[index] = exc
        if batch:
            results = await self._hash_batch(path, batch, results)
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    async def _hash_batch(
        self,
        path: Path,
        batch: list[tuple[int, list[_Piece], Digest]],
        results: list[str | _UnreadableError | None],
    ) -> list[str | _UnreadableError | None]:
        for index, result in await asyncio.to_thread(_hash_many, path, batch):
            results[index] = result
        return results

    async def _hash_via_qemu(self, path: Path, piece: _Piece, digest: Digest) -> None:
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
                await self._qemu.run(args, path, long=True)
                await asyncio.to_thread(_hash_file, tmp / "chunk", start - low, size, digest)
        finally:
            await _clean_up(_remove_tree, tmp, self._qemu.timeout)


@dataclass(frozen=True, slots=True)
class _Piece:
    """Part of a checked range: zeros, bytes at ``host`` in the file, or (neither) via qemu."""

    start: int
    length: int
    zero: bool
    host: int | None


class _UnreadableError(Exception):
    """A checksum range cannot be read from the layer; the message says why."""


def _pieces(
    extents: Sequence[_Extent],
    offset: int,
    length: int,
    *,
    overlay: bool,
    starts: Sequence[int] | None = None,
) -> list[_Piece]:
    """How to read ``[offset, offset + length)`` of one layer, extent by extent
    (``starts``: the extents' starts, to find the first one by bisection)."""
    pieces: list[_Piece] = []
    position, end = offset, offset + length
    first = max(0, bisect.bisect_right(starts, offset) - 1) if starts is not None else 0
    for index in range(first, len(extents)):  # (no slice: that copies the list each time)
        extent = extents[index]
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


def _hash_many(
    path: Path, batch: list[tuple[int, list[_Piece], Digest]]
) -> list[tuple[int, str | _UnreadableError]]:
    """Each range of ``batch`` (its pieces all zero or in the file) hashed, the file
    opened once."""
    results: list[tuple[int, str | _UnreadableError]] = []
    with _os_errors("cannot read", path), path.open("rb") as file:
        for index, pieces, digest in batch:
            try:
                for piece in pieces:
                    _hash_piece(file.fileno(), path, piece, digest)
                results.append((index, digest.hexdigest()))
            except _UnreadableError as exc:
                results.append((index, exc))
    return results


def _hash_piece(fd: int, path: Path, piece: _Piece, digest: Digest) -> None:
    if piece.zero and isinstance(digest, WindowDigest):
        digest.zeros(piece.length)  # (whole windows of zeroes add nothing: not hashed)
        return
    if piece.zero:
        zeros = bytes(min(_CHUNK, piece.length))
        for start in range(0, piece.length, _CHUNK):
            digest.update(zeros[: min(_CHUNK, piece.length - start)])
        return
    assert piece.host is not None
    for start in range(0, piece.length, _CHUNK):
        size = min(_CHUNK, piece.length - start)
        data = os.pread(fd, size, piece.host + start)
        if len(data) != size:
            raise _UnreadableError(f"{path} ends inside a data cluster (file truncated?)")
        digest.update(data)


def _hash_local(path: Path, piece: _Piece, digest: Digest) -> None:
    with _os_errors("cannot read", path), path.open("rb") as file:
        _hash_piece(file.fileno(), path, piece, digest)


def _hash_file(path: Path, skip: int, length: int, digest: Digest) -> None:
    with _os_errors("cannot read", path), path.open("rb") as file:
        file.seek(skip)
        while length > 0 and (chunk := file.read(min(_CHUNK, length))):
            digest.update(chunk)
            length -= len(chunk)
    if length:
        raise _UnreadableError(f"qemu-img convert of {path} returned too little data")
