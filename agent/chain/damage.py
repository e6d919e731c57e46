"""What a verify that found damaged backups does to the chain: the next backup is full.

A disk whose restore at the newest backup reads a damaged backup can no longer be backed
up incrementally on top of it, so its chain is marked broken (``backup-corrupt``) in the
ledger, if the ledger knows the domain.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.chain.ledger import Ledger
from agent.repository.store import Repository
from agent.repository.verify import Problem, damaged_disks


async def break_damaged_chains(
    repository: Repository, ledger: Ledger | None, domain: str, problems: Sequence[Problem]
) -> tuple[list[str], bool]:
    """After verify found ``problems``: the disks whose restore at the newest backup
    reads a damaged one, and whether their chains are now broken (``backup-corrupt``)
    in ``ledger``, so that their next backup is full; not if there is no ledger or it
    does not know the domain (a repository verified on another host)."""
    damaged = damaged_disks(await repository.backups(domain), problems)
    marked = ledger is not None and await ledger.break_disk_chains(
        domain, "backup-corrupt", damaged
    )
    return sorted(damaged), marked
