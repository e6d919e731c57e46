"""What every request must pass before a handler sees it.

In this order:

1. ``Host`` names the address the request arrived on, the listen address, a loopback
   name or one of ``[http] allowed_hosts`` (400 ``host-not-allowed``): a web page that
   a browser on the host opens cannot reach the API through a DNS name of its own
   (DNS rebinding).
2. Every ``/v1`` route needs ``Authorization: Bearer <token>``, compared in constant
   time (401); ``/metrics``, ``/healthz`` and ``/readyz`` stay open. Refusals are
   logged at most once a minute, with their count.
3. A ``/v1`` body is ``application/json`` (415): a browser sends ``text/plain`` and
   form bodies without asking first (no CORS preflight). No CORS header is ever sent.

On the optional Unix socket (``[http] socket``, mode 0600) the file's permissions are
the access control: no token and no ``Host`` check, the media type still.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from agent.core.config import AgentConfig
from agent.core.logs import get_logger

log = get_logger("api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PUBLIC: Final = frozenset({"/metrics", "/healthz", "/readyz"})
_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
_JSON: Final = "application/json"
_REFUSALS_LOGGED_EVERY: Final = 60.0  # seconds


class ApiError(Exception):
    """An error response: ``status`` and the JSON error body."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field


@dataclass(frozen=True)
class Gate:
    """What requests to one listener must present: ``token`` (None: none, on the Unix
    socket) and a ``Host`` among ``hosts`` or a loopback name (None: any)."""

    token: str | None
    hosts: frozenset[str] | None


class RefusalLog:
    """Refused requests, logged without flooding: the first at once, then at most one
    line per minute, with how many were refused since the last line by reason and by
    remote address (``refused_since_last_line``, ``reasons``, ``remotes``: the ten
    commonest); what is still uncounted is logged by :meth:`flush` (at shutdown)."""

    def __init__(self, every: float = _REFUSALS_LOGGED_EVERY) -> None:
        self._every = every
        self._last = -every
        self._reasons: Counter[str] = Counter()
        self._remotes: Counter[str] = Counter()

    def refused(self, why: str, request: web.Request) -> None:
        self._reasons[why] += 1
        self._remotes[request.remote or "?"] += 1
        now = time.monotonic()
        if now - self._last >= self._every:
            self._line(why=why, path=request.path, remote=request.remote)
            self._last = now

    def flush(self) -> None:
        if self._reasons:
            self._line()

    def _line(self, **latest: str | None) -> None:
        log.warning(
            "API request refused",
            **latest,
            refused_since_last_line=sum(self._reasons.values()),
            reasons=dict(self._reasons.most_common(10)),
            remotes=dict(self._remotes.most_common(10)),
        )
        self._reasons.clear()
        self._remotes.clear()


_HOST: Final = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9.-]+))(?::\d{1,5})?")


def _host_name(header: str) -> str | None:
    """The name in a ``Host`` header (``name``, ``a.b.c.d``, ``[v6]``, each with an
    optional ``:port``), lower case, an IP address in its normal form; None if the
    header is anything else."""
    found = _HOST.fullmatch(header)
    if found is None:
        return None
    return normal(found["v6"] or found["name"])


def normal(name: str) -> str:
    """A host name lower case, an IP address as :mod:`ipaddress` writes it."""
    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return name.lower()


def _loopback(name: str) -> bool:
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _arrived_on(request: web.Request) -> str | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and sockname and isinstance(sockname[0], str):
        return normal(sockname[0])
    return None


def gate_middleware(gate: Gate, refusals: RefusalLog) -> Middleware:
    """The middleware that lets through only what passes ``gate``, logging refusals in
    ``refusals``."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        _check(gate, refusals, request)
        return await handler(request)

    return check


def _check(gate: Gate, refusals: RefusalLog, request: web.Request) -> None:
    if gate.hosts is not None:
        name = _host_name(request.headers.get("Host", ""))
        allowed = name is not None and (
            _loopback(name) or name in gate.hosts or name == _arrived_on(request)
        )
        if not allowed:
            refusals.refused("host-not-allowed", request)
            shown = request.headers.get("Host", "")[:100] or "(none)"
            raise ApiError(
                400,
                "host-not-allowed",
                f"Host {shown!r} is not a name of this agent (add it to [http] allowed_hosts)",
            )
    if gate.token is not None and request.path not in PUBLIC:
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(errors="surrogatepass"), gate.token.encode()
        ):
            reason = "missing bearer token" if not given else "wrong bearer token"
            refusals.refused(reason, request)
            raise ApiError(401, "unauthorized", reason)
    with_body = request.method in ("POST", "PUT", "PATCH")
    if with_body and request.path.startswith("/v1/") and request.content_type != _JSON:
        raise ApiError(
            415, "unsupported-media-type", f"the body must be {_JSON}, not {request.content_type}"
        )


def tcp_gate(config: AgentConfig, token: str) -> Gate:
    """The TCP listener's gate: the token, and the names ``Host`` may give."""
    hosts = {normal(name) for name in config.http.allowed_hosts}
    if config.http.listen not in ("0.0.0.0", "::"):
        hosts.add(normal(config.http.listen))
    return Gate(token=token, hosts=frozenset(hosts))
