"""The HTTP API (``/v1``), ``/metrics``, ``/healthz`` and ``/readyz``: where requests arrive.

JSON in and out. Every error, including unknown routes, wrong methods and oversized
bodies, is a JSON body ``{"error": {"code", "message", "field"?}}`` with a 4xx or 5xx
status. A request that is refused changes nothing: validation happens before the job
store is touched.

What every request must pass first (``Host``, token, media type): :mod:`agent.control.gate`.

The API runs inside the agent's event loop (aiohttp ``AppRunner``); every handler only
awaits non-blocking calls (the stores and the repository use worker threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from agent.backup.plan import partial
from agent.chain.checkpoints import Chains
from agent.chain.records import CheckpointRecord, DiskChain
from agent.control.credentials import ensure_token
from agent.control.gate import ApiError, Gate, Handler, RefusalLog, gate_middleware, tcp_gate
from agent.control.job_requests import (
    JOB_ID_RE,
    MAX_REQUEST_BYTES,
    JobState,
    parse_request,
)
from agent.control.jobs import Jobs
from agent.control.metrics import CONTENT_TYPE, Metrics, chain_length, domain_coverage
from agent.control.openapi import openapi_document
from agent.core.blocking import Filesystem
from agent.core.config import AgentConfig, BackupSection
from agent.core.errors import (
    AgentError,
    BackupNotFoundError,
    ConfigError,
    JobConflictError,
    JobError,
    JobNotFoundError,
    JobsClosedError,
    JobStoreError,
    LedgerError,
    RepositoryError,
    RequestError,
)
from agent.core.logs import get_logger
from agent.core.names import domain_name_problem
from agent.repository.manifest import Manifest
from agent.repository.store import Repository
from agent.virt.connection import ConnState, VirtConnection
from agent.virt.domains import Domains
from agent.virt.inventory import DomainInfo

log = get_logger("api")


_READY_TIMEOUT: Final = 5.0
_PAGE: Final = 100  # jobs per page of GET /v1/jobs, unless limit says
_MAX_PAGE: Final = 1000


@dataclass(frozen=True)
class ApiParts:
    """What the API reads and drives."""

    jobs: Jobs
    chains: Chains
    domains: Domains
    connection: VirtConnection
    repository: Repository
    metrics: Metrics
    backup: BackupSection  # its exclude: the disks left out on purpose
    # True or False while connected to NATS or not; None without a [nats] url.
    nats: Callable[[], bool | None] = lambda: None
    # Domains whose left-over jobs are not finished or undone yet: name -> why.
    recovering: Callable[[], Mapping[str, str]] = dict


_PARTS: Final = web.AppKey("parts", ApiParts)


def _error_response(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    headers = {"WWW-Authenticate": 'Bearer realm="backup-agent"'} if status == 401 else None
    return web.json_response({"error": body}, status=status, headers=headers)


def _status_of(exc: AgentError) -> int:
    table: list[tuple[type[AgentError], int]] = [
        (RequestError, 400),
        (JobNotFoundError, 404),
        (BackupNotFoundError, 404),
        (JobConflictError, 409),
        (JobsClosedError, 503),
        (JobStoreError, 503),
        (LedgerError, 503),
        (JobError, 400),
    ]
    for kind, status in table:
        if isinstance(exc, kind):
            return 413 if isinstance(exc, RequestError) and exc.code == "too-large" else status
    return 500


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _error_response(exc.status, exc.code, str(exc), exc.field)
    except AgentError as exc:
        code = getattr(exc, "code", None)
        field = exc.field if isinstance(exc, RequestError) else None
        status = _status_of(exc)
        if status >= 500:
            log.error("request failed", path=request.path, error=str(exc))
        return _error_response(status, code if isinstance(code, str) else "failed", str(exc), field)
    except web.HTTPRequestEntityTooLarge:
        return _error_response(
            413, "too-large", f"request body is larger than {MAX_REQUEST_BYTES} bytes"
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status, "http-error")
        return _error_response(exc.status, code, exc.reason)
    except Exception:
        log.exception("unexpected error in request", path=request.path)
        return _error_response(500, "internal-error", "internal error; see the agent's log")


# -- helpers --------------------------------------------------------------------------


def _parts(request: web.Request) -> ApiParts:
    return request.app[_PARTS]


def _only_params(request: web.Request, allowed: set[str]) -> None:
    for key in request.query:
        if key not in allowed:
            raise ApiError(400, "invalid-request", f"unknown query parameter {key!r}", key)


def _job_id(request: web.Request) -> str:
    job_id = request.match_info["job_id"]
    if not JOB_ID_RE.fullmatch(job_id):
        raise ApiError(400, "invalid-request", f"{job_id!r} is not a valid job id", "id")
    return job_id


def _domain_param(request: web.Request) -> str:
    name = request.match_info["domain"]
    problem = domain_name_problem(name)
    if problem is not None:
        raise ApiError(400, "invalid-request", f"domain {name!r}: {problem}", "domain")
    return name


# -- /v1/jobs -------------------------------------------------------------------------


async def _post_job(request: web.Request) -> web.Response:
    body = await request.read()
    job, created = await _parts(request).jobs.submit(parse_request(body), source="http")
    return web.json_response(job.to_json(), status=201 if created else 200)


async def _get_job(request: web.Request) -> web.Response:
    job = await _parts(request).jobs.get(_job_id(request))
    return web.json_response(job.to_json())


async def _list_jobs(request: web.Request) -> web.Response:
    """Newest first, a page of ``limit`` (default 100, at most 1000) older than the job
    ``before``; ``next``: the id to ask ``before`` for the next page (null: the last)."""
    _only_params(request, {"domain", "state", "limit", "before"})
    state = None
    if "state" in request.query:
        try:
            state = JobState(request.query["state"])
        except ValueError as exc:
            allowed = ", ".join(s.value for s in JobState)
            raise ApiError(
                400, "invalid-request", f"state must be one of {allowed}", "state"
            ) from exc
    limit = _page_size(request.query.get("limit"))
    before = request.query.get("before")
    if before is not None and not JOB_ID_RE.fullmatch(before):
        raise ApiError(400, "invalid-request", f"{before!r} is not a valid job id", "before")
    parts = _parts(request)
    if before is not None:  # (404 for a cursor whose job is gone: not an empty last page)
        await parts.jobs.get(before)
    names = None
    if "domain" in request.query:  # by name or UUID, whichever the jobs were submitted with
        asked = request.query["domain"]
        info = parts.domains.find(asked)
        names = sorted({asked, *((info.name, info.uuid) if info is not None else ())})
    jobs = await parts.jobs.find(domain=names, state=state, limit=limit + 1, before=before)
    page = jobs[:limit]
    return web.json_response(
        {
            "jobs": [job.to_json() for job in page],
            "next": page[-1].id if len(jobs) > limit else None,
        }
    )


def _page_size(given: str | None) -> int:
    if given is None:
        return _PAGE
    if not given.isdigit() or not 1 <= int(given) <= _MAX_PAGE:
        raise ApiError(
            400, "invalid-request", f"limit must be a whole number from 1 to {_MAX_PAGE}", "limit"
        )
    return int(given)


async def _cancel_job(request: web.Request) -> web.Response:
    job = await _parts(request).jobs.cancel(_job_id(request))
    # A running job is still undoing its work: accepted, not done.
    return web.json_response(job.to_json(), status=202 if not job.state.finished else 200)


# -- /v1/domains ------------------------------------------------------------------------


async def _domains(request: web.Request) -> web.Response:
    parts = _parts(request)
    live = {info.name: info for info in parts.domains.all().values()}
    names = sorted(set(live) | set(await parts.chains.ledger.domains()))
    result = []
    for name in names:
        info = live.get(name)
        chains = await parts.chains.ledger.disk_chains(name)
        backups, problem = await _backups_of(parts.repository, name)
        latest = backups[-1] if backups else None
        result.append(
            {
                "name": name,
                "uuid": info.uuid if info else None,
                "state": info.state.name.lower() if info else "undefined",
                **_disks_json(info, chains, parts.backup),
                "last_backup": None
                if latest is None
                else {
                    "id": latest.backup_id,
                    "completed_at": latest.completed_at,
                    "mode": latest.mode,
                },
                "backups": len(backups),
                "chain_length": chain_length(backups),
                "repository_problem": problem,
            }
        )
    return web.json_response({"domains": result})


def _disks_json(
    info: DomainInfo | None, chains: Mapping[str, DiskChain], backup: BackupSection
) -> dict[str, Any]:
    """``disks``: every disk of the live domain in its order (``backup``: incremental,
    full or excluded, ``backup_reason`` why), each with its chain in the ledger (null
    without one), then the ledger's disks the domain no longer has (``backup`` null);
    ``not_backed_up``: the disks left out, and why; ``partial_disks``: those of them the
    guest writes and configuration did not leave out (``partial``: there is one).
    Without a live domain: the ledger's disks, and the others null (unknown)."""

    def entry(target: str, how: str | None, why: str | None) -> dict[str, Any]:
        chain = chains.get(target)
        return {
            "target": target,
            "chain_valid": chain.valid if chain is not None else None,
            "reason": chain.reason if chain is not None else None,
            "detail": chain.detail if chain is not None else None,
            "backup": how,
            "backup_reason": why,
        }

    coverage = domain_coverage(info, backup) if info is not None else ()
    disks = [entry(c.target, c.how, c.reason) for c in coverage]
    attached = {c.target for c in coverage}
    disks += [entry(t, None, None) for t in sorted(chains) if t not in attached]
    if info is None:
        return {"disks": disks, "partial": None, "partial_disks": None, "not_backed_up": None}
    return {
        "disks": disks,
        "partial": partial(coverage),
        "partial_disks": [c.target for c in coverage if c.silent],
        "not_backed_up": [
            {"target": c.target, "reason": c.reason} for c in coverage if c.how == "excluded"
        ],
    }


async def _backups_of(repository: Repository, name: str) -> tuple[list[Manifest], str | None]:
    """The domain's readable backups, and what is wrong in the repository (damaged
    backups, or the directory unreadable): one bad file must not hide the host."""
    try:
        listing = await repository.listing(name)
    except RepositoryError as exc:
        return [], str(exc)
    if not listing.damaged:
        return list(listing.manifests), None
    first = listing.damaged[0]
    problem = f"{len(listing.damaged)} damaged; first {first.backup_id}: {first.error}"
    return list(listing.manifests), problem


def _checkpoint_json(record: CheckpointRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "parent": record.parent,
        "created_at": record.created_at,
        "state": record.state.value,
        "backed_up_at": record.backed_up_at,
        "domain_uuid": record.domain_uuid,
        "disks": [{"target": d.target, "bitmap": d.bitmap} for d in record.disks],
    }


async def _checkpoints(request: web.Request) -> web.Response:
    parts = _parts(request)
    name = parts.domains.name_of(_domain_param(request))
    records = await parts.chains.ledger.checkpoints(name)
    if not records and not await _known(parts, name):
        raise ApiError(404, "domain-not-found", f"no domain {name!r} here or in the ledger")
    return web.json_response(
        {"domain": name, "checkpoints": [_checkpoint_json(r) for r in records]}
    )


async def _backups(request: web.Request) -> web.Response:
    parts = _parts(request)
    name = parts.domains.name_of(_domain_param(request))
    listing = await parts.repository.listing(name)
    if not listing.manifests and not listing.damaged and not await _known(parts, name):
        raise ApiError(
            404, "domain-not-found", f"no domain {name!r} here, in the ledger or in the repository"
        )
    return web.json_response(
        {
            "domain": name,
            "backups": [m.summary() for m in listing.manifests],
            "damaged": [d.to_json() for d in listing.damaged],
        }
    )


async def _known(parts: ApiParts, name: str) -> bool:
    if name in {i.name for i in parts.domains.all().values()}:
        return True
    return name in await parts.chains.ledger.domains()


# -- operations -----------------------------------------------------------------------


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def _metrics(request: web.Request) -> web.Response:
    body = _parts(request).metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"alive": True})


async def _readyz(request: web.Request) -> web.Response:
    parts = _parts(request)
    checks: dict[str, str] = {}
    checks["libvirt"] = "ok" if parts.connection.state is ConnState.CONNECTED else "disconnected"
    checks["jobs"] = "ok" if parts.jobs.accepting else "not taking jobs"
    try:
        await parts.jobs.store.probe()
        checks["state_store"] = "ok"
    except AgentError as exc:
        checks["state_store"] = str(exc)
    checks["repository"] = await _writable(parts.repository)
    ready = all(v == "ok" for v in checks.values())
    body: dict[str, Any] = {"ready": ready, "checks": checks}
    # Said, not checked: jobs of every other domain run meanwhile, and a job of a domain
    # still recovering finishes that domain's recovery first.
    body["recovering"] = dict(sorted(parts.recovering().items()))
    # Said, not checked: the API and local schedules take jobs without NATS, and
    # JetStream keeps the scheduler's requests until the agent is back.
    nats = parts.nats()
    if nats is not None:
        body["nats"] = "connected" if nats else "disconnected"
    return web.json_response(body, status=200 if ready else 503)


async def _writable(repository: Repository) -> str:
    """``"ok"`` if the repository answers, holds the repository this agent uses and a
    file can be written in it, else what is wrong. A missing directory is never made
    here (an unmounted repository's bare mount point must not become one): before the
    first backup it is fine (that backup initialises it), once this agent records a
    repository id the marker check says "is it mounted?". The probe runs on the
    repository's own threads, single-flight: however many probes arrive while the
    filesystem hangs, one thread waits on it (:mod:`agent.core.blocking`)."""
    directory = repository.root

    def probe() -> None:
        if directory.is_dir():
            path = directory / f".readyz-{os.getpid()}"
            path.write_bytes(b"ok")
            path.unlink()

    try:
        # First whether it is the repository this agent uses (a stat and two small reads;
        # "is it mounted?" if the marker is not there): never write into a bare mount
        # point or another repository. Then a real write.
        await repository.check_marker()
        await Filesystem(directory, timeout=_READY_TIMEOUT).probe(
            "readyz", probe, timeout=_READY_TIMEOUT
        )
    except RepositoryError as exc:  # FilesystemHungError, RepositoryMarkerError
        return str(exc)
    except OSError as exc:
        return f"{directory}: {exc.strerror or exc}"
    return "ok"


def make_app(parts: ApiParts, gate: Gate) -> web.Application:
    refusals = RefusalLog()
    app = web.Application(
        middlewares=[_errors, gate_middleware(gate, refusals)], client_max_size=MAX_REQUEST_BYTES
    )
    app[_PARTS] = parts

    async def flush_refusals(_: web.Application) -> None:
        refusals.flush()  # what the last minute refused, counted before the agent stops

    app.on_cleanup.append(flush_refusals)
    app.router.add_post("/v1/jobs", _post_job)
    app.router.add_get("/v1/jobs", _list_jobs)
    app.router.add_get("/v1/jobs/{job_id}", _get_job)
    app.router.add_delete("/v1/jobs/{job_id}", _cancel_job)
    app.router.add_get("/v1/domains", _domains)
    app.router.add_get("/v1/domains/{domain}/checkpoints", _checkpoints)
    app.router.add_get("/v1/domains/{domain}/backups", _backups)
    app.router.add_get("/v1/openapi.json", _openapi)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


@contextlib.asynccontextmanager
async def serving(parts: ApiParts, config: AgentConfig) -> AsyncIterator[list[str]]:
    """The API listening on ``[http] listen``/``port`` (and ``socket``) inside the block;
    yields its URLs. The token is made on the first start (:mod:`agent.control.credentials`)."""
    settings = config.http
    # The default file (also when named explicitly, as `config` shows it) is made here.
    default = config.agent.state_dir / "api-token"
    token = await asyncio.to_thread(
        ensure_token, config.token_path, made_here=config.token_path == default
    )
    runners = [_runner(parts, tcp_gate(config, token))]
    if settings.socket:
        runners.append(_runner(parts, Gate(token=None, hosts=None)))
    try:
        for runner in runners:
            await runner.setup()
        site = web.TCPSite(runners[0], settings.listen, settings.port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"[http] cannot listen on {settings.listen}:{settings.port}: {exc.strerror}",
                key="http.port",
            ) from exc
        urls = [_url(address) for address in runners[0].addresses]
        if settings.socket:
            await _start_unix(runners[1], Path(settings.socket))
            urls.append(f"unix:{settings.socket}")
        log.info("API listening", urls=urls)
        yield urls
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def _runner(parts: ApiParts, gate: Gate) -> web.AppRunner:
    return web.AppRunner(
        make_app(parts, gate), access_log=None, handle_signals=False, shutdown_timeout=5.0
    )


async def _start_unix(runner: web.AppRunner, path: Path) -> None:
    """The Unix socket listener, mode 0600 (and made under the agent's umask 077), so
    only its owner (root) connects. Its directory must be one that only root may write
    in (else another user could put their own socket there first). A stale socket of an
    earlier agent is replaced; a live one (another agent answers on it), or anything
    else in its place, is an error."""
    await asyncio.to_thread(_clear_socket_path, path)
    try:
        await web.UnixSite(runner, str(path)).start()
        await asyncio.to_thread(os.chmod, path, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"[http] socket {path}: cannot listen there: {exc.strerror or exc}", key="http.socket"
        ) from exc


def _clear_socket_path(path: Path) -> None:
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"[http] socket {path}: {why}", key="http.socket")

    try:
        parent = path.parent.stat()
    except OSError as exc:
        raise refuse(f"its directory cannot be used: {exc.strerror or exc}") from exc
    if parent.st_uid not in (0, os.geteuid()) or parent.st_mode & 0o022:
        raise refuse(
            f"its directory {path.parent} may be written by other users (owner uid "
            f"{parent.st_uid}, mode {stat.S_IMODE(parent.st_mode):04o}): choose one only "
            "root may write in"
        )
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise refuse("something that is not a socket is there")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens: an earlier agent's, left behind
        return
    finally:
        probe.close()
    raise refuse("another process listens on it (another agent?)")


def _url(address: Any) -> str:
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
