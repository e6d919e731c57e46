"""The agent's exceptions: one base, one subtree per subsystem.

Every exception the agent raises on purpose derives from :class:`AgentError`.
Third-party exceptions (``libvirt.libvirtError``, ``tomllib.TOMLDecodeError``,
``pydantic.ValidationError``, lxml's errors, ...) are caught where they enter the
agent and re-raised as one of these with ``raise ... from exc``, so callers never
need to know which library failed, and the original stays in ``__cause__``.

::

    AgentError
    ├── ConfigError                the configuration file is unreadable or invalid
    ├── VirtError                  a libvirt call failed
    │   ├── NotConnectedError      no usable connection (daemon away, reconnecting)
    │   ├── DomainNotFoundError    the domain is gone (undefined, or transient and stopped)
    │   └── VirtTimeoutError       a libvirt call did not return in time
    ├── InventoryError             a domain's XML could not be understood
    ├── LedgerError                the checkpoint ledger (SQLite) failed
    │   ├── LedgerCorruptError     the ledger file is not a ledger, or fails its integrity check
    │   └── LedgerImportError      an exported chain could not be imported (bad or conflicting)
    ├── ImageError                 qemu-img failed or said something unexpected about an image
    ├── ChainError                 a checkpoint chain could not be created, redefined or pruned
    ├── NbdError                   talking to an NBD server failed; ``connection_survives``
    │   ├── NbdConnectionError     could not connect, or the connection broke (dead)
    │   ├── NbdProtocolError       the server broke the protocol (dead)
    │   ├── NbdServerError         the server refused one request (the connection survives)
    │   └── NbdTimeoutError        no reply in time (dead: the request's fate is unknown)
    ├── RepositoryError            the backup repository could not be read or written
    │   ├── RepositorySpaceError   not enough room for the worst case
    │   ├── RepositoryMarkerError  the path is not the repository this agent uses (not mounted?)
    │   ├── RepositoryReadOnlyError  the repository's filesystem is read-only
    │   ├── FilesystemHungError    a filesystem call (repository, scratch) did not answer in time
    │   └── BackupNotFoundError    no such backup in the repository
    ├── BackupError                a backup job failed; ``code`` is machine-readable
    ├── JobError                   a job could not be submitted, found or changed; ``code``
    │   ├── RequestError           a job request is invalid; ``field`` names what is wrong
    │   ├── JobNotFoundError       no job with that id
    │   ├── JobConflictError       the id belongs to a job with a different request
    │   ├── JobsClosedError        the agent is stopping and takes no new jobs
    │   └── JobStoreError          the job store (SQLite) could not be read or written
    └── MessagingError             NATS JetStream could not be reached or used

Each error carries the facts a user needs to act, as attributes and in its message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (asyncio costs 30 ms to import: not for `backup-agent --help`)
    import asyncio


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration is unusable; the message names the file and the key.

    The message is one line, suitable for printing as is before exiting with status 2.
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None):
        super().__init__(message)
        self.path = path
        self.key = key


class VirtError(AgentError):
    """A libvirt call failed.

    ``code`` is libvirt's error code (``VIR_ERR_*``) when libvirt gave one, so callers
    can tell "no such domain" from "operation invalid" without parsing messages.
    """

    def __init__(self, message: str, *, code: int | None = None, operation: str | None = None):
        super().__init__(message)
        self.code = code
        self.operation = operation


class NotConnectedError(VirtError):
    """There is no usable libvirt connection right now; retry after reconnection."""


class DomainNotFoundError(VirtError):
    """The domain no longer exists in libvirt (undefined, or transient and stopped)."""


class VirtTimeoutError(VirtError):
    """A libvirt call did not return within the configured timeout.

    The call may still complete in its worker thread; its result is discarded.
    ``pending`` is that call, for a caller that must know when it is really over (a
    ``backupBegin`` that timed out here may still start the job in libvirt).
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str | None = None,
        pending: asyncio.Future[Any] | None = None,
    ):
        super().__init__(message, operation=operation)
        self.pending = pending


class InventoryError(AgentError):
    """A domain's XML could not be parsed or lacks what the inventory needs."""

    def __init__(self, message: str, *, domain: str | None = None):
        super().__init__(message)
        self.domain = domain


class LedgerError(AgentError):
    """The checkpoint ledger could not be read or written; ``path`` names the file."""

    def __init__(self, message: str, *, path: str | None = None):
        super().__init__(message)
        self.path = path


class LedgerCorruptError(LedgerError):
    """The ledger file is damaged or not a ledger at all; the agent must not write to it."""


class LedgerImportError(LedgerError):
    """An exported chain is malformed or conflicts with what the ledger already holds."""


class ImageError(AgentError):
    """``qemu-img`` failed or its answer could not be understood; ``image`` names the file."""

    def __init__(self, message: str, *, image: str | None = None):
        super().__init__(message)
        self.image = image


class ChainError(AgentError):
    """A checkpoint operation failed; ``domain`` and ``checkpoint`` say where."""

    def __init__(self, message: str, *, domain: str | None = None, checkpoint: str | None = None):
        super().__init__(message)
        self.domain = domain
        self.checkpoint = checkpoint


class NbdError(AgentError):
    """Talking to an NBD server failed.

    ``connection_survives`` tells the caller whether the same connection may be used
    for further requests (True only when the server refused this one request).
    """

    connection_survives = False

    def __init__(self, message: str, *, server: str | None = None):
        super().__init__(message)
        self.server = server


class NbdConnectionError(NbdError):
    """Could not connect or negotiate, or the connection broke."""


class NbdProtocolError(NbdError):
    """The server sent something the protocol does not allow (bad magic, lengths, ...)."""


class NbdServerError(NbdError):
    """The server refused one request with an error; ``errno`` is its NBD error code."""

    connection_survives = True

    def __init__(self, message: str, *, errno: int, server: str | None = None):
        super().__init__(message, server=server)
        self.errno = errno


class NbdTimeoutError(NbdError):
    """No reply within the timeout; the request may or may not have been carried out."""


class RepositoryError(AgentError):
    """The backup repository could not be read or written; ``path`` names what failed."""

    def __init__(self, message: str, *, path: str | None = None):
        super().__init__(message)
        self.path = path


class RepositorySpaceError(RepositoryError):
    """Not enough free space for the worst case of a backup; nothing was started.
    ``needed``, ``free`` and ``held`` (by running jobs) are bytes, when measured."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        needed: int | None = None,
        free: int | None = None,
        held: int | None = None,
    ):
        super().__init__(message, path=path)
        self.needed = needed
        self.free = free
        self.held = held


class RepositoryMarkerError(RepositoryError):
    """The repository path does not hold the repository this agent uses: no marker (not
    mounted?), another repository's marker, or not a repository at all. Nothing was
    written; the message says what to mount or run."""


class RepositoryReadOnlyError(RepositoryError):
    """The repository's filesystem is mounted read-only; nothing was written."""


class FilesystemHungError(RepositoryError):
    """A call on the filesystem of ``path`` did not answer within ``[repository]
    io_timeout`` (a hung network mount), or one is still running past it; ``seconds``
    says how long it has been waiting. Its thread may still finish the call later."""

    def __init__(self, message: str, *, path: str | None = None, seconds: float = 0.0):
        super().__init__(message, path=path)
        self.seconds = seconds


class BackupNotFoundError(RepositoryError):
    """No backup with that id (for that domain) in the repository."""


class PublishUndecidedError(RepositoryError):
    """Publishing did not finish in time: its thread may still rename the backup into
    place, so it is neither published nor undone; the next start decides."""


class RetentionRefusedError(RepositoryError):
    """Retention of a domain refused: a backup it would merge or drop is damaged. The
    message names the damage; nothing was merged or dropped."""


class DestinationExistsError(RepositoryError):
    """A restore's destination exists already: restores never overwrite."""


class BackupError(AgentError):
    """A backup job failed. ``code`` is machine-readable (e.g. ``chain-broken``,
    ``copy-failed``, ``disk-resized``, ``timeout``; the README lists them all)."""

    def __init__(self, message: str, *, code: str, domain: str | None = None):
        super().__init__(message)
        self.code = code
        self.domain = domain


class JobError(AgentError):
    """A job could not be submitted, found or changed. ``code`` is machine-readable and
    is what the HTTP API and the NATS error events carry."""

    code = "job-error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class RequestError(JobError):
    """A job request is malformed; ``field`` names the offending field (dotted path)."""

    code = "invalid-request"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None):
        super().__init__(message, code=code)
        self.field = field


class JobNotFoundError(JobError):
    """No job with that id in the store."""

    code = "job-not-found"


class JobConflictError(JobError):
    """The id was already used for a job with a different request (or one that has ended
    and cannot be cancelled)."""

    code = "job-conflict"


class JobsClosedError(JobError):
    """The agent is shutting down (or not ready yet) and takes no new jobs."""

    code = "not-accepting-jobs"


class JobStoreError(JobError):
    """The job store could not be read or written; ``path`` names the file."""

    code = "job-store-failed"

    def __init__(self, message: str, *, path: str | None = None):
        super().__init__(message)
        self.path = path


class MessagingError(AgentError):
    """NATS JetStream could not be reached, or refused a request of the agent."""
