"""The API's bearer token: made once, kept in a root-only file, read by the agent and the CLI.

Unless ``[http] token_file`` names a file, the token lives in ``<state_dir>/api-token``:
the agent makes it on its first start (32 random bytes, URL-safe base64, mode 0600,
created exclusively so that two starts never write different tokens) and reads it on
every later one; the CLI reads the same file, so root needs no configuration. The file
appears whole or not at all: it is written and fsync'd under a temporary name, then
linked into place (a link fails if the name exists: of two starts at once, one token
wins and both read it). A token file that is not the agent's user's own, that group or
others may read, or (the default one) that is a symbolic link is refused, by the agent
and by the CLI: the token is as good as root's say over every backup. Rotation: replace
the file's content (or delete the default one) and restart the agent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import Final

from agent.core.durable import make_dir_durably
from agent.core.errors import ConfigError

_MIN_LENGTH: Final = 16
_KEY: Final = "http.token_file"


def ensure_token(path: Path, *, made_here: bool) -> str:
    """The token in ``path``; made first when ``made_here`` (the default file) and it is
    missing. ConfigError naming the file when it cannot be made, read or trusted."""
    if made_here:
        try:
            make_dir_durably(path.parent, mode=0o700)
            _make(path)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(
                f"[http] token_file {path}: cannot make the API token: {exc.strerror or exc}",
                key=_KEY,
            ) from exc
    return read_token(path, follow=not made_here)


def read_token(path: Path, *, follow: bool = True) -> str:
    """The token in ``path``; ConfigError naming the file when it is missing, unreadable,
    not the agent's user's own, readable by group or others, a symbolic link (unless
    ``follow``: an operator's file may be one), or not one word of at least 16
    characters."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"[http] token_file {path}: no API token there (the agent makes it on its "
            "first start; is this the agent's configuration?)",
            key=_KEY,
        ) from exc
    except OSError as exc:
        why = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        raise ConfigError(f"[http] token_file {path}: cannot read it: {why}", key=_KEY) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"[http] token_file {path}: not a regular file", key=_KEY)
        if info.st_uid != os.geteuid():
            raise ConfigError(
                f"[http] token_file {path}: owned by uid {info.st_uid}, not by this "
                f"process's user ({os.geteuid()}): anyone who could write it chose the token",
                key=_KEY,
            )
        if info.st_mode & 0o077:
            raise ConfigError(
                f"[http] token_file {path}: group or others may read it (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); `chmod 600` it and use a new token",
                key=_KEY,
            )
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"[http] token_file {path}: not UTF-8 text", key=_KEY) from exc
    if len(token) < _MIN_LENGTH or any(c.isspace() for c in token):
        raise ConfigError(
            f"[http] token_file {path}: the token must be one word of at least "
            f"{_MIN_LENGTH} characters",
            key=_KEY,
        )
    return token


def _make(path: Path) -> None:
    """A new token in ``path``, whole: FileExistsError if one is there already."""
    if path.is_symlink() or path.exists():
        raise FileExistsError(path)
    import secrets  # noqa: PLC0415 - only the agent makes tokens; the CLI reads them

    token = secrets.token_urlsafe(32)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o600)
    try:
        try:
            os.write(fd, (token + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temporary, path)  # FileExistsError: another start made it first
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
