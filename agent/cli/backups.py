"""The operator's backup commands: ``backup``, ``backups``, ``restore``, ``verify``.

``backups``, ``restore`` and ``verify`` read the repository directly and need neither
libvirt nor a running agent. ``backup`` runs one backup in this process (its own
libvirt connection), the way the agent runs it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.backup import whole_vm
from agent.backup.plan import BackupMode
from agent.backup.run import BackupResult
from agent.chain.damage import break_damaged_chains
from agent.chain.ledger import Ledger
from agent.cli.progress import JsonProgress, ProgressBar, progress_display
from agent.core.config import AgentConfig
from agent.core.errors import AgentError
from agent.repository.listing import Damage, Listing, time_order
from agent.repository.store import Repository
from agent.repository.verify import Problem
from agent.virt.connection import VirtConnection


class CommandError(AgentError):
    """The command cannot do what was asked; the message says why."""


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _in_repository(repository: Repository, domain: str) -> str:
    """The name ``domain`` (a name or UUID) has in the repository; an error naming the
    repository if it holds no backup of it."""
    name = asyncio.run(repository.domain_named(domain))
    if name is None:
        raise CommandError(f"no backups of {domain!r} in {repository.root}")
    return name


def list_backups(config: AgentConfig, domain: str, as_json: bool) -> None:
    """Print the domain's backups, the damaged ones named among them; exit status 1
    (CommandError, after the listing) if not one of them is sound."""
    repository = Repository(config.repository_path, state_dir=config.agent.state_dir)
    name = _in_repository(repository, domain)
    listing = asyncio.run(repository.listing(name))
    entries = _entries(listing, name)
    if as_json:
        print(json.dumps(entries, indent=2))
    else:
        _print_table(listing, entries)
    if all(entry["damaged"] for entry in entries):
        raise CommandError(
            f"no backup of {name} in {repository.root} is sound: every one is damaged "
            f"(listed above; `backup-agent verify {name}` checks the rest)"
        )


def _entries(listing: Listing, domain: str) -> list[dict[str, Any]]:
    """``backups --json``: every backup in time order, each a manifest's summary (its
    keys as ever) plus ``damaged`` (what is wrong with it, [] if nothing); a backup whose
    manifest does not read has the same keys, null where only the manifest could say."""
    entries = [
        {**m.summary(), "damaged": [d.to_json() for d in listing.damage_of(m.backup_id)]}
        for m in listing.manifests
    ]
    readable = {m.backup_id for m in listing.manifests}
    entries += [
        _unreadable(d, domain)
        for d in listing.damaged
        if d.target is None and d.backup_id not in readable
    ]
    in_time = time_order([m.backup_id for m in listing.manifests])
    return sorted(entries, key=lambda e: in_time(e["id"]))


def _unreadable(damage: Damage, domain: str) -> dict[str, Any]:
    return {
        "id": damage.backup_id,
        "domain": domain,
        "domain_uuid": None,
        "created_at": None,
        "completed_at": None,
        "mode": None,
        "parent": None,
        "checkpoint": None,
        "bytes": None,
        "disks": [],
        "excluded": None,
        "damaged": [damage.to_json()],
    }


def _print_table(listing: Listing, entries: Sequence[dict[str, Any]]) -> None:
    rows = [["BACKUP", "COMPLETED", "MODE", "BYTES", "PARENT", "DISKS"]]
    rows += [
        [
            e["id"],
            _when(e["completed_at"]) if e["completed_at"] is not None else "-",
            e["mode"] or "DAMAGED",
            str(e["bytes"]) if e["bytes"] is not None else "-",
            e["parent"] or "-",
            ",".join(
                [f"{d['target']}:{d['mode']}" for d in e["disks"]]
                + [f"{x['target']}:excluded" for x in e["excluded"] or ()]
            )
            or "-",
        ]
        for e in entries
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if listing.damaged:
        print(f"\ndamaged ({len(listing.damaged)}; these do not restore):")
        for d in listing.damaged:
            print(f"  {d.backup_id} {d.target or '-'}: {d.error}")


def restore(
    config: AgentConfig,
    domain: str,
    backup_id: str,
    disk: str | None,
    to: Path | None,
    fmt: str,
    *,
    check_digest: bool = True,
    as_json: bool = False,
) -> None:
    if to is None:
        raise CommandError("restore needs --to (an image file with --disk, else a directory)")
    repository = Repository(config.repository_path, state_dir=config.agent.state_dir)
    domain = _in_repository(repository, domain)
    manifest = asyncio.run(repository.backup(domain, backup_id))
    targets = [d.target for d in manifest.disks]
    if disk is not None and disk not in targets:
        raise CommandError(f"backup {backup_id} has no disk {disk!r} (it has {', '.join(targets)})")
    if disk is None:  # every disk, into a directory (also when the backup has one)
        if to.suffix in (".qcow2", ".raw", ".img"):
            raise CommandError(
                f"without --disk, --to is the directory every disk is written into; {to} "
                f"looks like an image file: add --disk ({', '.join(targets)})"
            )
        try:
            to.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommandError(f"cannot create directory {to}: {exc.strerror}") from exc
        plan = [(t, to / f"{t}.{fmt}") for t in targets]
    else:
        plan = [(disk, to)]
    files = []
    for target, dest in plan:
        with progress_display(target, as_json=as_json) as bar:
            asyncio.run(
                repository.restore(
                    domain,
                    backup_id,
                    target,
                    dest,
                    fmt=fmt,
                    mode=config.jobs.restore_mode,
                    progress=bar.fraction,
                    check_digest=check_digest,
                )
            )
        files.append({"target": target, "path": str(dest), "format": fmt})
        if not as_json:
            print(f"restored {domain} {target} at {backup_id} to {dest} ({fmt})")
    if as_json:
        print(json.dumps({"domain": domain, "backup_id": backup_id, "files": files}, indent=2))


def restore_vm(
    config: AgentConfig,
    domain: str,
    backup_id: str,
    disk: str | None,
    to: Path | None,
    fmt: str,
    *,
    define: bool,
    name: str | None,
    start: bool,
    check_digest: bool = True,
    as_json: bool = False,
) -> None:
    """``restore --define``: the whole VM back (:mod:`agent.backup.whole_vm`)."""
    if not define:
        raise CommandError("--name and --start go with --define (the whole VM)")
    if disk is not None:
        raise CommandError("--define restores every disk: leave out --disk")
    if to is not None and to.suffix in (".qcow2", ".raw", ".img"):
        raise CommandError(f"with --define, --to is the images' directory; {to} looks like a file")
    repository = Repository(config.repository_path, state_dir=config.agent.state_dir)
    domain = _in_repository(repository, domain)
    if to is not None:
        try:
            to.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommandError(f"cannot create directory {to}: {exc.strerror}") from exc
    restored = asyncio.run(
        _restore_vm(
            config, repository, domain, backup_id, to, fmt, name, start, check_digest, as_json
        )
    )
    if as_json:
        files = [
            {"target": t, "path": str(path), "format": fmt} for t, path in restored.images.items()
        ]
        defined = {
            "name": restored.name,
            "uuid": restored.uuid,
            "started": restored.started,
            "left_out": [{"target": t, "reason": why} for t, why in restored.left_out],
        }
        body = {"domain": domain, "backup_id": backup_id, "files": files, "defined": defined}
        print(json.dumps(body, indent=2))
        return
    for target, image in restored.images.items():
        print(f"restored {domain} {target} at {backup_id} to {image} ({fmt})")
    for target, why in restored.left_out:
        print(f"left out disk {target} ({why}): it is in no backup", file=sys.stderr)
    state = "started" if restored.started else "defined"
    print(f"domain {restored.name} ({restored.uuid}) {state}")


async def _restore_vm(
    config: AgentConfig,
    repository: Repository,
    domain: str,
    backup_id: str,
    to: Path | None,
    fmt: str,
    name: str | None,
    start: bool,
    check_digest: bool,
    as_json: bool,
) -> whole_vm.RestoredVm:
    connection = VirtConnection(config.libvirt, lambda _event: None, _nothing)
    await connection.open_once()
    bars: list[ProgressBar | JsonProgress] = []  # one at a time: disks are restored in turn

    def progress(target: str) -> Callable[[float], None]:
        while bars:
            bars.pop().__exit__(None, None, None)
        bars.append(progress_display(target, as_json=as_json).__enter__())
        return bars[-1].fraction

    try:
        return await whole_vm.restore_vm(
            repository,
            connection,
            domain,
            backup_id,
            name=name,
            to=to,
            fmt=fmt,
            start=start,
            mode=config.jobs.restore_mode,
            check_digest=check_digest,
            progress=progress,
        )
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)
        await connection.close()


async def _nothing() -> None:
    return None


async def point_disk(
    repository: Repository, domain: str, backup_id: str, disk: str | None
) -> tuple[str, Path]:
    """The disk ``export`` and ``files`` serve (``disk``, or the backup's only one) and
    the image whose chain reads it at ``backup_id``."""
    if disk is None:
        manifest = await repository.backup(domain, backup_id)
        targets = [d.target for d in manifest.disks]
        if len(targets) != 1:
            raise CommandError(
                f"backup {backup_id} of {domain} has {len(targets)} disks "
                f"({', '.join(targets)}): say which with --disk"
            )
        disk = targets[0]
    image, _ = await repository.point_image(domain, backup_id, disk)
    return disk, image


def verify(config: AgentConfig, domain: str, backup_id: str | None) -> int:
    repository = Repository(config.repository_path, state_dir=config.agent.state_dir)
    domain = _in_repository(repository, domain)
    problems = asyncio.run(repository.verify(domain, backup_id))
    for p in problems:
        where = f" bytes {p.offset}..{p.offset + (p.length or 0)}" if p.offset is not None else ""
        print(f"{p.backup_id} {p.target} {p.image}{where}: {p.message}")
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        # (this host's ledger, if it has one: checked here, not on the event loop)
        ledger = config.ledger_path if config.ledger_path.exists() else None
        try:
            damaged, marked = asyncio.run(_full_next(ledger, repository, domain, problems))
        except AgentError as exc:
            print(f"could not mark the damaged disks' chains in the ledger: {exc}", file=sys.stderr)
            return 1
        for target in damaged:
            said = (
                "its next backup copies it in full (backup-corrupt)"
                if marked
                else f"damaged, but not marked: no ledger here knows {domain} (back it up "
                "with --mode full where its ledger is)"
            )
            print(f"{target}: {said}", file=sys.stderr)
        return 1
    print(f"{domain}: all checked backups verified")
    return 0


async def _full_next(
    ledger_path: Path | None, repository: Repository, domain: str, problems: Sequence[Problem]
) -> tuple[list[str], bool]:
    if ledger_path is None:
        return await break_damaged_chains(repository, None, domain, problems)
    async with await Ledger.open(ledger_path) as ledger:
        return await break_damaged_chains(repository, ledger, domain, problems)


def backup(config: AgentConfig, domain: str, mode: str) -> None:
    result = asyncio.run(_backup(config, domain, BackupMode(mode)))
    disks = [(d.target, d.mode, d.reason) for d in result.disks]
    disks += [(x.target, "excluded", x.reason) for x in result.excluded]
    print(
        f"backup {result.backup_id} of {result.domain}: "
        + ", ".join(f"{t} {how}" + (f" ({why})" if why else "") for t, how, why in disks)
        + f"; {result.bytes_copied} bytes in {result.seconds:.2f} s"
    )
    if result.retention_refused is not None:
        raise CommandError(f"backup {result.backup_id} stands, but {result.retention_refused}")


async def _backup(config: AgentConfig, domain: str, mode: BackupMode) -> BackupResult:
    from agent.service import Agent  # noqa: PLC0415 - libvirt only for this command

    agent = Agent(config, services=False)  # one job, no API: no port, no job store runner
    async with agent.started(wait_ready=config.libvirt.call_timeout):
        info = agent.domains.find(domain)
        if info is None:
            raise CommandError(f"domain {domain!r} is not in libvirt on {config.libvirt.uri}")
        with ProgressBar("backup") as bar:
            return await agent.backups.run(info.uuid, mode, progress=bar.update)
