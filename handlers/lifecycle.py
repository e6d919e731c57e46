"""Domain lifecycle events: keep the inventory in step with the domain's existence and state.

A transient domain that stops, or any domain that is undefined, leaves libvirt: the
inventory forgets it. Every other change re-reads the domain (state, persistence and
disks may all have changed, e.g. on migration arrival).
"""

from __future__ import annotations

from agent.dispatch import HandlerContext
from agent.events import Event, Lifecycle, LifecycleKind
from agent.logs import get_logger

log = get_logger("handlers.lifecycle")


async def on_lifecycle(event: Event, ctx: HandlerContext) -> None:
    assert isinstance(event, Lifecycle)
    log.info(
        "domain lifecycle",
        kind=event.kind.name.lower(),
        detail=event.detail,
        synthetic=event.synthetic,
    )
    info = await ctx.domains.refresh(event.domain.uuid)
    if info is None:
        log.info("domain left libvirt", kind=event.kind.name.lower())
    elif event.kind is LifecycleKind.STOPPED and event.detail in {"crashed", "failed"}:
        # Bitmaps are only written on a clean close; the ledger (its own issue) acts on this.
        log.warning("domain stopped uncleanly", detail=event.detail)
