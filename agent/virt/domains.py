"""The agent's belief about this host's domains, and the resynchronisation.

:class:`Domains` holds one :class:`~agent.virt.inventory.DomainInfo` per domain UUID. The
handlers refresh a domain from libvirt after each of its events, so the belief follows
the host whatever order events and resynchronisations interleave in: every refresh
reads the current state. After a reconnect, :meth:`Domains.resync` reads every domain
once, compares with the belief, and returns the events that were missed
(:func:`missed_events`), marked ``synthetic``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import libvirt

from agent.core.logs import get_logger
from agent.virt.events import DeviceAdded, DeviceRemoved, DomainRef, Event, Lifecycle, LifecycleKind
from agent.virt.inventory import Disk, DomainInfo, DomainState, parse_domain, probe_inode

if TYPE_CHECKING:
    from agent.virt.connection import VirtConnection

log = get_logger("domains")

RESYNC_DETAIL = "resync"


class Domains:
    """The live inventory (see the module docstring)."""

    def __init__(self, connection: VirtConnection) -> None:
        self._connection = connection
        self._known: dict[str, DomainInfo] = {}

    def get(self, uuid: str) -> DomainInfo | None:
        return self._known.get(uuid)

    def all(self) -> Mapping[str, DomainInfo]:
        return dict(self._known)

    def find(self, domain: str) -> DomainInfo | None:
        """The domain named ``domain`` by name or UUID (in either case), as libvirt has it
        now; or None."""
        for info in self._known.values():
            if domain == info.name or domain.lower() == info.uuid:
                return info
        return None

    def name_of(self, domain: str) -> str:
        """The name of the domain ``domain`` names (by name or UUID); ``domain`` itself when
        libvirt does not have it (an undefined domain's backups are kept by name)."""
        info = self.find(domain)
        return info.name if info is not None else domain

    def forget(self, uuid: str) -> None:
        self._known.pop(uuid, None)

    async def refresh(self, uuid: str) -> DomainInfo | None:
        """Read the domain from libvirt again; forget it if libvirt no longer has it."""
        info = await self._connection.call("describe domain", _load_one, uuid)
        if info is None:
            self.forget(uuid)
        else:
            self._known[uuid] = info
        return info

    async def resync(self) -> list[Event]:
        """Replace the belief with what libvirt has now; return the events that were missed."""
        current = await self._connection.call("list domains", _load_all)
        missed = missed_events(self._known, current)
        self._known = dict(current)
        log.info("resynchronised", domains=len(current), missed_events=len(missed))
        return missed


def missed_events(before: Mapping[str, DomainInfo], after: Mapping[str, DomainInfo]) -> list[Event]:
    """The events that explain the change from ``before`` to ``after`` (all synthetic).

    Only what the handlers act on is inferred: defined/undefined, started/stopped, and
    disks that appeared, disappeared or became another image on the same target.
    """
    events: list[Event] = []
    for uuid in sorted(before.keys() | after.keys()):
        old, new = before.get(uuid), after.get(uuid)
        name = new.name if new is not None else old.name if old is not None else uuid
        ref = DomainRef(name=name, uuid=uuid)
        events.extend(_lifecycle_changes(ref, old, new))
        if old is not None and new is not None:
            events.extend(_disk_changes(ref, old, new))
    return events


def _lifecycle(ref: DomainRef, kind: LifecycleKind, detail: str) -> Lifecycle:
    return Lifecycle(domain=ref, kind=kind, detail=detail, synthetic=True)


def _lifecycle_changes(
    ref: DomainRef, old: DomainInfo | None, new: DomainInfo | None
) -> list[Event]:
    was_active = old is not None and old.state.active
    is_active = new is not None and new.state.active
    was_defined = old is not None and old.persistent
    is_defined = new is not None and new.persistent
    events: list[Event] = []
    if is_defined and not was_defined:
        events.append(_lifecycle(ref, LifecycleKind.DEFINED, "added"))
    if is_active and not was_active:
        events.append(_lifecycle(ref, LifecycleKind.STARTED, RESYNC_DETAIL))
    if was_active and not is_active:
        # Whether it shut down cleanly or crashed cannot be known any more.
        events.append(_lifecycle(ref, LifecycleKind.STOPPED, RESYNC_DETAIL))
    if was_defined and not is_defined:
        events.append(_lifecycle(ref, LifecycleKind.UNDEFINED, "removed"))
    return events


def _disk_changes(ref: DomainRef, old: DomainInfo, new: DomainInfo) -> list[Event]:
    events: list[Event] = []
    old_disks = {d.target: d for d in old.disks}
    new_disks = {d.target: d for d in new.disks}
    for target in sorted(old_disks.keys() | new_disks.keys()):
        was, now = old_disks.get(target), new_disks.get(target)
        if was is not None and (now is None or not _same_image(was, now)):
            events.append(
                DeviceRemoved(domain=ref, device=_device_name(was), target=target, synthetic=True)
            )
        if now is not None and (was is None or not _same_image(was, now)):
            events.append(
                DeviceAdded(domain=ref, device=_device_name(now), target=target, synthetic=True)
            )
    return events


def _same_image(a: Disk, b: Disk) -> bool:
    if a.identity is None or b.identity is None:
        return a.source == b.source and a.source_type == b.source_type
    return a.identity.same_image(b.identity)


def _device_name(disk: Disk) -> str:
    # Real device events name the alias; an inactive domain's disks have none.
    return disk.alias or disk.target


# Blocking helpers below run in the connection's worker threads.


def _describe(dom: Any) -> DomainInfo:
    state, _reason = dom.state()
    info = parse_domain(
        dom.XMLDesc(0),
        persistent=bool(dom.isPersistent()),
        state=DomainState.from_libvirt(state),
    )
    return dataclasses.replace(info, disks=tuple(_with_host_facts(dom, d) for d in info.disks))


def _with_host_facts(dom: Any, disk: Disk) -> Disk:
    if disk.excluded_reason is not None:
        return disk
    try:
        capacity: int | None = int(dom.blockInfo(disk.target)[0])
    except libvirt.libvirtError:
        capacity = None
    if disk.identity is None:  # backed up in full, no bitmap: no identity to probe
        return disk.with_capacity(capacity)
    try:
        inode = probe_inode(disk.identity)
    except OSError:
        inode = None  # unreadable here; identity falls back to what the XML says
    return disk.with_capacity(capacity).with_inode(inode)


def _gone(exc: libvirt.libvirtError) -> bool:
    return bool(exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN)


def _load_one(conn: Any, uuid: str) -> DomainInfo | None:
    try:
        return _describe(conn.lookupByUUIDString(uuid))
    except libvirt.libvirtError as exc:
        if _gone(exc):
            return None
        raise


def _load_all(conn: Any) -> dict[str, DomainInfo]:
    found: dict[str, DomainInfo] = {}
    for dom in conn.listAllDomains(0):
        try:
            info = _describe(dom)
        except libvirt.libvirtError as exc:
            if _gone(exc):  # vanished while we were listing
                continue
            raise
        found[info.uuid] = info
    return found
