"""What a verify that found damaged backups does to the chain: the next backup is full.

A disk whose restore at the newest backup reads a damaged backup can no longer be backed
up incrementally on top of it, so its chain is marked broken (``backup-corrupt``) in the
ledger, if the ledger knows the domain; and each damaged image gets a note beside it, so
that every listing names it damaged (retention keeps it, a backup never sits on it)
until an operator removes the note or the backups.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.chain.ledger import Ledger
from agent.core.errors import AgentError
from agent.core.logs import get_logger
from agent.repository.store import Repository
from agent.repository.verify import Problem, damaged_disks

log = get_logger("damage")


async def break_chains_at_damage(repository: Repository, ledger: Ledger, domain: str) -> list[str]:
    """After retention refused because of damage (now named in the repository): the
    disks whose chain at the newest backup reads it, their chains broken in ``ledger``
    (``repository-damaged``). Never raises: the refusal must still be reported (and the
    listing names the damage whatever the ledger says)."""
    try:
        listing = await repository.listing(domain)
        newest = listing.manifests[-1].backup_id if listing.manifests else ""
        broken = {d.target: d.error for d in listing.damage_of(newest) if d.target}
        await ledger.break_disk_chains(domain, "repository-damaged", broken)
    except AgentError as exc:
        log.warning("cannot break the chains at the damage", domain=domain, error=str(exc))
        return []
    return sorted(broken)


async def break_damaged_chains(
    repository: Repository, ledger: Ledger | None, domain: str, problems: Sequence[Problem]
) -> tuple[list[str], bool]:
    """After verify found ``problems``: the disks whose restore at the newest backup
    reads a damaged one, and whether their chains are now broken (``backup-corrupt``)
    in ``ledger``, so that their next backup is full; not if there is no ledger or it
    does not know the domain (a repository verified on another host)."""
    # Data found wrong; a structural problem (an image missing, a manifest that does not
    # read) the repository's listing names itself, and plans a full for (repository-damaged).
    problems = [p for p in problems if p.offset is not None]
    damaged = damaged_disks(await repository.backups(domain), problems)
    await repository.mark_damaged(problems)
    marked = ledger is not None and await ledger.break_disk_chains(
        domain, "backup-corrupt", damaged
    )
    return sorted(damaged), marked
