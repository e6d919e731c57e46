"""What the agent does on each kind of event: one small module per kind.

``lifecycle``  domain defined / started / stopped / undefined / migrated ...
``devices``    disks and other devices hot-plugged or unplugged
``jobs``       domain jobs (backups) completed
``block_jobs`` block jobs on one disk changed state
``reconcile``  a reconcile of the domain's checkpoint chain was asked for

:func:`default_routes` is the table the dispatcher uses; a handler is an async function
``(event, ctx) -> None`` that must tolerate repeats (a resynchronisation may send an
event again).
"""

from __future__ import annotations

from agent.control.dispatch import Handler, Routes
from agent.virt.events import (
    BlockJob,
    DeviceAdded,
    DeviceRemovalFailed,
    DeviceRemoved,
    Event,
    JobCompleted,
    Lifecycle,
    ReconcileRequested,
)
from handlers import block_jobs, devices, jobs, lifecycle, reconcile


def default_routes() -> dict[type[Event], list[Handler]]:
    """Event type -> the handlers run for it, in order."""
    return {
        Lifecycle: [lifecycle.on_lifecycle],
        DeviceAdded: [devices.on_device_added],
        DeviceRemoved: [devices.on_device_removed],
        DeviceRemovalFailed: [devices.on_device_removal_failed],
        JobCompleted: [jobs.on_job_completed],
        BlockJob: [block_jobs.on_block_job],
        ReconcileRequested: [reconcile.on_reconcile_requested],
    }


def with_extra(routes: Routes, extra: Handler) -> dict[type[Event], list[Handler]]:
    """``routes`` with ``extra`` appended for every event type (observers, tests)."""
    return {kind: [*handlers, extra] for kind, handlers in routes.items()}
