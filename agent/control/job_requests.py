"""Jobs as data: what a caller may ask for, and what the agent reports back.

A job request arrives as JSON from the HTTP API (``POST /v1/jobs``), from the central
scheduler over NATS (the same body) or from a local schedule. :func:`parse_request`
is the one gate all three pass: unknown fields, wrong types, oversized values and names
that could escape the repository are refused with a :class:`~agent.core.errors.RequestError`
naming the field, before anything is stored.

:class:`Job` is the stored state of one job; :meth:`Job.to_json` is what the API returns
and what the job events carry.
"""

from __future__ import annotations

import enum
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Annotated, Any, Final, Literal, Protocol

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from agent.core.errors import RequestError
from agent.core.names import domain_name_problem

#: Bodies larger than this are refused before they are parsed.
MAX_REQUEST_BYTES: Final = 16 * 1024

JOB_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_BACKUP_ID_RE: Final = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")
_TARGET_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
_FILE_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,254}")


class JobKind(enum.StrEnum):
    BACKUP = "backup"
    RESTORE = "restore"
    VERIFY = "verify"
    RECONCILE = "reconcile"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def _domain_name(value: str) -> str:
    problem = domain_name_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _rfc3339(value: object) -> object:
    # JSON carries times as strings; a bare number would be read as Unix time, unasked.
    if value is not None and not isinstance(value, str | datetime):
        raise ValueError("expected an RFC 3339 time as a string, e.g. 2026-11-28T06:00:00+00:00")
    return value


def _pattern(regex: re.Pattern[str], what: str) -> AfterValidator:
    def check(value: str) -> str:
        if not regex.fullmatch(value):
            raise ValueError(f"not a valid {what}")
        return value

    return AfterValidator(check)


DomainName = Annotated[str, AfterValidator(_domain_name)]
JobId = Annotated[str, _pattern(JOB_ID_RE, "job id (letters, digits, _ . : -; up to 128)")]
BackupId = Annotated[str, _pattern(_BACKUP_ID_RE, "backup id (like 20261128T101500Z-1a2b3c)")]
DiskTarget = Annotated[str, _pattern(_TARGET_RE, "disk target (like vda)")]
FileName = Annotated[str, _pattern(_FILE_NAME_RE, "file name (no '/', not starting with '.')")]


class JobRequest(BaseModel):
    """The body of ``POST /v1/jobs`` and of a NATS job request."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: JobId | None = Field(
        default=None,
        description="Caller's id: submitting the same id again returns the same job. "
        "Generated when absent.",
    )
    kind: Literal["backup", "restore", "verify", "reconcile"] = Field(description="What to do.")
    domain: DomainName = Field(description="Domain name or UUID.")
    mode: Literal["auto", "full", "incremental"] | None = Field(
        default=None, description="Backups only: auto (default), full or incremental."
    )
    keep_last: int | None = Field(
        default=None,
        ge=0,
        le=100000,
        description="Backups only: backups kept for this domain afterwards; "
        "default: the domain's [retention.domains] entry, else [retention] keep_last.",
    )
    backup: BackupId | None = Field(
        default=None,
        description="Restore: the backup to restore (required). Verify: one backup; "
        "default every backup of the domain.",
    )
    disk: DiskTarget | None = Field(
        default=None, description="Restore only: one disk (default every disk)."
    )
    to: FileName | None = Field(
        default=None,
        description="Restore only: name of the file (with 'disk') or of the directory, "
        "holding <target>.<format> for every disk (without), created inside [jobs] "
        "restore_dir (required).",
    )
    format: Literal["qcow2", "raw"] | None = Field(
        default=None, description="Restore only: image format (default qcow2)."
    )
    define: bool | None = Field(
        default=None,
        description="Restore only: the whole VM: every disk restored (into the directory "
        "'to', default restore_dir itself, as <name>-<target>.<format>) and the domain "
        "defined from the definition recorded with the backup.",
    )
    name: DomainName | None = Field(
        default=None,
        description="Restore with define: the domain's new name (a new UUID and new MAC "
        "addresses, to run beside the original); default its own.",
    )
    start: bool | None = Field(
        default=None, description="Restore with define: start the domain once defined."
    )
    deadline: Annotated[datetime | None, BeforeValidator(_rfc3339)] = Field(
        default=None,
        # strict mode would refuse the RFC 3339 strings JSON carries
        strict=False,
        description="RFC 3339 time with offset: a job still queued then is dropped.",
    )

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> JobRequest:
        allowed = _KIND_FIELDS[self.kind]
        for name in _KIND_ONLY:
            if getattr(self, name) is not None and name not in allowed:
                raise RequestError(f"'{name}' does not apply to {self.kind} jobs", field=name)
        if self.kind == "restore":
            for name in ("backup",) if self.define else ("backup", "to"):
                if getattr(self, name) is None:
                    raise RequestError(f"restore jobs need '{name}'", field=name)
            for name in ("name", "start"):
                if getattr(self, name) is not None and not self.define:
                    raise RequestError(f"'{name}' goes with \"define\": true", field=name)
            if self.define and self.disk is not None:
                raise RequestError("a restore with define restores every disk", field="disk")
        if self.deadline is not None and self.deadline.tzinfo is None:
            raise RequestError("deadline needs a time zone offset", field="deadline")
        return self

    def fingerprint(self) -> str:
        """The request without its id, defaults spelled out: the same id must come with
        the same request (``"mode": "auto"`` and no mode are the same request)."""
        data = self.model_dump(mode="json", exclude={"id"})
        defaults = {"backup": {"mode": "auto"}, "restore": {"format": "qcow2"}}
        for key, value in defaults.get(self.kind, {}).items():
            if data[key] is None:
                data[key] = value
        for key in ("define", "name", "start"):  # (newer fields: absent, or false, is as before)
            if data[key] in (None, False):
                del data[key]
        return json.dumps(data, sort_keys=True)


_KIND_ONLY: Final = (
    "mode",
    "keep_last",
    "backup",
    "disk",
    "to",
    "format",
    "define",
    "name",
    "start",
)
_KIND_FIELDS: Final = {
    "backup": {"mode", "keep_last"},
    "restore": {"backup", "disk", "to", "format", "define", "name", "start"},
    "verify": {"backup"},
    "reconcile": set(),
}


def parse_request(body: bytes | str | Mapping[str, Any]) -> JobRequest:
    """Validate a job request (raw JSON or already decoded); RequestError names the field."""
    if isinstance(body, bytes | str):
        if len(body) > MAX_REQUEST_BYTES:
            raise RequestError(
                f"request body is larger than {MAX_REQUEST_BYTES} bytes", code="too-large"
            )
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise RequestError(f"request body is not JSON: {exc}") from exc
    else:
        data = body
    if not isinstance(data, dict):
        raise RequestError("request body must be a JSON object")
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) if first["loc"] else None
        message = first["msg"]
        if first["type"] == "value_error":
            message = str(first.get("ctx", {}).get("error", message))
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        raise RequestError(f"{where or 'body'}: {message}", field=where) from exc


def new_job_id() -> str:
    return "job-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


DISK_EXCLUDED: Final = "excluded"  # the mode of a disk a backup left out


@dataclass(frozen=True, slots=True)
class JobDisk:
    """How one disk was backed up: ``mode`` full/incremental and, for full, why; or
    ``excluded`` (:data:`DISK_EXCLUDED`: in no backup, nothing copied) and why."""

    target: str
    mode: str
    reason: str | None
    bytes_copied: int = 0


@dataclass(frozen=True, slots=True)
class Job:
    """One job's stored state."""

    id: str
    request: JobRequest
    state: JobState
    source: str  # "http", "nats", "schedule", "cli"
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress_done: int = 0
    progress_total: int = 0
    backup_id: str | None = None
    disks: tuple[JobDisk, ...] = ()
    error_code: str | None = None
    error_message: str | None = None
    result: Mapping[str, Any] = field(default_factory=dict)  # per kind: problems, files

    @property
    def kind(self) -> JobKind:
        return JobKind(self.request.kind)

    @property
    def domain(self) -> str:
        return self.request.domain

    def with_state(self, state: JobState, now: float, **changes: Any) -> Job:
        if state is JobState.RUNNING:
            changes.setdefault("started_at", now)
        elif state.finished:
            changes.setdefault("finished_at", now)
        return replace(self, state=state, **changes)

    def to_json(self) -> dict[str, Any]:
        """The job as the API and the job events show it."""
        request = self.request.model_dump(mode="json", exclude={"id"}, exclude_none=True)
        return {
            "id": self.id,
            "kind": self.request.kind,
            "domain": self.domain,
            "state": self.state.value,
            "source": self.source,
            "request": request,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "progress": {"done_bytes": self.progress_done, "total_bytes": self.progress_total},
            "backup_id": self.backup_id,
            "disks": [
                {
                    "target": d.target,
                    "mode": d.mode,
                    "reason": d.reason,
                    "bytes_copied": d.bytes_copied,
                }
                for d in self.disks
            ],
            "error": (
                None
                if self.error_code is None
                else {"code": self.error_code, "message": self.error_message or ""}
            ),
            "result": dict(self.result),
        }


def _iso(value: float | None) -> str | None:
    if value is None:
        return None
    return datetime.fromtimestamp(value).astimezone().isoformat(timespec="milliseconds")


JobListener = Callable[[Job], None]


class JobSink(Protocol):
    """Where job requests go (:class:`agent.control.jobs.Jobs`), as NATS and schedules see it."""

    async def submit(self, request: JobRequest, *, source: str) -> tuple[Job, bool]:
        """Record the job (durably) and queue it; ``(job, created)``. An id seen before
        returns that job with ``created`` False; with a different request it raises
        JobConflictError. Raises JobsClosedError while the agent is stopping."""
        ...

    def subscribe(self, listener: JobListener) -> Callable[[], None]:
        """Call ``listener`` (on the loop thread) with the job after each state change
        (queued, running, succeeded, failed, cancelled); returns the unsubscribe call.
        A finished job is passed on only after its end is in the outbox (if the store
        could record it)."""
        ...

    async def unpublished_ends(self, limit: int) -> list[Job]:
        """The outbox: up to ``limit`` finished jobs whose end is not published yet,
        oldest first, including ends recorded before this process started (a job the
        restart ended as ``agent-restarted``). Raises JobStoreError if unreadable."""
        ...

    async def end_published(self, job_id: str) -> None:
        """The end of ``job_id`` was published and acknowledged: drop it from the outbox.
        Raises JobStoreError if the store cannot be written (it is published again)."""
        ...
