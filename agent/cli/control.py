"""The operator's commands that talk to the running agent's HTTP API.

``backup DOMAIN [--mode] [--wait]``, ``jobs``, ``cancel ID`` and ``status`` talk to the
agent on its Unix socket when ``[http] socket`` is set (its permissions are the access
control), else at ``[http] listen``/``port`` (a wildcard listen address is reached on
loopback) with the token the agent keeps in ``[http] token_file`` (by default
``<state_dir>/api-token``, which root can read: no configuration needed). A refused
connection says so in one line.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote, urlencode

import aiohttp

from agent.cli.progress import ProgressBar
from agent.control.credentials import read_token
from agent.core.config import AgentConfig
from agent.core.errors import AgentError

_TIMEOUT: Final = aiohttp.ClientTimeout(total=30)
_POLL: Final = 0.5


class AgentUnreachableError(AgentError):
    """The agent's API cannot be reached, or answered with an error."""


def base_url(config: AgentConfig) -> str:
    host = config.http.listen
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if config.http.port == 0:
        raise AgentUnreachableError("[http] port is 0 (a free port each start): set a port")
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.http.port}"


class ApiClient:
    def __init__(self, config: AgentConfig) -> None:
        self._socket = config.http.socket
        if self._socket:
            self._url, self._where = "http://localhost", f"unix:{self._socket}"
            self._headers: dict[str, str] = {}
        else:
            self._url = self._where = base_url(config)
            self._headers = {"Authorization": f"Bearer {read_token(config.token_path)}"}

    async def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        connector = aiohttp.UnixConnector(path=self._socket) if self._socket else None
        try:
            async with (
                aiohttp.ClientSession(
                    timeout=_TIMEOUT, headers=self._headers, connector=connector
                ) as session,
                session.request(method, self._url + path, json=body) as response,
            ):
                data = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AgentUnreachableError(
                f"cannot reach the agent at {self._where}: {exc or type(exc).__name__}; "
                "is `backup-agent run` running?"
            ) from exc
        except ValueError as exc:
            raise AgentUnreachableError(f"the agent at {self._where} sent no JSON") from exc
        if response.status >= 400:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            raise AgentUnreachableError(
                f"{error.get('code', response.status)}: {error.get('message', 'request failed')}"
            )
        return data


def backup(config: AgentConfig, domain: str, mode: str, wait: bool) -> int:
    return asyncio.run(_backup(ApiClient(config), domain, mode, wait))


async def _backup(client: ApiClient, domain: str, mode: str, wait: bool) -> int:
    job = await client.call("POST", "/v1/jobs", {"kind": "backup", "domain": domain, "mode": mode})
    print(f"job {job['id']}: backup of {domain} ({mode}) {job['state']}")
    if not wait:
        return 0
    with ProgressBar("backup", mib=True) as bar:
        while not _finished(job):
            await asyncio.sleep(_POLL)
            job = await client.call("GET", f"/v1/jobs/{quote(job['id'])}")
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
    config: AgentConfig, domain: str | None, state: str | None, as_json: bool, limit: int = 100
) -> int:
    asked = (("domain", domain), ("state", state), ("limit", str(limit)))
    query = urlencode({k: v for k, v in asked if v})
    data = asyncio.run(ApiClient(config).call("GET", f"/v1/jobs?{query}"))
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


def cancel(config: AgentConfig, job_id: str) -> int:
    job = asyncio.run(ApiClient(config).call("DELETE", f"/v1/jobs/{quote(job_id, safe='')}"))
    if job["state"] == "running":
        print(f"job {job_id}: cancellation requested; it undoes its work, then ends cancelled")
    else:
        print(describe(job))
    return 0


def status(config: AgentConfig, as_json: bool) -> int:
    client = ApiClient(config)

    async def read() -> tuple[Any, Any]:
        return await asyncio.gather(
            client.call("GET", "/v1/domains"), client.call("GET", "/v1/jobs?state=running")
        )

    domains, running = asyncio.run(read())
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
