"""The agent's configuration: TOML file, validated models, effective view, JSON Schema.

The file is optional and every key has a default that works on a single host with
nothing else installed. Validation is strict (a TOML string ``"5"`` is not the
integer ``5``) so that a typo is reported at start-up instead of surfacing later as
odd behaviour. Every problem becomes one :class:`~agent.core.errors.ConfigError` whose
one-line message names the file and the ``[section] key``.

Regenerate the committed schema with::

    python -m agent.core.config --write-schema config/agent.schema.json
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from agent.core.config_errors import describe, position
from agent.core.config_file import (
    DEFAULT_LISTEN,
    DEFAULT_PORT,
    DEFAULT_STATE_DIR,
    parse_toml,
    read_text,
)
from agent.core.errors import ConfigError

# strict: TOML is typed, so a quoted number is a mistake worth reporting, not coercing.
_SECTION_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True)


def _absolute_path(value: Path) -> Path:
    # A daemon's working directory is arbitrary; a relative path would silently
    # point somewhere different depending on how the agent was started.
    if not value.is_absolute():
        raise ValueError("must be an absolute path")
    return value


def _empty_or_absolute(value: str) -> str:
    if value:
        _absolute_path(Path(value))
    return value


_HOST_NAME = re.compile(r"[A-Za-z0-9.-]+|\[?[0-9A-Fa-f:.]+\]?")


def _host_name(value: str) -> str:
    if not _HOST_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a host name or an IP address (no port)")
    return value


# Paths are written as TOML strings, so the Path conversion itself must stay lax.
AbsolutePath = Annotated[Path, Field(strict=False), AfterValidator(_absolute_path)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class AgentSection(BaseModel):
    """Identity of this agent and where it keeps its files."""

    model_config = _SECTION_CONFIG

    state_dir: AbsolutePath = Field(
        default=DEFAULT_STATE_DIR,
        description="Directory holding the ledger, jobs, sockets and scratch space.",
    )
    host_id: str = Field(
        default="",
        description="Name of this host in message subjects; empty means the host's name.",
    )
    recovery_timeout: Seconds = Field(
        default=300.0,
        description="Seconds start-up recovery may spend on one domain (its left-over "
        "libvirt job, checkpoint and files) before it is tried again later.",
    )
    setpriv: Annotated[str, AfterValidator(_empty_or_absolute)] = Field(
        default="/usr/bin/setpriv",
        description="setpriv (util-linux) the agent starts qemu-nbd through: with no "
        "capabilities, no new privileges, and killed with the agent. Empty runs qemu-nbd "
        "without it (full root privileges, may outlive a killed agent); a path that is "
        "not an executable is an error at start.",
    )


class LibvirtSection(BaseModel):
    """Connection to the libvirt daemon."""

    model_config = _SECTION_CONFIG

    uri: str = Field(default="qemu:///system", min_length=1, description="libvirt URI.")
    keepalive_interval: int = Field(
        default=5, ge=1, description="Seconds between keepalive probes."
    )
    keepalive_count: int = Field(
        default=3,
        ge=1,
        description="Unanswered keepalive probes before the connection counts as dead.",
    )
    call_timeout: Seconds = Field(
        default=60.0, description="Seconds any single libvirt call may take."
    )
    reconnect_initial_delay: Seconds = Field(
        default=1.0, description="First back-off delay, in seconds, after losing the connection."
    )
    reconnect_max_delay: Seconds = Field(
        default=60.0,
        description="Cap, in seconds, of the exponential reconnect back-off; "
        ">= reconnect_initial_delay.",
    )

    @field_validator("reconnect_max_delay")
    @classmethod
    def _not_below_initial_delay(cls, value: float, info: ValidationInfo) -> float:
        # Absent when reconnect_initial_delay itself failed; that error is reported already.
        initial = info.data.get("reconnect_initial_delay")
        if initial is not None and value < initial:
            raise ValueError(f"must be >= reconnect_initial_delay ({initial})")
        return value


class LoggingSection(BaseModel):
    """Log verbosity and output format."""

    model_config = _SECTION_CONFIG

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level that is logged."
    )
    format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="auto: console on a terminal, JSON lines otherwise.",
    )


class HttpSection(BaseModel):
    """HTTP API and /metrics endpoint."""

    model_config = _SECTION_CONFIG

    listen: str = Field(default=DEFAULT_LISTEN, min_length=1, description="Address to listen on.")
    port: int = Field(
        default=DEFAULT_PORT,
        ge=0,
        le=65535,
        description="TCP port to listen on; 0 picks a free one.",
    )
    token_file: Annotated[str, AfterValidator(_empty_or_absolute)] = Field(
        default="",
        description="File holding the bearer token every /v1 request must present; empty "
        "means <state_dir>/api-token, made (mode 0600) on the agent's first start.",
    )
    socket: Annotated[str, AfterValidator(_empty_or_absolute)] = Field(
        default="",
        description="Also serve the API on this Unix socket (mode 0600, no token: its "
        "file permissions are the access control); empty means none.",
    )
    allowed_hosts: list[Annotated[str, AfterValidator(_host_name)]] = Field(
        default_factory=list,
        description="Host header names accepted besides the listen address, the address "
        "a request arrived on and loopback names (e.g. this host's DNS name).",
    )


class JobsSection(BaseModel):
    """How many jobs run at once, and how the agent stops."""

    model_config = _SECTION_CONFIG

    max_concurrent_backups: int = Field(
        default=2, ge=1, le=64, description="Backup jobs running at once on this host."
    )
    max_concurrent_jobs: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Jobs of any kind running at once (backups count here too).",
    )
    shutdown_grace: Seconds = Field(
        default=60.0,
        description="Seconds running jobs may take to finish after SIGTERM before they are "
        "cancelled (and undone).",
    )
    restore_dir: Annotated[str, AfterValidator(_empty_or_absolute)] = Field(
        default="",
        description="Directory restore jobs write into (their 'to' is a name inside it); "
        "empty means <state_dir>/restores.",
    )
    restore_file_mode: str = Field(
        default="0600",
        pattern=r"^0?[0-7]{3}$",
        description="Permissions of the images restores write (octal; no execute bits); "
        "0600 keeps a VM's data readable by root only.",
    )
    keep_finished_days: Seconds = Field(
        default=30.0, description="Days finished jobs stay in the job store."
    )

    @field_validator("restore_file_mode")
    @classmethod
    def _no_execute_bits(cls, value: str) -> str:
        if int(value, 8) & 0o111:
            raise ValueError(f"{value!r} has execute bits: an image is never a program")
        return value

    @property
    def restore_mode(self) -> int:
        """``restore_file_mode`` as a number."""
        return int(self.restore_file_mode, 8)


class NatsSection(BaseModel):
    """Job requests from a central scheduler over NATS JetStream (off unless url is set)."""

    model_config = _SECTION_CONFIG

    url: str = Field(
        default="", description="NATS server, e.g. nats://127.0.0.1:4222; empty turns NATS off."
    )
    stream: str = Field(
        default="BACKUP_AGENT",
        min_length=1,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="JetStream stream holding job requests (created if missing).",
    )
    subject_prefix: str = Field(
        default="backup-agent",
        min_length=1,
        pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
        description="Requests arrive on <prefix>.<host_id>.jobs; job events are published on "
        "<prefix>.<host_id>.events.",
    )
    token_file: Annotated[str, AfterValidator(_empty_or_absolute)] = Field(
        default="", description="File holding the NATS authentication token; empty: none."
    )
    connect_timeout: Seconds = Field(
        default=5.0, description="Seconds to wait for the NATS server at each attempt."
    )
    ack_wait: Seconds = Field(
        default=30.0,
        description="Seconds JetStream waits for the agent's acknowledgement before "
        "redelivering a request.",
    )


class ScheduleEntry(BaseModel):
    """One local schedule: back up the matching domains at every cron slot."""

    model_config = _SECTION_CONFIG

    name: str = Field(
        min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="Unique name of the schedule."
    )
    cron: str = Field(
        min_length=1, description="Five-field cron expression, in the host's local time."
    )
    domains: list[str] = Field(
        default=["*"],
        min_length=1,
        description="Shell-style patterns (fnmatch) of domain names to back up.",
    )
    mode: Literal["auto", "full", "incremental"] = Field(
        default="auto", description="Backup mode of the jobs this schedule starts."
    )
    keep_last: int | None = Field(
        default=None,
        ge=0,
        description="Backups kept per domain after each of its backups; unset means "
        "the domain's [retention.domains] entry, else [retention] keep_last.",
    )

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from croniter import croniter  # noqa: PLC0415 - only needed when schedules exist

        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError("not a valid five-field cron expression")
        return value


class RepositorySection(BaseModel):
    """Where backups are stored."""

    model_config = _SECTION_CONFIG

    # A str, not a Path: Path("") would become "." and hide the "unset" meaning.
    path: Annotated[str, AfterValidator(_empty_or_absolute)] = Field(
        default="", description="Backup repository directory; empty means <state_dir>/repository."
    )
    io_timeout: Seconds = Field(
        default=120.0,
        description="Seconds one filesystem call on the repository or the scratch directory "
        "may take (a hung network mount) before the job fails.",
    )


class CheckpointsSection(BaseModel):
    """How many checkpoints libvirt keeps (each costs QEMU memory and work per guest write)."""

    model_config = _SECTION_CONFIG

    keep: int = Field(
        default=1,
        ge=1,
        description="Newest checkpoints with a successful backup kept in libvirt "
        "(plus any newer one being made); older ones are pruned, their XML kept in the ledger.",
    )


class BackupSection(BaseModel):
    """How backups copy data."""

    model_config = _SECTION_CONFIG

    scratch_dir: Annotated[str, AfterValidator(_empty_or_absolute)] = Field(
        default="",
        description="Where QEMU keeps the old data of blocks the guest overwrites during a "
        "backup; empty means <state_dir>/scratch. A full scratch filesystem pauses the guest.",
    )
    connections: int = Field(
        default=4, ge=1, le=16, description="NBD connections per disk, if the export allows."
    )
    request_size: int = Field(
        default=2 * 1024 * 1024,
        ge=64 * 1024,
        le=32 * 1024 * 1024,
        multiple_of=4096,
        description="Bytes per NBD write request into the repository image, a multiple of "
        "4096 (reads are no larger either).",
    )
    read_size: int = Field(
        default=256 * 1024,
        ge=4 * 1024,
        le=32 * 1024 * 1024,
        multiple_of=4096,
        description="Bytes per NBD read request from QEMU's backup export, a multiple of "
        "4096. QEMU allocates a buffer per request: above glibc's mmap threshold that "
        "costs it a fresh mmap and page faults every time (0.8 CPU-seconds per 2 GiB at "
        "2 MiB).",
    )
    in_flight: int = Field(default=16, ge=1, le=64, description="Requests in flight per disk.")
    bandwidth_limit: int = Field(
        default=0, ge=0, description="Bytes per second per backup job; 0 means no limit."
    )
    job_timeout: Seconds = Field(
        default=86400.0, description="Seconds a backup job may run before it is cancelled."
    )
    exclude: dict[
        Annotated[str, Field(min_length=1)], list[Annotated[str, Field(min_length=1)]]
    ] = Field(
        default={},
        description="Disks left out of backups on purpose: a domain's name, or a "
        "shell-style pattern (fnmatch) of names, mapped to the disks' targets or target "
        'patterns (e.g. "db1" = ["vdc"], "*" = ["sd[x-z]"]). Every matching entry '
        "applies. Such a disk is listed as excluded (excluded-by-config) everywhere.",
    )

    def excluded(self, domain: str, target: str) -> bool:
        """Whether ``exclude`` leaves disk ``target`` of ``domain`` out of its backups."""
        return any(
            fnmatch.fnmatchcase(domain, name) and any(fnmatch.fnmatchcase(target, t) for t in ts)
            for name, ts in self.exclude.items()
        )


class RetentionSection(BaseModel):
    """How many backups each domain keeps in the repository."""

    model_config = _SECTION_CONFIG

    keep_last: int = Field(
        default=0,
        ge=0,
        description="Backups kept per domain after each successful backup; 0 keeps all. "
        "Dropped backups are merged into the new oldest, so every kept point restores.",
    )
    domains: dict[Annotated[str, Field(min_length=1)], Annotated[int, Field(ge=0)]] = Field(
        default={},
        description="Per domain, keep_last for its backups: a domain's name, or a "
        "shell-style pattern (fnmatch) of names, mapped to the number kept. A name "
        "written out wins over patterns; else the first matching pattern, in the order "
        "written; else keep_last.",
    )

    def keep_last_for(self, domain: str) -> int:
        """The number of backups ``domain`` keeps (see ``domains``)."""
        if domain in self.domains:
            return self.domains[domain]
        for pattern, keep in self.domains.items():
            if fnmatch.fnmatchcase(domain, pattern):
                return keep
        return self.keep_last


class AgentConfig(BaseModel):
    """Configuration of libvirt-backup-agent (agent.toml)."""

    model_config = _SECTION_CONFIG

    agent: AgentSection = Field(default_factory=AgentSection)
    libvirt: LibvirtSection = Field(default_factory=LibvirtSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    http: HttpSection = Field(default_factory=HttpSection)
    repository: RepositorySection = Field(default_factory=RepositorySection)
    checkpoints: CheckpointsSection = Field(default_factory=CheckpointsSection)
    backup: BackupSection = Field(default_factory=BackupSection)
    retention: RetentionSection = Field(default_factory=RetentionSection)
    jobs: JobsSection = Field(default_factory=JobsSection)
    nats: NatsSection = Field(default_factory=NatsSection)
    schedules: list[ScheduleEntry] = Field(
        default=[], description="Local schedules ([[schedules]] tables)."
    )

    @field_validator("schedules")
    @classmethod
    def _unique_schedule_names(cls, value: list[ScheduleEntry]) -> list[ScheduleEntry]:
        names = [entry.name for entry in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"schedule names must be unique: {', '.join(duplicates)}")
        return value

    @property
    def repository_path(self) -> Path:
        """The repository directory the agent uses: ``repository.path`` or its default."""
        if self.repository.path:
            return Path(self.repository.path)
        return self.agent.state_dir / "repository"

    @property
    def scratch_path(self) -> Path:
        """Where backup scratch files go: ``backup.scratch_dir`` or its default."""
        if self.backup.scratch_dir:
            return Path(self.backup.scratch_dir)
        return self.agent.state_dir / "scratch"

    @property
    def run_path(self) -> Path:
        """Sockets and job intents, readable by the agent only."""
        return self.agent.state_dir / "run"

    @property
    def socket_path(self) -> Path:
        """Directory for NBD sockets: ``run_path``, unless that is too deep for one.

        A Unix socket path is limited to 107 bytes; a deep state directory would not
        leave room, so a short private directory under /run, named after it, is used.
        """
        if len(str(self.run_path)) <= 60:
            return self.run_path
        digest = hashlib.sha256(str(self.agent.state_dir).encode()).hexdigest()[:12]
        return Path("/run") / f"libvirt-backup-agent-{digest}"

    @property
    def token_path(self) -> Path:
        """The API's bearer token: ``http.token_file`` or ``<state_dir>/api-token``."""
        if self.http.token_file:
            return Path(self.http.token_file)
        return self.agent.state_dir / "api-token"

    @property
    def ledger_path(self) -> Path:
        """The checkpoint ledger's SQLite file."""
        return self.agent.state_dir / "ledger.sqlite"

    @property
    def jobs_path(self) -> Path:
        """The job store's SQLite file."""
        return self.agent.state_dir / "jobs.sqlite"

    @property
    def restore_path(self) -> Path:
        """Where restore jobs write: ``jobs.restore_dir`` or its default."""
        if self.jobs.restore_dir:
            return Path(self.jobs.restore_dir)
        return self.agent.state_dir / "restores"

    @property
    def resolved_host_id(self) -> str:
        """The host id the agent uses: ``agent.host_id`` or the host's name."""
        return self.agent.host_id or socket.gethostname()

    def resolved(self) -> AgentConfig:
        """This configuration with every "empty means default" key replaced by its value."""
        return self.model_copy(
            update={
                "agent": self.agent.model_copy(update={"host_id": self.resolved_host_id}),
                "repository": self.repository.model_copy(
                    update={"path": str(self.repository_path)}
                ),
                "backup": self.backup.model_copy(update={"scratch_dir": str(self.scratch_path)}),
                "jobs": self.jobs.model_copy(update={"restore_dir": str(self.restore_path)}),
                "http": self.http.model_copy(update={"token_file": str(self.token_path)}),
            }
        )


def load_config(path: Path | None) -> AgentConfig:
    """Load and validate the configuration file, or return the defaults for ``None``.

    Raises :class:`ConfigError` with a one-line message naming the file and key.
    """
    if path is None:
        return AgentConfig()
    data = parse_toml(path, read_text(path))
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        # pydantic's order is not the file's; the first mistake in the file reads best.
        errors = sorted(exc.errors(), key=lambda error: position(data, error["loc"]))
        key = ".".join(str(part) for part in errors[0]["loc"])
        message = f"{path}: {describe(errors[0])}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        raise ConfigError(message, path=str(path), key=key) from exc


def render_toml(cfg: AgentConfig) -> str:
    """The effective configuration as TOML, with defaulted keys shown resolved."""
    # TOML has no null: an unset optional key (a schedule's keep_last) is left out.
    return tomli_w.dumps(cfg.resolved().model_dump(mode="json", exclude_none=True))


def json_schema() -> dict[str, Any]:
    """JSON Schema of the configuration file."""
    schema = AgentConfig.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.core.config", description="Print or write the configuration's schema."
    )
    parser.add_argument("--write-schema", type=Path, metavar="FILE", help="write it to FILE")
    args = parser.parse_args(argv)
    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.write_schema is None:
        sys.stdout.write(text)
    else:
        args.write_schema.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
