"""The API's bearer token: made once, kept in a root-only file, read by the agent and the CLI.

Unless ``[http] token_file`` names a file, the token lives in ``<state_dir>/api-token``:
the agent makes it on its first start (32 random bytes, URL-safe base64, mode 0600,
created exclusively so that two starts never write different tokens) and reads it on
every later one; the CLI reads the same file, so root needs no configuration. A token
file that other users may read is refused, by the agent and by the CLI: the token is as
good as root's say over every backup. Rotation: replace the file's content (or delete
the default one) and restart the agent.
"""

from __future__ import annotations

import contextlib
import os
import secrets
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
    return read_token(path)


def read_token(path: Path) -> str:
    """The token in ``path``; ConfigError naming the file when it is missing, unreadable,
    readable by other users, or not one word of at least 16 characters."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"[http] token_file {path}: no API token there (the agent makes it on its "
            "first start; is this the agent's configuration?)",
            key=_KEY,
        ) from exc
    except OSError as exc:
        raise ConfigError(
            f"[http] token_file {path}: cannot read it: {exc.strerror or exc}", key=_KEY
        ) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"[http] token_file {path}: not a regular file", key=_KEY)
        if mode & 0o007:
            raise ConfigError(
                f"[http] token_file {path}: other users may read it (mode "
                f"{stat.S_IMODE(mode):04o}); `chmod 600` it and use a new token",
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
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()  # never leave a half-written token behind
        raise
    os.close(fd)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
