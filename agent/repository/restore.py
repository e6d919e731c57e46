"""Restore: one disk as it was at one backup, written out as a standalone image.

``qemu-img convert`` of the backup's image reads its whole backing chain. The copy is
written to ``<dest>.part`` and renamed to ``dest`` once complete and fsync'd; an existing
``dest`` is refused, and a failed or cancelled restore leaves no ``.part`` behind. The
``.part`` is made 0600 before qemu-img writes into it (qemu-img keeps an existing file's
mode) and given its final mode (``[jobs] restore_file_mode``) just before the rename: a
VM's data is never readable by others while it is being written. Where the backup
recorded the point's digest (:mod:`agent.repository.windows`), the ``.part`` is read back
and its digest compared before the rename: a restore that does not give back the
point's bytes fails, and leaves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path

from agent.core.errors import DestinationExistsError, RepositoryError
from agent.repository.layers import QemuImg
from agent.repository.layout import _clean_up, _fsync, _os_errors, _replace_file, _unlink
from agent.repository.windows import WindowDigest

_CHUNK = 4 << 20


async def restore_image(
    qemu: QemuImg,
    source: Path,
    dest: Path,
    *,
    fmt: str,
    mode: int = 0o600,
    progress: Callable[[float], None] | None = None,
    expected: str | None = None,
) -> None:
    """Convert the qcow2 image ``source`` (with its chain) to ``dest`` in format ``fmt``,
    with permissions ``mode``; ``progress`` gets the fraction done as qemu-img reports it.
    With ``expected`` (the point's digest) the result is checked against it first."""
    part = dest.with_name(dest.name + ".part")
    await asyncio.to_thread(_prepare_destination, dest, part)
    try:
        await asyncio.to_thread(_make_private, part)
    except BaseException:
        await _clean_up(_unlink, part, qemu.timeout)
        raise
    if progress is not None:
        progress(0.0)
    try:
        # As fast as qemu-img goes: out-of-order writes, 8 coroutines.
        args = ["convert", "-W", "-m", "8", "-f", "qcow2", "-O", fmt, str(source), str(part)]
        if progress is not None:
            args.insert(1, "-p")
        await qemu.run(args, source, long=True, progress=progress)
        if expected is None:
            found = expected
            await asyncio.to_thread(_fsync, part)
        else:  # read back from the page cache while the fsync waits for the disk
            # Both run to their end (neither thread outlives the other's failure), and an
            # error is raised as itself, not wrapped.
            found, synced = await asyncio.gather(
                image_digest(qemu, part, fmt),
                asyncio.to_thread(_fsync, part),
                return_exceptions=True,
            )
            for outcome in (found, synced):
                if isinstance(outcome, BaseException):
                    raise outcome
            assert isinstance(found, str)
        if found != expected:
            raise RepositoryError(
                f"restore of {source} to {dest}: the restored image's digest is {found}, "
                f"not the point's {expected} (the chain does not read what was backed "
                "up: run `backup-agent verify`)",
                path=str(source),
            )
        await asyncio.to_thread(_commit_file, part, dest, mode)
    except BaseException:
        await _clean_up(_unlink, part, qemu.timeout)
        raise
    if progress is not None:
        progress(1.0)


async def image_digest(qemu: QemuImg, path: Path, fmt: str) -> str:
    """The window sum of the whole disk the standalone image ``path`` (raw or qcow2)
    holds: its data read, its holes and zero clusters counted as zeroes unread."""
    if fmt == "raw":
        segments = await asyncio.to_thread(_raw_segments, path)
    else:
        extents = await qemu.layer_map(path)
        if any(e.data and e.host is None for e in extents):  # (qemu-img convert: never)
            raise RepositoryError(f"{path}: compressed clusters; cannot check its digest")
        segments = [(e.start, e.length, e.host if e.data else None) for e in extents]
    return await asyncio.to_thread(_digest_segments, path, segments)


def _raw_segments(path: Path) -> list[tuple[int, int, int | None]]:
    """A raw file's data and holes, in order: (offset, length, where it is read or None)."""
    segments: list[tuple[int, int, int | None]] = []
    with _os_errors("cannot read", path), path.open("rb") as file:
        size, position, fd = os.fstat(file.fileno()).st_size, 0, file.fileno()
        while position < size:
            try:
                data = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = size  # only a hole is left
            if data > position:
                segments.append((position, data - position, None))
            if data >= size:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            segments.append((data, hole - data, data))
            position = hole
    return segments


def _digest_segments(path: Path, segments: list[tuple[int, int, int | None]]) -> str:
    digest = WindowDigest(segments[0][0] if segments else 0)
    with _os_errors("cannot read", path), path.open("rb") as file:
        for _, length, host in segments:
            if host is None:
                digest.zeros(length)
                continue
            for start in range(0, length, _CHUNK):
                size = min(_CHUNK, length - start)
                chunk = os.pread(file.fileno(), size, host + start)
                if len(chunk) != size:
                    raise RepositoryError(f"{path} ends before its data (truncated?)")
                digest.update(chunk)
    return digest.hexdigest()


def _prepare_destination(dest: Path, part: Path) -> None:
    if dest.exists() or dest.is_symlink():
        raise DestinationExistsError(f"restore destination {dest} already exists", path=str(dest))
    if not dest.parent.is_dir():
        raise RepositoryError(f"directory {dest.parent} does not exist", path=str(dest.parent))
    # <dest>.part is this restore's own temporary name; one left by a crash is replaced.
    with _os_errors("cannot remove", part), contextlib.suppress(FileNotFoundError):
        part.unlink()


def _make_private(part: Path) -> None:
    with _os_errors("cannot create", part):
        os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))


def _commit_file(part: Path, dest: Path, mode: int) -> None:
    with _os_errors("cannot set the mode of", part):
        os.chmod(part, mode)
    _fsync(part)
    if dest.exists():
        raise RepositoryError(f"restore destination {dest} appeared meanwhile", path=str(dest))
    _replace_file(part, dest)
