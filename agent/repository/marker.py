"""Which repository a path holds: a marker file in its root, and the id this agent uses.

A repository on a mount (NFS, a disk of its own) that is not mounted is an empty
directory of the root filesystem: a backup that went ahead would write a new chain
there, filling the root filesystem while the real repository waits unmounted. So the
repository carries ``.backup-agent-repository`` (JSON: its id, a uuid4, the marker's
format and when it was made), and the agent records the id it uses in
``<state_dir>/repository-id``. Before anything writes, :meth:`RepositoryMarker.ensure_ready`:

===========  =======================  ============================================
recorded id  repository path          then
===========  =======================  ============================================
none         missing, or empty        initialise: directory (0700), new marker, record its id
none         has a marker             adopt its id (new host on shared storage, new state dir)
none         our layout, no marker    an earlier agent's: write a marker, record its id
none         anything else            refused: not a repository
X            marker X                 go on (refused if the filesystem is read-only)
X            no marker, or missing    refused: "is it mounted?"
X            marker Y                 refused: another repository is mounted there
===========  =======================  ============================================

A refusal writes nothing, not even a directory: everything is read first. Reading
(restore, listing, verify: :meth:`RepositoryMarker.check`) applies the same refusals when
an id is recorded, and otherwise reads whatever is there and records nothing: a
repository copied to another host can be restored from without an agent's state.

"Empty" ignores ``lost+found`` (a freshly made ext4), a marker's temporary file and a
``/readyz`` probe's file. "Our layout": every entry a domain directory holding only
``backups/`` (published backups and our hidden leftovers) and retention's intent.

The marker is written to a temporary file (0600), fsync'd, linked into place (a marker
another agent made meanwhile is never replaced: it is adopted), and its directory
fsync'd; the id file is written aside, fsync'd, renamed into place, its directory
fsync'd. A failure (read-only or full filesystem) removes the temporary file.

Everything checked here is read again on every call (a stat and two small reads): an
unmount between two jobs is never missed.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TypeVar

from agent.core.blocking import Filesystem
from agent.core.errors import (
    FilesystemHungError,
    RepositoryError,
    RepositoryMarkerError,
    RepositoryReadOnlyError,
)
from agent.core.logs import get_logger
from agent.repository.layout import (
    BACKUPS_DIR,
    DROPPED_PREFIX,
    INTENT_FILE,
    MERGE_PREFIX,
    STAGING_PREFIX,
    _fsync,
    _os_errors,
)
from agent.repository.manifest import BACKUP_ID_RE

log = get_logger("repository")

MARKER_FILE: Final = ".backup-agent-repository"
ID_FILE: Final = "repository-id"
MARKER_FORMAT: Final = 1
_MARKER_KIND: Final = "libvirt-backup-agent repository"
_MARKER_TMP: Final = f"{MARKER_FILE}.tmp-"
# Not content: a new ext4's lost+found, our own temporary marker, /readyz's probe file.
_NOT_CONTENT: Final = ("lost+found",)
_NOT_CONTENT_PREFIXES: Final = (_MARKER_TMP, ".readyz-")
_BACKUP_LEFTOVERS: Final = (STAGING_PREFIX, MERGE_PREFIX, DROPPED_PREFIX)
_T = TypeVar("_T")


class Action(enum.StrEnum):
    """What :meth:`RepositoryMarker.ensure_ready` or :meth:`~RepositoryMarker.init` did."""

    CHECKED = "checked"  # the marker holds the recorded id
    UNCHECKED = "unchecked"  # reading, and no id recorded: nothing to compare with
    UNCHANGED = "unchanged"  # init: the path holds the repository this agent uses already
    INITIALISED = "initialised"  # a new repository: directory, marker, id recorded
    UPGRADED = "upgraded"  # a repository of an earlier agent version got its marker
    ADOPTED = "adopted"  # the path's marker's id recorded


@dataclass(frozen=True, slots=True)
class Marker:
    id: str
    format: int
    created_at: str

    @classmethod
    def new(cls) -> Marker:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(id=str(uuid.uuid4()), format=MARKER_FORMAT, created_at=now)

    def to_json(self) -> str:
        fields = {"kind": _MARKER_KIND, "format": self.format, "id": self.id}
        return json.dumps({**fields, "created_at": self.created_at}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, path: Path) -> Marker:
        def damaged(why: str) -> RepositoryMarkerError:
            return RepositoryMarkerError(
                f"marker {path} is damaged ({why}); nothing was written. If this is the "
                f"repository, remove the marker and run `backup-agent repository init "
                f"--replace` on every agent using it",
                path=str(path),
            )

        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise damaged(f"not JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("kind") != _MARKER_KIND:
            raise damaged(f"not a {_MARKER_KIND} marker")
        version = data.get("format")
        if not isinstance(version, int) or version < 1:
            raise damaged(f"format {version!r} is not a positive integer")
        if version > MARKER_FORMAT:
            raise RepositoryMarkerError(
                f"marker {path} has format {version}, made by a newer agent version (this "
                f"one reads format {MARKER_FORMAT}): upgrade this agent",
                path=str(path),
            )
        repository_id = data.get("id")
        if not isinstance(repository_id, str) or not _is_uuid(repository_id):
            raise damaged(f"id {repository_id!r} is not a UUID")
        # Compared with the recorded id, which is read in lower case too.
        repository_id = repository_id.lower()
        return cls(id=repository_id, format=version, created_at=str(data.get("created_at", "")))


@dataclass(frozen=True, slots=True)
class Outcome:
    action: Action
    path: Path
    id: str | None  # the repository's id (None: unchecked, and the path has no marker)
    previous: str | None = None  # init: the id this agent used before, if it changed


class RepositoryMarker:
    """The marker of the repository at ``root`` and the id recorded in ``state_dir``
    (see the module docstring). Each call is one call on the repository's threads,
    bounded by ``timeout`` (then FilesystemHungError)."""

    def __init__(self, root: Path, state_dir: Path, *, timeout: float = 60.0) -> None:
        self.root = root
        self.id_file = state_dir / ID_FILE
        self._timeout = timeout

    async def ensure_ready(self, *, create: bool = True) -> Outcome:
        """Before writing: the path holds the repository this agent uses, and can be
        written; initialised or adopted if the agent records none yet (a missing or
        empty path is initialised only with ``create``). Raises RepositoryMarkerError or
        RepositoryReadOnlyError (nothing written) otherwise."""
        outcome = await self._bounded(_ensure, self.root, self.id_file, True, create)
        _log(outcome)
        return outcome

    async def check(self) -> Outcome:
        """Before reading: if this agent records a repository id, the path holds it."""
        return await self._bounded(_ensure, self.root, self.id_file, False)

    async def init(self, *, replace: bool = False) -> Outcome:
        """``backup-agent repository init``: as :meth:`ensure_ready`, and a path with a
        marker is adopted; but a path that is not the repository this agent records is
        refused unless ``replace`` (then this agent uses the path's from now on)."""
        outcome = await self._bounded(_init, self.root, self.id_file, replace)
        _log(outcome)
        return outcome

    async def _bounded(self, work: Callable[..., _T], *args: object) -> _T:
        # On the repository's own threads (agent.core.blocking): on a hung mount every
        # check after the first fails at once instead of taking another thread.
        try:
            return await Filesystem(self.root, timeout=self._timeout).call(
                "check the repository marker", work, *args
            )
        except FilesystemHungError as exc:
            raise FilesystemHungError(
                f"{exc}; nothing was started", path=str(self.root), seconds=exc.seconds
            ) from exc


def _log(outcome: Outcome) -> None:
    if outcome.action not in (Action.CHECKED, Action.UNCHECKED, Action.UNCHANGED):
        log.warning(
            f"repository {outcome.action}",
            path=str(outcome.path),
            repository_id=outcome.id,
            previous=outcome.previous,
        )


# --- the rules (blocking: run in a worker thread) ----------------------------------------


def _ensure(root: Path, id_file: Path, write: bool, create: bool = True) -> Outcome:
    recorded = _read_recorded(id_file)
    marker = _read_marker(root)
    if recorded is not None:
        _check_identity(root, id_file, recorded, marker)
        if write:
            _check_writable(root)
        return Outcome(Action.CHECKED, root, recorded)
    if not write:
        return Outcome(Action.UNCHECKED, root, marker.id if marker is not None else None)
    if marker is not None:
        _record(id_file, marker.id)
        return Outcome(Action.ADOPTED, root, marker.id)
    if not create and not _content(root):
        raise RepositoryMarkerError(
            f"repository {root} is missing or empty and this agent records no repository id "
            f"({id_file}), but it has made backups before (its ledger says so): is the "
            "repository mounted? Nothing was written. A new, empty repository is started "
            "with `backup-agent repository init`",
            path=str(root),
        )
    return _make(root, id_file, previous=None)


def _init(root: Path, id_file: Path, replace: bool) -> Outcome:
    recorded = _read_recorded(id_file)
    marker = _read_marker(root)
    if marker is not None and marker.id == recorded:
        return Outcome(Action.UNCHANGED, root, recorded)
    if recorded is not None and not replace:
        found = f"is repository {marker.id}" if marker is not None else "holds no repository"
        raise RepositoryMarkerError(
            f"{root} {found}, but this agent uses repository {recorded} (recorded in "
            f"{id_file}); nothing was written. Add --replace to make this agent use "
            f"{root} from now on",
            path=str(root),
        )
    if marker is not None:
        _record(id_file, marker.id)
        return Outcome(Action.ADOPTED, root, marker.id, previous=recorded)
    return _make(root, id_file, previous=recorded)


def _check_identity(root: Path, id_file: Path, recorded: str, marker: Marker | None) -> None:
    if marker is None:
        raise RepositoryMarkerError(
            f"repository {root} has no marker {root / MARKER_FILE} (is it mounted?); this "
            f"agent uses repository {recorded} (recorded in {id_file}). Nothing was "
            "written: mount it, or start a new repository there with `backup-agent "
            "repository init --replace`",
            path=str(root),
        )
    if marker.id != recorded:
        raise RepositoryMarkerError(
            f"repository {root} is repository {marker.id}, this agent uses {recorded} (is "
            "the right filesystem mounted?); nothing was written. To use this one from now "
            "on: `backup-agent repository init --replace`",
            path=str(root),
        )


def _make(root: Path, id_file: Path, *, previous: str | None) -> Outcome:
    """A new marker in a missing, empty or earlier-agent repository; anything else refused."""
    entries = _content(root)
    if entries and MARKER_FILE in entries:
        # Made since it was read (another job or agent initialising at the same moment).
        marker = _read_marker(root)
        if marker is not None:
            _record(id_file, marker.id)
            return Outcome(Action.ADOPTED, root, marker.id, previous=previous)
    if entries:
        foreign = [name for name in entries if not _ours(root / name)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise RepositoryMarkerError(
                f"repository {root} is not empty and has no marker {MARKER_FILE}: not a "
                f"backup-agent repository (it holds {shown}); nothing was written. Point "
                "[repository] path at a missing or empty directory, or at a repository",
                path=str(root),
            )
    if entries is None:
        with _os_errors("cannot create repository", root):
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        _fsync(root.parent, directory=True)
    else:
        _check_writable(root)
    marker = _write_marker(root, Marker.new())
    _record(id_file, marker.id)
    action = Action.UPGRADED if entries else Action.INITIALISED
    return Outcome(action, root, marker.id, previous=previous)


# --- reading -------------------------------------------------------------------------------


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


def _read_recorded(id_file: Path) -> str | None:
    with _os_errors("cannot read", id_file):
        try:
            text = id_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
    if not _is_uuid(text):
        raise RepositoryMarkerError(
            f"{id_file} does not hold a repository id ({text[:40]!r}); remove it, and the "
            "next backup adopts the repository's marker",
            path=str(id_file),
        )
    return text.lower()


def _read_marker(root: Path) -> Marker | None:
    """The marker; None if there is none (or no ``root`` at all)."""
    path = root / MARKER_FILE
    with _os_errors("cannot read", path):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            raise RepositoryError(f"repository {root} is not a directory", path=str(root)) from None
    return Marker.from_json(text, path)


def _content(root: Path) -> list[str] | None:
    """What ``root`` holds, not counting what is not content; None if it is missing."""
    with _os_errors("cannot list repository", root):
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            return None
    return sorted(
        n for n in names if n not in _NOT_CONTENT and not n.startswith(_NOT_CONTENT_PREFIXES)
    )


def _ours(domain_dir: Path) -> bool:
    """A domain directory an earlier agent version made: ``backups/`` holding backups and
    our leftovers, and retention's intent; nothing else."""
    if domain_dir.is_symlink() or not domain_dir.is_dir():
        return False
    with _os_errors("cannot list", domain_dir):
        names = set(os.listdir(domain_dir))
    # (staging creates backups/ with the domain's directory, and nothing removes it)
    if BACKUPS_DIR not in names or not names <= {BACKUPS_DIR, INTENT_FILE, f".{INTENT_FILE}.tmp"}:
        return False
    backups = domain_dir / BACKUPS_DIR
    if backups.is_symlink() or not backups.is_dir():
        return False
    with _os_errors("cannot list", backups):
        return all(
            BACKUP_ID_RE.fullmatch(n) or n.startswith(_BACKUP_LEFTOVERS)
            for n in os.listdir(backups)
        )


def _check_writable(root: Path) -> None:
    with _os_errors("cannot stat filesystem of", root):
        flags = os.statvfs(root).f_flag
    if flags & os.ST_RDONLY:
        raise RepositoryReadOnlyError(
            f"repository {root} is on a read-only filesystem; nothing was written. Remount "
            "it read-write",
            path=str(root),
        )


# --- writing -------------------------------------------------------------------------------


def _write_marker(root: Path, marker: Marker) -> Marker:
    """Put ``marker`` in place, durably; if another one got there first, that one."""
    final = root / MARKER_FILE
    tmp = root / f"{_MARKER_TMP}{secrets.token_hex(4)}"
    try:
        _write_new(tmp, marker.to_json())
        with _os_errors("cannot create marker", final):
            try:
                os.link(tmp, final)  # never replaces: two initialisers agree on one id
            except FileExistsError:
                raced = _read_marker(root)
                if raced is None:
                    raise
                marker = raced
            except OSError as exc:
                # Filesystems without hard links: a rename (replacing only what raced in).
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                os.rename(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync(root, directory=True)
    return marker


def _record(id_file: Path, repository_id: str) -> None:
    """``<state_dir>/repository-id``, durably."""
    with _os_errors("cannot create", id_file.parent):
        id_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = id_file.with_name(f".{id_file.name}.tmp-{secrets.token_hex(4)}")
    try:
        _write_new(tmp, repository_id + "\n")
        with _os_errors("cannot rename into", id_file):
            os.replace(tmp, id_file)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync(id_file.parent, directory=True)


def _write_new(path: Path, text: str) -> None:
    """A new file (0600) holding ``text``, fsync'd; removed again if that fails."""
    with _os_errors("cannot write", path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            data = text.encode()
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except OSError:
            os.close(fd)
            path.unlink()
            raise
        os.close(fd)
