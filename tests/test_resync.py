"""What the resynchronisation infers from two inventories (pure logic)."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import libvirt
import pytest

from agent.core.errors import DomainNotFoundError, NotConnectedError, VirtError
from agent.core.retry import JITTER, Backoff, retry_forever
from agent.virt.connection import map_libvirt_error
from agent.virt.domains import missed_events
from agent.virt.events import DeviceAdded, DeviceRemoved, Event, Lifecycle, LifecycleKind
from agent.virt.inventory import DomainInfo, DomainState, parse_domain

UUID = "6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11"


def domain(*, persistent: bool, running: bool, disks: dict[str, str]) -> DomainInfo:
    disk_xml = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{path}'/><target dev='{target}' bus='scsi'/></disk>"
        for target, path in disks.items()
    )
    xml = f"<domain><name>d1</name><uuid>{UUID}</uuid><devices>{disk_xml}</devices></domain>"
    state = DomainState.RUNNING if running else DomainState.SHUTOFF
    return parse_domain(xml, persistent=persistent, state=state)


def summary(events: list[Event]) -> list[tuple[str, str]]:
    out = []
    for e in events:
        assert e.synthetic and e.domain.uuid == UUID
        if isinstance(e, Lifecycle):
            out.append((e.kind.name, e.detail))
        elif isinstance(e, DeviceAdded | DeviceRemoved):
            out.append((type(e).__name__, e.target or ""))
    return out


ONE = {"sda": "/img/a.qcow2"}


def test_nothing_changed_nothing_missed() -> None:
    d = domain(persistent=True, running=True, disks=ONE)
    assert missed_events({UUID: d}, {UUID: d}) == []


def test_new_running_persistent_domain() -> None:
    d = domain(persistent=True, running=True, disks=ONE)
    assert summary(missed_events({}, {UUID: d})) == [("DEFINED", "added"), ("STARTED", "resync")]


def test_transient_domain_started_and_gone() -> None:
    d = domain(persistent=False, running=True, disks=ONE)
    assert summary(missed_events({}, {UUID: d})) == [("STARTED", "resync")]
    assert summary(missed_events({UUID: d}, {})) == [("STOPPED", "resync")]


def test_persistent_domain_stopped_and_undefined() -> None:
    d = domain(persistent=True, running=True, disks=ONE)
    stopped = dataclasses.replace(d, state=DomainState.SHUTOFF)
    assert summary(missed_events({UUID: d}, {UUID: stopped})) == [("STOPPED", "resync")]
    assert summary(missed_events({UUID: d}, {})) == [
        ("STOPPED", "resync"),
        ("UNDEFINED", "removed"),
    ]


def test_disks_added_removed_and_replaced() -> None:
    old = domain(persistent=True, running=True, disks={"sda": "/a", "sdb": "/b"})
    new = domain(persistent=True, running=True, disks={"sda": "/a", "sdb": "/other", "sdc": "/c"})
    assert summary(missed_events({UUID: old}, {UUID: new})) == [
        ("DeviceRemoved", "sdb"),
        ("DeviceAdded", "sdb"),
        ("DeviceAdded", "sdc"),
    ]
    gone = domain(persistent=True, running=True, disks={"sda": "/a"})
    assert summary(missed_events({UUID: old}, {UUID: gone})) == [("DeviceRemoved", "sdb")]


def test_same_path_new_inode_is_a_replaced_disk() -> None:
    d = domain(persistent=True, running=True, disks=ONE)
    first = dataclasses.replace(d, disks=(d.disks[0].with_inode((1, 100)),))
    again = dataclasses.replace(d, disks=(d.disks[0].with_inode((1, 100)),))
    recreated = dataclasses.replace(d, disks=(d.disks[0].with_inode((1, 200)),))
    assert missed_events({UUID: first}, {UUID: again}) == []
    assert [type(e) for e in missed_events({UUID: first}, {UUID: recreated})] == [
        DeviceRemoved,
        DeviceAdded,
    ]
    assert LifecycleKind.STARTED not in [
        e.kind for e in missed_events({UUID: first}, {UUID: recreated}) if isinstance(e, Lifecycle)
    ]


async def _reconnect_delays(backoff: Backoff, count: int) -> list[float]:
    """The first ``count`` delays of a connection that never comes up (no real sleep)."""
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) == count:
            raise asyncio.CancelledError

    async def never_up(_up: asyncio.Event) -> None:
        return None

    with pytest.raises(asyncio.CancelledError):
        await retry_forever(never_up, backoff, lambda _d, _e: None, sleep=sleep)
    return delays


async def test_backoff_doubles_up_to_the_cap() -> None:
    nominal = await _reconnect_delays(Backoff(0.5, 3.0, draw=lambda: 0.0), 6)
    assert nominal == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    # With jitter: never below the nominal delay, at most a quarter above, really random.
    jittered = await _reconnect_delays(Backoff(0.5, 3.0, draw=random.Random(1).random), 6)
    assert JITTER == 0.25
    for actual, expected in zip(jittered, nominal, strict=True):
        assert expected <= actual <= expected * (1 + JITTER)
    assert len({actual / expected for actual, expected in zip(jittered, nominal, strict=True)}) == 6


def _libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    exc.err = (code, 0, message, 0, "", None, None, 0, 0)
    return exc


def test_libvirt_errors_are_mapped_to_the_agent_tree() -> None:
    gone = map_libvirt_error(_libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, "no domain"), "describe")
    assert isinstance(gone, DomainNotFoundError) and gone.code == libvirt.VIR_ERR_NO_DOMAIN
    assert str(gone) == "describe: no domain"
    lost = map_libvirt_error(
        _libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "client socket is closed"), "list"
    )
    assert isinstance(lost, NotConnectedError)
    other = map_libvirt_error(_libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, "nope"), "x")
    assert type(other) is VirtError and other.operation == "x"
