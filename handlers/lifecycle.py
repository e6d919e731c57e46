"""Domain lifecycle events: keep the inventory and the checkpoint chain in step.

- Every event re-reads the domain (state, persistence and disks may all have changed);
  a transient domain that stopped, or an undefined one, is forgotten by the inventory.
- A start (including a migration's arrival) reconciles the chain: a transient domain
  comes back without checkpoints, and migration does not carry their metadata.
- A stop by crash or failure breaks the chain at once: QEMU did not write the bitmaps
  back, so the next backup is known to be full before anyone asks for it.
- A stop by migration hands the chain to the destination host.
- An undefine of a domain that keeps running (it becomes transient) drops libvirt's
  checkpoint metadata: the chain is redefined at once. A domain undefined and gone
  keeps its chain in the ledger for when it is defined again.
"""

from __future__ import annotations

from agent.control.dispatch import HandlerContext
from agent.core.logs import get_logger
from agent.virt.events import Event, Lifecycle, LifecycleKind

log = get_logger("handlers.lifecycle")

_UNCLEAN = frozenset({"crashed", "failed"})


async def on_lifecycle(event: Event, ctx: HandlerContext) -> None:
    assert isinstance(event, Lifecycle)
    kind = event.kind
    log.info(
        "domain lifecycle", kind=kind.name.lower(), detail=event.detail, synthetic=event.synthetic
    )
    info = await ctx.domains.refresh(event.domain.uuid)
    if info is None:
        log.info("domain left libvirt", kind=kind.name.lower())
    # A running backup of this domain finishes (or fails) before its chain changes.
    async with ctx.backups.domain_lock(event.domain.uuid):
        if kind is LifecycleKind.STOPPED and event.detail in _UNCLEAN:
            await ctx.chains.stopped_uncleanly(event.domain.name, event.detail)
        elif kind is LifecycleKind.STOPPED and event.detail == "migrated":
            await ctx.chains.migrated_away(event.domain.name)
        elif (_arrived(event) or kind is LifecycleKind.UNDEFINED) and info and info.state.active:
            await ctx.chains.reconcile(event.domain.uuid)


def _arrived(event: Lifecycle) -> bool:
    # Synthetic starts come from a resync, which asks for its own reconciles.
    if event.synthetic:
        return False
    return event.kind is LifecycleKind.STARTED or (
        event.kind is LifecycleKind.RESUMED and event.detail == "migrated"
    )
