"""Files that must survive a crash of the host, not only of the agent.

A file is durable once its data is fsync'd *and* the directory entry that names it is:
``rename`` and ``unlink`` change only the directory, which the kernel may write back
seconds later, so after a power loss a renamed file can be back under its temporary
name, or a removed one back in place. Everything here blocks: run it in a worker thread
(:mod:`agent.core.blocking` for the repository, scratch and run directories).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that the entries made or removed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some network filesystems cannot fsync a directory; their metadata is
        # synchronous on the server, so there is nothing more to do.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def write_durably(path: Path, text: str, *, mode: int = 0o600) -> None:
    """Write ``path`` atomically and durably: a temporary sibling (``mode``), written
    and fsync'd, renamed over ``path``, and the directory fsync'd. A failure removes
    the temporary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with open(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def remove_durably(path: Path) -> None:
    """Remove ``path`` (gone already is fine) and fsync its directory."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


def make_dir_durably(path: Path, *, mode: int = 0o700) -> None:
    """``path`` and its missing parents made (``mode``), each new entry fsync'd in its
    parent; an existing directory is left as it is."""
    missing = []
    current = path
    while not current.is_dir():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another writer
            directory.mkdir(mode=mode)
        fsync_dir(directory.parent)
