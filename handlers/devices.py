"""Device hot-plug events: which disk came or went, then re-read the domain.

libvirt names the device by its alias only; the disk behind an unplugged alias can
only be found in the inventory as it was *before* the refresh.
"""

from __future__ import annotations

from agent.control.dispatch import HandlerContext
from agent.core.logs import get_logger
from agent.virt.events import DeviceAdded, DeviceRemovalFailed, DeviceRemoved, Event
from agent.virt.inventory import Disk

log = get_logger("handlers.devices")


def _disk_by_device(ctx: HandlerContext, event: DeviceAdded | DeviceRemoved) -> Disk | None:
    info = ctx.domains.get(event.domain.uuid)
    if info is None:
        return None
    wanted = {event.target} if event.target else {event.device}
    return next((d for d in info.disks if wanted & {d.alias, d.target}), None)


async def on_device_removed(event: Event, ctx: HandlerContext) -> None:
    assert isinstance(event, DeviceRemoved)
    # A resync names the target itself and has already replaced the belief.
    disk = None if event.target else _disk_by_device(ctx, event)
    target = event.target or (disk.target if disk else None)
    log.info(
        "device removed",
        device=event.device,
        disk=target,
        source=disk.source if disk else None,
        synthetic=event.synthetic,
    )
    await ctx.domains.refresh(event.domain.uuid)
    if target is not None:
        async with ctx.backups.domain_lock(event.domain.uuid):
            await ctx.chains.disk_removed(event.domain.name, target)


async def on_device_added(event: Event, ctx: HandlerContext) -> None:
    assert isinstance(event, DeviceAdded)
    await ctx.domains.refresh(event.domain.uuid)
    disk = _disk_by_device(ctx, event)
    log.info(
        "device added",
        device=event.device,
        disk=disk.target if disk else None,
        source=disk.source if disk else None,
        backup_capable=disk.backup_capable if disk else None,
        synthetic=event.synthetic,
    )
    if disk is not None and disk.excluded_reason is not None and disk.writable:
        log.warning(
            "a writable disk was attached that backups leave out",
            disk=disk.target,
            reason=disk.excluded_reason,
        )
    info = ctx.domains.get(event.domain.uuid)
    if disk is not None and info is not None:
        async with ctx.backups.domain_lock(event.domain.uuid):
            await ctx.chains.disk_added(info, disk.target)


async def on_device_removal_failed(event: Event, ctx: HandlerContext) -> None:
    assert isinstance(event, DeviceRemovalFailed)
    log.warning("device removal failed", device=event.device)
