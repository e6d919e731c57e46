"""Where libvirt's domain events come in: typed, immutable event objects.

libvirt calls one callback per event ID with positional arguments and integer codes.
:func:`subscriptions` lists, for each event ID the agent listens to, the callback that
turns those arguments into one of the frozen dataclasses below and hands it to a
*sink* (the dispatcher). The callbacks run on the event-loop thread (libvirtaio) and
must not call back into libvirt: ``virDomain.name()`` and ``UUIDString()`` are local.

Events the resynchronisation after a reconnect infers (because libvirt's own events
were missed while the agent was disconnected) are the same classes with
``synthetic=True``; their lifecycle ``detail`` is ``"resync"`` where the real reason
cannot be known.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import libvirt


@dataclass(frozen=True, slots=True)
class DomainRef:
    """Name and UUID of the domain an event is about (the UUID is the stable key)."""

    name: str
    uuid: str


_sequence = itertools.count(1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Common part of every domain event.

    ``seq`` numbers events in the order the agent received them, across domains;
    ``synthetic`` marks events inferred by the resynchronisation, not sent by libvirt.
    """

    domain: DomainRef
    synthetic: bool = False
    received_at: float = field(default_factory=time.time)
    seq: int = field(default_factory=lambda: next(_sequence))


class LifecycleKind(enum.Enum):
    """``VIR_DOMAIN_EVENT_*``: what happened to the domain as a whole."""

    UNKNOWN = -1  # a code newer than this agent
    DEFINED = 0
    UNDEFINED = 1
    STARTED = 2
    SUSPENDED = 3
    RESUMED = 4
    STOPPED = 5
    SHUTDOWN = 6
    PMSUSPENDED = 7
    CRASHED = 8


def _detail_names(kind: LifecycleKind) -> Mapping[int, str]:
    # Built from the binding's own constants (VIR_DOMAIN_EVENT_STOPPED_CRASHED -> "crashed"),
    # so details added by newer libvirt releases are named without a change here.
    prefix = f"VIR_DOMAIN_EVENT_{kind.name}_"
    return {
        value: name.removeprefix(prefix).lower()
        for name, value in vars(libvirt).items()
        if name.startswith(prefix) and not name.endswith("_LAST") and isinstance(value, int)
    }


_DETAILS: dict[LifecycleKind, Mapping[int, str]] = {
    kind: _detail_names(kind) for kind in LifecycleKind if kind is not LifecycleKind.UNKNOWN
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Lifecycle(Event):
    """The domain was defined, started, stopped, ...; ``detail`` says how.

    ``detail`` is libvirt's detail code as a lower-case name, e.g. ``started``/``migrated``,
    ``stopped``/``crashed``, ``stopped``/``failed``, ``undefined``/``removed``.
    """

    kind: LifecycleKind
    detail: str

    @classmethod
    def from_libvirt(cls, domain: DomainRef, event: int, detail: int) -> Lifecycle:
        kind = _enum_or_unknown(LifecycleKind, event, LifecycleKind.UNKNOWN)
        names = _DETAILS.get(kind, {})
        return cls(domain=domain, kind=kind, detail=names.get(detail, f"unknown-{detail}"))


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceAdded(Event):
    """A device was hot-plugged; ``device`` is its alias (e.g. ``scsi0-0-0-1``)."""

    device: str
    target: str | None = None  # the disk's target when known (resync); else look it up


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRemoved(Event):
    """A device was hot-unplugged; ``device`` is its alias (look up the disk before refreshing)."""

    device: str
    target: str | None = None  # the disk's target when known (resync); else look it up


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRemovalFailed(Event):
    """The guest refused or failed a hot-unplug; the device is still there."""

    device: str


@dataclass(frozen=True, slots=True, kw_only=True)
class JobCompleted(Event):
    """A domain job (a backup, a migration) ended; ``stats`` are libvirt's typed parameters."""

    stats: Mapping[str, Any]

    @property
    def succeeded(self) -> bool | None:
        """True/False from the job statistics when libvirt reports it, else None."""
        value = self.stats.get("success")
        return None if value is None else bool(value)


class BlockJobType(enum.Enum):
    """``VIR_DOMAIN_BLOCK_JOB_TYPE_*``."""

    UNKNOWN = 0
    PULL = 1
    COPY = 2
    COMMIT = 3
    ACTIVE_COMMIT = 4
    BACKUP = 5


class BlockJobStatus(enum.Enum):
    """``VIR_DOMAIN_BLOCK_JOB_*``: how the block job ended (or that it is ready to pivot)."""

    COMPLETED = 0
    FAILED = 1
    CANCELED = 2
    READY = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockJob(Event):
    """A block job on one disk changed state (``BLOCK_JOB_2``: ``disk`` is the target)."""

    disk: str
    job_type: BlockJobType
    status: BlockJobStatus


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcileRequested(Event):
    """Not from libvirt: the agent (after a reconnect) or an operator asks for a reconcile.

    It travels through the same per-domain queue as libvirt's events, so a reconcile
    never runs concurrently with the handling of another event of that domain.
    """

    reason: str


EventSink = Callable[[Event], None]


def _ref(dom: Any) -> DomainRef:
    return DomainRef(name=dom.name(), uuid=dom.UUIDString())


_E = TypeVar("_E", bound=enum.Enum)


def _enum_or_unknown(cls: type[_E], value: int, unknown: _E) -> _E:
    try:
        return cls(value)
    except ValueError:
        return unknown


def subscriptions(sink: EventSink) -> dict[int, Callable[..., None]]:
    """libvirt event ID -> callback that builds the typed event and passes it to ``sink``."""

    def lifecycle(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        sink(Lifecycle.from_libvirt(_ref(dom), event, detail))

    def device_added(_conn: Any, dom: Any, alias: str, _opaque: Any) -> None:
        sink(DeviceAdded(domain=_ref(dom), device=alias))

    def device_removed(_conn: Any, dom: Any, alias: str, _opaque: Any) -> None:
        sink(DeviceRemoved(domain=_ref(dom), device=alias))

    def device_removal_failed(_conn: Any, dom: Any, alias: str, _opaque: Any) -> None:
        sink(DeviceRemovalFailed(domain=_ref(dom), device=alias))

    def job_completed(_conn: Any, dom: Any, params: dict[str, Any], _opaque: Any) -> None:
        sink(JobCompleted(domain=_ref(dom), stats=MappingProxyType(dict(params))))

    def block_job(
        _conn: Any, dom: Any, disk: str, job_type: int, status: int, _opaque: Any
    ) -> None:
        sink(
            BlockJob(
                domain=_ref(dom),
                disk=disk,
                job_type=_enum_or_unknown(BlockJobType, job_type, BlockJobType.UNKNOWN),
                status=_enum_or_unknown(BlockJobStatus, status, BlockJobStatus.FAILED),
            )
        )

    return {
        libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE: lifecycle,
        libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED: device_added,
        libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED: device_removed,
        libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED: device_removal_failed,
        libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED: job_completed,
        libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2: block_job,
    }
