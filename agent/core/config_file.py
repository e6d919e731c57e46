"""The configuration file as text and TOML, and the little of it the API verbs need.

:mod:`agent.core.config` validates the whole file (pydantic, about a fifth of a second
to import). The verbs that only talk to the running agent (``backup``, ``jobs``,
``cancel``, ``status``) need four keys of it, and start in a few tens of milliseconds
without pydantic: :func:`api_endpoint` reads those keys, checks them as the full model
does (and refuses a key those two sections do not have), and leaves the rest of the file
to the agent, which validated it when it started.
The defaults both read are here, once.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

from agent.core.errors import ConfigError

DEFAULT_STATE_DIR: Final = Path("/var/lib/libvirt-backup-agent")
DEFAULT_LISTEN: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8710

T = TypeVar("T")

# The keys of the two sections read here (the model's fields: tests/test_config_file.py
# holds them to it): a misspelt one is refused, as the full configuration refuses it.
SECTION_KEYS: Final = {
    "http": frozenset({"listen", "port", "token_file", "socket", "allowed_hosts"}),
    "agent": frozenset({"state_dir", "host_id", "recovery_timeout", "setpriv"}),
}


def read_text(path: Path) -> str:
    """The file's text; a ConfigError naming it if it cannot be read or is not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"{path}: cannot read configuration: {reason}", path=str(path)) from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: cannot read configuration: not valid UTF-8 (byte {exc.start})",
            path=str(path),
        ) from exc


def parse_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{path}: invalid TOML: {reason}", path=str(path)) from exc


class ApiEndpoint(NamedTuple):  # (not a dataclass: that import alone costs 10 ms)
    """Where the running agent's API is, and the token it wants (``[http]``)."""

    listen: str
    port: int
    socket: str
    """``[http] socket``: the Unix socket (no token), or ""."""
    token_path: Path
    """``[http] token_file``, or ``<state_dir>/api-token``."""


def api_endpoint(path: Path | None) -> ApiEndpoint:
    """``[http] listen, port, socket, token_file`` and ``[agent] state_dir`` of the file at
    ``path`` (None: the embedded defaults), checked as :mod:`agent.core.config` checks
    them; a ConfigError naming the file and key otherwise."""
    data = {} if path is None else parse_toml(path, read_text(path))
    http, agent = _section(data, "http", path), _section(data, "agent", path)
    listen = _key(http, "http", "listen", str, DEFAULT_LISTEN, path)
    if not listen:
        raise _bad(path, "http", "listen", "must not be empty", listen)
    port = _key(http, "http", "port", int, DEFAULT_PORT, path)
    if not 0 <= port <= 65535:
        raise _bad(path, "http", "port", "must be a whole number from 0 to 65535", port)
    socket = _path_key(http, "http", "socket", "", path)
    token_file = _path_key(http, "http", "token_file", "", path)
    state_dir = _path_key(agent, "agent", "state_dir", str(DEFAULT_STATE_DIR), path)
    if not state_dir:
        raise _bad(path, "agent", "state_dir", "must be an absolute path", state_dir)
    token = Path(token_file) if token_file else Path(state_dir) / "api-token"
    return ApiEndpoint(listen=listen, port=port, socket=socket, token_path=token)


def _section(data: dict[str, Any], name: str, path: Path | None) -> dict[str, Any]:
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [{name}] must be a table", path=str(path), key=name)
    for key in section:
        if key not in SECTION_KEYS[name]:
            raise ConfigError(
                f"{path}: [{name}] unknown key '{key}'", path=str(path), key=f"{name}.{key}"
            )
    return section


def _key(
    section: dict[str, Any], name: str, key: str, kind: type[T], default: T, path: Path | None
) -> T:
    value = section.get(key, default)
    if not isinstance(value, kind) or isinstance(value, bool):
        what = "a whole number" if kind is int else "a string"
        raise _bad(path, name, key, f"must be {what}", value)
    return value


def _path_key(section: dict[str, Any], name: str, key: str, default: str, path: Path | None) -> str:
    value = _key(section, name, key, str, default, path)
    if value and not Path(value).is_absolute():
        raise _bad(path, name, key, "must be an absolute path", value)
    return value


def _bad(path: Path | None, section: str, key: str, problem: str, value: object) -> ConfigError:
    return ConfigError(
        f"{path}: [{section}] {key}: {problem}, got {value!r}",
        path=str(path),
        key=f"{section}.{key}",
    )
