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
from agent.repository.store import Repository
from agent.repository.verify import Problem, damaged_disks


async def break_chains_at_damage(repository: Repository, ledger: Ledger, domain: str) -> list[str]:
    """After retention refused because of damage (now named in the repository): the
    disks whose chain at the newest backup reads it, their chains broken in ``ledger``
    (``repository-damaged``)."""
    listing = await repository.listing(domain)
    newest = listing.manifests[-1].backup_id if listing.manifests else ""
    broken = {d.target: d.error for d in listing.damage_of(newest) if d.target}
    await ledger.break_disk_chains(domain, "repository-damaged", broken)
    return sorted(broken)


async def break_damaged_chains(
    repository: Repository, ledger: Ledger | None, domain: str, problems: Sequence[Problem]
) -> tuple[list[str], bool]:
    """After verify found ``problems``: the disks whose restore at the newest backup
    reads a damaged one, and whether their chains are now broken (``backup-corrupt``)
    in ``ledger``, so that their next backup is full; not if there is no ledger or it
    does not know the domain (a repository verified on another host)."""
    damaged = damaged_disks(await repository.backups(domain), problems)
    await repository.mark_damaged(problems)
    marked = ledger is not None and await ledger.break_disk_chains(
        domain, "backup-corrupt", damaged
    )
    return sorted(damaged), marked
