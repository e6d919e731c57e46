"""Domain job completion: the end of a backup job and its statistics.

The backup waiting for it is woken by the agent as the event arrives (it holds its
domain's lock, so it cannot wait for the event's turn in the domain's queue); here the
event is logged.
"""

from __future__ import annotations

from agent.control.dispatch import HandlerContext
from agent.core.logs import get_logger
from agent.virt.events import Event, JobCompleted

log = get_logger("handlers.jobs")


async def on_job_completed(event: Event, ctx: HandlerContext) -> None:
    assert isinstance(event, JobCompleted)
    stats = dict(event.stats)
    log.info(
        "domain job completed",
        success=event.succeeded,
        operation=stats.get("operation"),
        errmsg=stats.get("errmsg"),
    )
