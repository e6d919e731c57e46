"""A reconcile of one domain's checkpoint chain, asked for by the agent or an operator."""

from __future__ import annotations

from agent.control.dispatch import HandlerContext
from agent.core.logs import get_logger
from agent.virt.events import Event, ReconcileRequested

log = get_logger("handlers.reconcile")


async def on_reconcile_requested(event: Event, ctx: HandlerContext) -> None:
    assert isinstance(event, ReconcileRequested)
    if ctx.domains.get(event.domain.uuid) is None:
        log.info("reconcile skipped: domain not in libvirt", reason=event.reason)
        return
    async with ctx.backups.domain_lock(event.domain.uuid):
        await ctx.chains.reconcile(event.domain.uuid)
