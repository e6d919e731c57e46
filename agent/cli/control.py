"""The operator's commands that talk to the running agent's HTTP API.

``backup DOMAIN [--mode] [--wait]``, ``jobs``, ``cancel ID`` and ``status`` talk to the
agent on its Unix socket when ``[http] socket`` is set (its permissions are the access
control), else at ``[http] listen``/``port`` (a wildcard listen address is reached on
loopback) with the token the agent keeps in ``[http] token_file`` (by default
``<state_dir>/api-token``, which root can read: no configuration needed). A refused
connection says so in one line.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote, urlencode

from agent.control.credentials import read_token
from agent.core.config_file import ApiEndpoint
from agent.core.errors import AgentError

# No aiohttp, no asyncio, and not even http.client (whose import, with the email and
# ssl modules it pulls in, is some 60 ms of these verbs' 150 ms): one request per
# connection to the agent's own API, HTTP/1.1 with "Connection: close", is all they
# need (see _exchange).
_TIMEOUT: Final = 30.0
"""Seconds a whole request may take (connect, send, the answer to its end)."""
_MAX_RESPONSE: Final = 64 << 20
_POLL: Final = 0.5


class AgentUnreachableError(AgentError):
    """The agent's API cannot be reached, or answered with an error."""


class _ProtocolError(OSError):
    """What came back is not an HTTP/1.1 response."""


def base_url(endpoint: ApiEndpoint) -> str:
    host, port = _host(endpoint)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _host(endpoint: ApiEndpoint) -> tuple[str, int]:
    """Where to connect: a wildcard listen address is reached on loopback."""
    host = endpoint.listen
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if endpoint.port == 0:
        raise AgentUnreachableError("[http] port is 0 (a free port each start): set a port")
    return host, endpoint.port


class ApiClient:
    def __init__(self, endpoint: ApiEndpoint) -> None:
        self._socket = endpoint.socket
        self._headers = {"Accept": "application/json"}
        if self._socket:
            self._where, self._host_header = f"unix:{self._socket}", "localhost"
        else:
            self._host, self._port = _host(endpoint)
            self._where = base_url(endpoint)
            self._host_header = self._where.removeprefix("http://")
            self._headers["Authorization"] = f"Bearer {read_token(endpoint.token_path)}"

    def _connect(self, timeout: float) -> socket.socket:
        if self._socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(self._socket)
            except BaseException:
                sock.close()
                raise
            return sock
        return socket.create_connection((self._host, self._port), timeout=timeout)

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        headers = dict(self._headers)
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            status, raw = self._exchange(method, path, headers, payload)
        except (OSError, ValueError) as exc:  # (ValueError: an address refused, e.g. " ")
            raise AgentUnreachableError(
                f"cannot reach the agent at {self._where}: {exc or type(exc).__name__}; "
                "is `backup-agent run` running?"
            ) from exc
        try:
            data = json.loads(raw)
        except ValueError as exc:
            snippet = raw[:200].decode(errors="replace").strip()
            raise AgentUnreachableError(
                f"the agent at {self._where} answered {status} without JSON "
                f"(is it the agent?): {snippet!r}"
            ) from exc
        if status >= 400:
            error = data.get("error") if isinstance(data, dict) else None
            error = error if isinstance(error, dict) else {}
            raise AgentUnreachableError(
                f"{error.get('code', status)}: {error.get('message', 'request failed')}"
            )
        return data

    def _exchange(
        self, method: str, path: str, headers: Mapping[str, str], payload: bytes | None
    ) -> tuple[int, bytes]:
        """One request on a connection of its own: the status and the body."""
        deadline = time.monotonic() + _TIMEOUT
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host_header}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"Content-Length: {len(payload or b'')}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (payload or b"")
        received = bytearray()
        with self._connect(_TIMEOUT) as sock:
            sock.sendall(request)
            while chunk := sock.recv(1 << 16):
                received += chunk
                if len(received) > _MAX_RESPONSE:
                    raise _ProtocolError(f"an answer over {_MAX_RESPONSE >> 20} MiB")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no whole answer within {_TIMEOUT:g} s")
                sock.settimeout(remaining)
        return _parse_response(bytes(received))


def _parse_response(data: bytes) -> tuple[int, bytes]:
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        raise _ProtocolError("the connection closed before a whole answer")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise _ProtocolError(f"not an HTTP answer: {status_line[:80]!r}")
    fields = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if fields.get("transfer-encoding", "").lower() == "chunked":
        body = _unchunked(body)
    elif "content-length" in fields:
        length = int(fields["content-length"])
        if len(body) < length:
            raise _ProtocolError("the connection closed before the whole body")
        body = body[:length]
    return int(code), body


def _unchunked(body: bytes) -> bytes:
    out, position = bytearray(), 0
    while True:
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            raise _ProtocolError("a chunked body cut short")
        size = int(body[position:line_end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        start = line_end + 2
        if len(body) < start + size:
            raise _ProtocolError("a chunked body cut short")
        out += body[start : start + size]
        position = start + size + 2


def backup(endpoint: ApiEndpoint, domain: str, mode: str, wait: bool) -> int:
    client = ApiClient(endpoint)
    job = client.call("POST", "/v1/jobs", {"kind": "backup", "domain": domain, "mode": mode})
    print(f"job {job['id']}: backup of {domain} ({mode}) {job['state']}")
    if not wait:
        return 0
    from agent.cli.progress import ProgressBar  # noqa: PLC0415 - rich, only to wait

    with ProgressBar("backup", mib=True) as bar:
        while not _finished(job):
            time.sleep(_POLL)
            job = client.call("GET", f"/v1/jobs/{quote(job['id'])}")
            bar.update(job["progress"]["done_bytes"], job["progress"]["total_bytes"])
    print(describe(job))
    return 0 if job["state"] == "succeeded" else 1


def _finished(job: Mapping[str, Any]) -> bool:
    return job["state"] in ("succeeded", "failed", "cancelled")


def describe(job: Mapping[str, Any]) -> str:
    """One line: how a job ended (or where it is)."""
    text = f"job {job['id']} {job['state']}"
    if job.get("backup_id"):
        text += f": backup {job['backup_id']}"
    disks = job.get("disks") or []
    if disks:
        text += (
            " ("
            + ", ".join(
                f"{d['target']} {d['mode']}" + (f" [{d['reason']}]" if d.get("reason") else "")
                for d in disks
            )
            + ")"
        )
    if job.get("error"):
        text += f": {job['error']['code']}: {job['error']['message']}"
    return text


def jobs(
    endpoint: ApiEndpoint, domain: str | None, state: str | None, as_json: bool, limit: int = 100
) -> int:
    asked = (("domain", domain), ("state", state), ("limit", str(limit)))
    query = urlencode({k: v for k, v in asked if v})
    data = ApiClient(endpoint).call("GET", f"/v1/jobs?{query}")
    if as_json:
        print(json.dumps(data["jobs"], indent=2))
        return 0
    rows = [["JOB", "KIND", "DOMAIN", "STATE", "CREATED", "RESULT"]]
    for job in data["jobs"]:
        result = job.get("backup_id") or ""
        if job.get("error"):
            result = job["error"]["code"]
        elif job["state"] == "running" and job["progress"]["total_bytes"]:
            result = f"{job['progress']['done_bytes'] / job['progress']['total_bytes']:.0%}"
        rows.append(
            [job["id"], job["kind"], job["domain"], job["state"], job["created_at"][:19], result]
        )
    _table(rows)
    return 0


def cancel(endpoint: ApiEndpoint, job_id: str) -> int:
    job = ApiClient(endpoint).call("DELETE", f"/v1/jobs/{quote(job_id, safe='')}")
    if job["state"] == "running":
        print(f"job {job_id}: cancellation requested; it undoes its work, then ends cancelled")
    else:
        print(describe(job))
    return 0


def status(endpoint: ApiEndpoint, as_json: bool) -> int:
    client = ApiClient(endpoint)
    domains = client.call("GET", "/v1/domains")
    running = client.call("GET", "/v1/jobs?state=running")
    if as_json:
        print(json.dumps({"domains": domains["domains"], "running": running["jobs"]}, indent=2))
        return 0
    _table(status_rows(domains["domains"]))
    print()
    if running["jobs"]:
        _table(
            [["RUNNING JOB", "KIND", "DOMAIN", "PROGRESS"]]
            + [
                [
                    j["id"],
                    j["kind"],
                    j["domain"],
                    f"{j['progress']['done_bytes'] >> 20}/{j['progress']['total_bytes'] >> 20} MiB",
                ]
                for j in running["jobs"]
            ]
        )
    else:
        print("no jobs running")
    return 0


def status_rows(domains: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """The table of ``status``, from ``GET /v1/domains``: CHAIN says ``broken`` with the
    disks whose chain is, and ``partial`` with the disks that are in no backup though the
    guest writes them, else ``ok`` (``-`` without a chain); DISKS how each disk of the
    domain is backed up (``vda:incremental,vdb:full,sdc:excluded``)."""
    rows = [["DOMAIN", "STATE", "CHAIN", "DISKS", "LAST BACKUP", "MODE", "BACKUPS"]]
    for d in domains:
        disks = d["disks"]
        broken = [f"{x['target']}:{x['reason']}" for x in disks if x["chain_valid"] is False]
        why = {x["target"]: x["reason"] for x in d.get("not_backed_up") or ()}
        silent = [f"{t}:{why.get(t, 'excluded')}" for t in d.get("partial_disks") or ()]
        said = [
            f"{what} {','.join(which)}"
            for what, which in (("broken", broken), ("partial", silent))
            if which
        ]
        chained = any(x["chain_valid"] is not None for x in disks)
        chain = " ".join(said) or ("ok" if chained else "-")
        how = ",".join(f"{x['target']}:{x['backup']}" for x in disks if x.get("backup")) or "-"
        last = d["last_backup"]
        when = _when(last["completed_at"]) if last else "never"
        rows.append(
            [
                d["name"],
                d["state"],
                chain,
                how,
                when,
                last["mode"] if last else "-",
                str(d["backups"]),
            ]
        )
    return rows


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
