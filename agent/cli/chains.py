"""The operator's checkpoint commands: ``checkpoints``, ``reconcile``, ``ledger export|import``.

``checkpoints`` and ``ledger`` read and write the ledger file directly (SQLite allows a
running agent and these commands side by side). ``reconcile`` connects to libvirt
itself and repairs one domain's chain, as the agent does on its events.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.chain.ledger import Ledger
from agent.chain.records import CheckpointRecord, DiskChain
from agent.core.config import AgentConfig
from agent.core.durable import write_durably
from agent.core.errors import AgentError


class CommandError(AgentError):
    """An operator command cannot do what was asked; the message says why."""


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def _resolve(ledger: Ledger, domain: str, path: Path) -> str:
    """A domain name from a name or a UUID the ledger knows."""
    names = await ledger.domains()
    if domain in names:
        return domain
    for name in names:
        if any(r.domain_uuid == domain for r in await ledger.checkpoints(name)):
            return name
    raise CommandError(f"no checkpoints recorded for domain {domain!r} in {path}")


async def _chain(
    config: AgentConfig, domain: str
) -> tuple[str, list[CheckpointRecord], dict[str, DiskChain]]:
    ledger = await Ledger.open(config.ledger_path)
    try:
        name = await _resolve(ledger, domain, config.ledger_path)
        return name, await ledger.checkpoints(name), await ledger.disk_chains(name)
    finally:
        await ledger.close()


def _as_json(
    name: str, records: list[CheckpointRecord], chains: dict[str, DiskChain]
) -> dict[str, Any]:
    return {
        "domain": name,
        "checkpoints": [
            {
                "name": r.name,
                "parent": r.parent,
                "born_parent": r.born_parent,
                "created_at": r.created_at,
                "state": r.state.value,
                "backed_up_at": r.backed_up_at,
                "domain_uuid": r.domain_uuid,
                "disks": [
                    {
                        "target": d.target,
                        "bitmap": d.bitmap,
                        "identity": d.identity,
                        "capacity": d.capacity,
                    }
                    for d in r.disks
                ],
            }
            for r in records
        ],
        "disks": {
            t: {
                "valid": c.valid,
                "reason": c.reason,
                "detail": c.detail,
                "updated_at": c.updated_at,
            }
            for t, c in sorted(chains.items())
        },
    }


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def show_checkpoints(config: AgentConfig, domain: str, as_json: bool) -> None:
    name, records, chains = asyncio.run(_chain(config, domain))
    if as_json:
        print(json.dumps(_as_json(name, records, chains), indent=2))
        return
    rows = [["CHECKPOINT", "PARENT", "CREATED", "STATE", "BACKED UP", "DISKS"]]
    rows += [
        [
            r.name,
            r.parent or "-",
            _when(r.created_at),
            r.state.value,
            _when(r.backed_up_at),
            ",".join(d.target for d in r.disks),
        ]
        for r in records
    ]
    print(f"domain {name}\n")
    print(_table(rows))
    disks = [["DISK", "CHAIN", "REASON", "DETAIL"]]
    disks += [
        [t, "valid" if c.valid else "broken", c.reason or "-", c.detail]
        for t, c in sorted(chains.items())
    ]
    print()
    print(_table(disks))


async def _export(config: AgentConfig, domain: str) -> dict[str, Any]:
    ledger = await Ledger.open(config.ledger_path)
    try:
        return await ledger.export_domain(await _resolve(ledger, domain, config.ledger_path))
    finally:
        await ledger.close()


def export_chain(config: AgentConfig, domain: str, output: Path | None) -> None:
    text = json.dumps(asyncio.run(_export(config, domain)), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        # The export may be the only copy of the chain another host will import: durable.
        write_durably(output, text)


async def _import(config: AgentConfig, data: Any, replace: bool) -> int:
    await asyncio.to_thread(config.agent.state_dir.mkdir, parents=True, exist_ok=True)
    ledger = await Ledger.open(config.ledger_path)
    try:
        return await ledger.import_domain(data, replace=replace)
    finally:
        await ledger.close()


def import_chain(config: AgentConfig, source: Path, replace: bool) -> None:
    try:
        data = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        raise CommandError(f"{source}: cannot read an exported chain: {exc}") from exc
    count = asyncio.run(_import(config, data, replace))
    print(f"imported {count} checkpoints from {source}")


async def _reconcile(config: AgentConfig, domain: str) -> None:
    from agent.chain.checkpoints import standalone_chains  # noqa: PLC0415 - libvirt only here
    from agent.core.faults import from_environment  # noqa: PLC0415

    async with standalone_chains(config, from_environment()) as chains:
        name = await _resolve(chains.ledger, domain, config.ledger_path)
        uuid = next((u for u, i in chains.domains.all().items() if i.name == name), None)
        if uuid is None:
            raise CommandError(f"domain {name!r} is not in libvirt on {config.libvirt.uri}")
        report = await chains.reconcile(uuid)
    print(
        f"domain {report.domain}: redefined {len(report.redefined)}, "
        f"already defined {len(report.already_defined)}, "
        f"leftovers deleted {len(report.leftovers_deleted)}, foreign {len(report.foreign)}"
    )
    for target, verdict in sorted(report.verdicts.items()):
        state = "valid" if verdict.valid else f"broken ({verdict.reason}: {verdict.detail})"
        print(f"  {target}: {state}")


def reconcile(config: AgentConfig, domain: str) -> None:
    asyncio.run(_reconcile(config, domain))
