"""Crash-test helper: add checkpoints to a ledger, one after another, until killed.

Run from the repository root as ``python -m tests.ledger_writer DBPATH ROUND``. After each
``add_checkpoint`` returns (so after its commit) it prints ``added SEQ NAME`` and flushes,
telling the test which checkpoints must survive a SIGKILL. A record is a pure function of
its name and parent (:func:`make_record`), so the test can tell a complete one from a torn
one. Each new checkpoint's parent is the previous one, as libvirt would have it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import sys
from pathlib import Path

from agent.chain.ledger import Ledger
from agent.chain.records import CheckpointDisk, CheckpointRecord, CheckpointState
from agent.core.logs import configure_logging

DOMAIN = "crash-domain"
DOMAIN_UUID = "0f7c2a9e-3d1b-4c5a-8e6f-1a2b3c4d5e6f"


def make_xml(name: str) -> str:
    """About 50 KiB of checkpoint XML, different on every line, so a torn write shows."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    pad = "".join(f"    <pad n='{n}'>{digest}</pad>\n" for n in range(600))
    return (
        f"<domaincheckpoint>\n  <name>{name}</name>\n  <creationTime>1700000000</creationTime>\n"
        f"  <description>\n{pad}  </description>\n</domaincheckpoint>\n"
    )


def make_record(name: str, parent: str | None) -> CheckpointRecord:
    return CheckpointRecord(
        domain=DOMAIN,
        domain_uuid=DOMAIN_UUID,
        name=name,
        parent=parent,
        born_parent=parent,
        created_at=1_700_000_000,
        xml=make_xml(name),
        disks=tuple(
            CheckpointDisk(target, name, f"file:/images/{DOMAIN}-{target}.qcow2", 1 << 30)
            for target in ("vda", "vdb")
        ),
        state=CheckpointState.PENDING,
    )


def round_name(round_: int, i: int) -> str:
    return f"r{round_}-{i:05d}"


async def write_until_killed(path: Path, round_: int) -> None:
    async with await Ledger.open(path) as ledger:
        existing = await ledger.checkpoints(DOMAIN)
        parent = existing[-1].name if existing else None
        for i in itertools.count():
            stored = await ledger.add_checkpoint(make_record(round_name(round_, i), parent))
            # Only now is it committed; the test relies on nothing being printed earlier.
            sys.stdout.write(f"added {stored.seq} {stored.name}\n")
            sys.stdout.flush()
            parent = stored.name


def main() -> None:
    configure_logging("warning", "json")  # stdout is the protocol with the test
    asyncio.run(write_until_killed(Path(sys.argv[1]), int(sys.argv[2])))


if __name__ == "__main__":
    main()
