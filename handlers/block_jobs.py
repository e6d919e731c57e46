"""Block job events: a pull, copy, commit or backup block job on one disk changed state."""

from __future__ import annotations

from agent.control.dispatch import HandlerContext
from agent.core.logs import get_logger
from agent.virt.events import BlockJob, BlockJobStatus, Event

log = get_logger("handlers.block_jobs")


async def on_block_job(event: Event, ctx: HandlerContext) -> None:
    assert isinstance(event, BlockJob)
    level = log.warning if event.status is BlockJobStatus.FAILED else log.info
    level(
        "block job",
        disk=event.disk,
        job_type=event.job_type.name.lower(),
        status=event.status.name.lower(),
    )
