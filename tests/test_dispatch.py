"""Dispatch rules, with in-memory events (pure logic: no libvirt needed)."""

from __future__ import annotations

import asyncio
from typing import Any

import libvirt
import pytest
import structlog

from agent.control.dispatch import Dispatcher, HandlerContext
from agent.virt.events import (
    BlockJob,
    BlockJobStatus,
    BlockJobType,
    DeviceAdded,
    DeviceRemovalFailed,
    DeviceRemoved,
    DomainRef,
    Event,
    JobCompleted,
    Lifecycle,
    LifecycleKind,
    subscriptions,
)

A = DomainRef(name="a", uuid="00000000-0000-0000-0000-00000000000a")
B = DomainRef(name="b", uuid="00000000-0000-0000-0000-00000000000b")
CTX: Any = HandlerContext(connection=None, domains=None, chains=None, backups=None)  # type: ignore[arg-type]


def started(ref: DomainRef, detail: str = "booted") -> Lifecycle:
    return Lifecycle(domain=ref, kind=LifecycleKind.STARTED, detail=detail)


async def test_events_of_one_domain_keep_their_order_while_others_go_on() -> None:
    handled: list[tuple[str, str]] = []
    a_may_finish = asyncio.Event()

    async def slow_for_a(event: Event, ctx: HandlerContext) -> None:
        assert isinstance(event, Lifecycle)
        if event.domain == A and event.detail == "first":
            await a_may_finish.wait()
        handled.append((event.domain.name, event.detail))

    dispatcher = Dispatcher({Lifecycle: [slow_for_a]}, CTX)
    dispatcher.submit(started(A, "first"))
    dispatcher.submit(started(A, "second"))
    dispatcher.submit(started(B, "only"))
    await asyncio.sleep(0.05)
    # B is not held up by A's slow handler, and A's second event waits for its first.
    assert handled == [("b", "only")]
    a_may_finish.set()
    await asyncio.wait_for(dispatcher.drain(), 5)
    assert handled == [("b", "only"), ("a", "first"), ("a", "second")]


async def test_a_failing_handler_is_logged_and_dispatch_goes_on() -> None:
    seen: list[str] = []

    async def broken(event: Event, ctx: HandlerContext) -> None:
        raise RuntimeError("boom")

    async def after(event: Event, ctx: HandlerContext) -> None:
        assert isinstance(event, Lifecycle)
        seen.append(event.detail)

    dispatcher = Dispatcher({Lifecycle: [broken, after]}, CTX)
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        dispatcher.submit(started(A, "one"))
        dispatcher.submit(started(A, "two"))
        await asyncio.wait_for(dispatcher.drain(), 5)
    assert seen == ["one", "two"]
    failures = [entry for entry in logs if entry["event"] == "handler failed"]
    assert len(failures) == 2
    assert failures[0]["handler"] == "broken"
    assert "detail='one'" in failures[0]["failed_event"]
    assert failures[0]["domain"] == "a" and failures[0]["domain_uuid"] == A.uuid
    assert failures[0]["exc_info"] is True


async def test_handlers_only_get_their_event_types() -> None:
    got: list[type[Event]] = []

    async def on_device(event: Event, ctx: HandlerContext) -> None:
        got.append(type(event))

    dispatcher = Dispatcher({DeviceAdded: [on_device]}, CTX)
    dispatcher.submit(started(A))
    dispatcher.submit(DeviceAdded(domain=A, device="scsi0-0-0-1"))
    await asyncio.wait_for(dispatcher.drain(), 5)
    assert got == [DeviceAdded]
    assert dispatcher.received == {"Lifecycle": 1, "DeviceAdded": 1}


async def test_close_cancels_handlers_in_flight() -> None:
    cancelled = asyncio.Event()

    async def forever(event: Event, ctx: HandlerContext) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    dispatcher = Dispatcher({Lifecycle: [forever]}, CTX)
    dispatcher.submit(started(A))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(dispatcher.close(), 5)
    assert cancelled.is_set()
    await asyncio.wait_for(dispatcher.drain(), 1)


@pytest.mark.parametrize("code", [2, 5, 99])
def test_lifecycle_details_are_named(code: int) -> None:
    event = Lifecycle.from_libvirt(A, LifecycleKind.STOPPED.value, code)
    expected = {2: "crashed", 5: "failed", 99: "unknown-99"}[code]
    assert event.detail == expected
    assert Lifecycle.from_libvirt(A, 42, 0).kind is LifecycleKind.UNKNOWN


class _FakeDomain:
    """Just what the event callbacks may touch: libvirt's local name and UUID getters."""

    def name(self) -> str:
        return A.name

    def UUIDString(self) -> str:  # noqa: N802 - libvirt's spelling
        return A.uuid


def test_every_subscribed_callback_builds_its_typed_event() -> None:
    got: list[Event] = []
    callbacks = subscriptions(got.append)
    dom = _FakeDomain()
    callbacks[libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE](None, dom, 5, 5, None)
    callbacks[libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED](None, dom, "scsi0-0-0-1", None)
    callbacks[libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED](None, dom, "scsi0-0-0-1", None)
    callbacks[libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED](None, dom, "dimm0", None)
    callbacks[libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED](None, dom, {"success": False}, None)
    callbacks[libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2](None, dom, "vda", 5, 1, None)
    assert set(callbacks) == {
        libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
        libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
        libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
        libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
        libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
        libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
    }
    lifecycle, added, removed, failed, job, block = got
    assert all(e.domain == A and not e.synthetic for e in got)
    assert isinstance(lifecycle, Lifecycle) and lifecycle.detail == "failed"
    assert isinstance(added, DeviceAdded) and added.device == "scsi0-0-0-1"
    assert isinstance(removed, DeviceRemoved) and removed.target is None
    assert isinstance(failed, DeviceRemovalFailed) and failed.device == "dimm0"
    assert isinstance(job, JobCompleted) and job.succeeded is False
    assert isinstance(block, BlockJob)
    assert (block.disk, block.job_type, block.status) == (
        "vda",
        BlockJobType.BACKUP,
        BlockJobStatus.FAILED,
    )
    assert [e.seq for e in got] == sorted(e.seq for e in got)
