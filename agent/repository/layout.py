"""The repository on disk: where each backup's files live, and durable file operations.

Layout::

    <root>/
        <domain-name>/
            retention.json                   only while apply_retention runs: its intent
            backups/
                <backup-id>/                 published: complete, fsync'd, never modified
                    manifest.json            (except by retention, see :mod:`.retention`)
                    <target>.qcow2           full, or overlay: backing ../<parent-id>/<target>.qcow2
                .staging-<backup-id>/        a backup being written (same content)
                .merge-<backup-id>/          retention: merged images waiting to replace its own
                .dropped-<backup-id>/        retention: a dropped backup being deleted

Backup ids (``20261125T183301Z-1a2b3c``) sort by time; listings order by the manifests'
``created_at`` (then id), so two backups in one second still come in order.

*Staging is a sibling of the published directories*, not a separate tree: an overlay's
backing path ``../<parent-id>/<target>.qcow2`` then resolves the same before and after
publishing. So the writer can (and must, see :mod:`agent.repository.store`) open a staged
overlay *with* its backing chain, and publishing is one ``rename`` within one directory. A
backup appears only complete: :func:`_publish` writes the manifest, fsyncs every file and
the staging directory, renames it to ``<backup-id>`` and fsyncs ``backups/``. A crash leaves
the whole backup or a hidden leftover that :func:`_remove_leftovers` removes.

Everything here blocks: callers run it through ``asyncio.to_thread``. OSError becomes
RepositoryError, naming the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from agent.core.errors import BackupNotFoundError, RepositoryError
from agent.core.logs import get_logger
from agent.core.shielding import to_completion
from agent.repository.manifest import (
    BACKUP_ID_RE,
    MANIFEST_FILE,
    MANIFEST_VERSION,
    NAME_RE,
    Manifest,
)

log = get_logger("repository")

INTENT_FILE: Final = "retention.json"
BACKUPS_DIR: Final = "backups"
STAGING_PREFIX: Final = ".staging-"
MERGE_PREFIX: Final = ".merge-"
DROPPED_PREFIX: Final = ".dropped-"


# --- names -----------------------------------------------------------------------------


def _check_name(name: str, what: str) -> None:
    if not NAME_RE.fullmatch(name):
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


# --- durable file operations -----------------------------------------------------------


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


async def _clean_up(remove: Callable[[Path], None], path: Path, timeout: float) -> None:
    """Remove ``path`` after a failure, to the end even if cancelled meanwhile, but not
    beyond ``timeout`` (a hung filesystem): then it is left, and said."""
    try:
        await to_completion(asyncio.to_thread(remove, path), timeout=timeout)
    except TimeoutError:
        log.error("could not remove in time; left behind", path=str(path), timeout=timeout)


# --- reading backups -------------------------------------------------------------------


def _read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_FILE
    with _os_errors("cannot read", path):
        data = path.read_bytes()
    return _parse_manifest(data, directory)


def _parse_manifest(data: bytes, directory: Path) -> Manifest:
    """The manifest of the backup in ``directory``, from its file's bytes."""
    path = directory / MANIFEST_FILE
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # garbage: say so, as of any other non-JSON
        raise RepositoryError(
            f"manifest {path}: not JSON: not UTF-8 text (byte {exc.start} of {len(data)})",
            path=str(path),
        ) from exc
    manifest = Manifest.from_json(text, path=str(path))
    if manifest.backup_id != directory.name:
        raise RepositoryError(
            f"manifest {path}: backup_id {manifest.backup_id!r} is not its directory's name",
            path=str(path),
        )
    return manifest


def _read_backup(directory: Path, domain: str) -> Manifest:
    if not (directory / MANIFEST_FILE).is_file():
        if directory.is_dir():  # published once: its manifest went missing since
            raise BackupNotFoundError(
                f"backup {directory.name} of {domain} is damaged: {directory / MANIFEST_FILE} "
                f"is missing (`backup-agent backups {domain}` lists what is damaged)",
                path=str(directory / MANIFEST_FILE),
            )
        raise BackupNotFoundError(
            f"no backup {directory.name} of {domain} in {directory.parent}", path=str(directory)
        )
    return _read_manifest(directory)


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


def _domain_names(root: Path) -> list[str]:
    with _os_errors("cannot list", root):
        try:
            return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        except FileNotFoundError:
            return []


# --- staging and publishing ------------------------------------------------------------


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
