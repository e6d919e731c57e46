"""Keeping each domain's checkpoint chain: create, record, repair, judge, prune.

:class:`Chains` is the only code that changes checkpoints in libvirt or in the
ledger. It follows three rules:

1. **Record what libvirt returned.** A checkpoint is created in libvirt, then its full
   XML (with ``<domain>``) is read back and recorded; a crash in between leaves a
   checkpoint named like the agent's own that the ledger does not know, which the next
   reconcile deletes.
2. **Repair idempotently.** :meth:`Chains.reconcile` redefines, parents first, what
   libvirt lacks and skips what it already has, so it can be stopped at any step and
   simply run again. When the domain's UUID changed, the saved ``<domain>`` is left out,
   but only for disks the agent itself matched by identity.
3. **Judge, never heal, except by a backup.** Validation only ever marks a disk's chain
   broken; a chain becomes valid again when a backup based on a newer checkpoint
   succeeds (:meth:`Chains.backup_succeeded`). A broken chain means the next backup of
   that disk is full; it is never an error that repeats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import libvirt

from agent.chain import libvirt_calls
from agent.chain.ledger import Ledger
from agent.chain.ledger_ops import (
    ForgetDiskChain,
    MarkBackedUp,
    SetDiskChains,
    SetParents,
    SetState,
)
from agent.chain.records import CheckpointDisk, CheckpointRecord, CheckpointState
from agent.chain.rules import (
    LIVE_STATES,
    VALID,
    Verdict,
    base_checkpoint,
    bitmap_disks,
    checkpoint_xml,
    disk_verdicts,
    domain_uuid_in_xml,
    is_own,
    new_checkpoint_name,
    order_chain,
    parent_in_xml,
    prune_plan,
    redefine_xml,
    restrict_disks,
)
from agent.core.config import AgentConfig
from agent.core.errors import ChainError, ImageError, VirtError
from agent.core.faults import Faults, no_faults
from agent.core.logs import get_logger
from agent.core.statelock import state_lock
from agent.qemu.images import bitmap_problem, read_chain, remove_bitmap
from agent.virt.connection import VirtConnection
from agent.virt.domains import Domains
from agent.virt.inventory import DomainInfo

log = get_logger("checkpoints")

_BAD_BITMAP_DISK = re.compile(r"for disk '(?P<disk>[^']+)'")
_CREATE_ATTEMPTS = 3


@dataclass
class ReconcileReport:
    """What one reconcile did, for logs, the CLI and tests."""

    domain: str
    redefined: list[str] = field(default_factory=list)
    already_defined: list[str] = field(default_factory=list)
    leftovers_deleted: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    prunes_finished: list[str] = field(default_factory=list)
    uuid_changed: bool = False
    verdicts: dict[str, Verdict] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def standalone_chains(
    config: AgentConfig, faults: Faults = no_faults
) -> AsyncIterator[Chains]:
    """:class:`Chains` on a connection and ledger of its own, with no events behind it.

    For one-shot work outside a running agent (``backup-agent reconcile``, tests).
    """
    async with state_lock(config.agent.state_dir), _standalone(config, faults) as chains:
        yield chains


@contextlib.asynccontextmanager
async def _standalone(config: AgentConfig, faults: Faults) -> AsyncIterator[Chains]:
    connection = VirtConnection(config.libvirt, lambda _event: None, _nothing)
    await connection.open_once()
    try:
        ledger = await Ledger.open(config.ledger_path)
        try:
            domains = Domains(connection)
            await domains.resync()
            yield Chains(ledger, connection, domains, keep=config.checkpoints.keep, faults=faults)
        finally:
            await ledger.close()
    finally:
        await connection.close()


async def _nothing() -> None:
    return None


class Chains:
    """Checkpoint chains of this host's domains (see the module docstring)."""

    def __init__(
        self,
        ledger: Ledger,
        connection: VirtConnection,
        domains: Domains,
        *,
        keep: int = 1,
        faults: Faults = no_faults,
        on_redefine: Callable[[bool], None] = lambda ok: None,
    ) -> None:
        self.ledger = ledger
        self._on_redefine = on_redefine  # metrics: each redefine's outcome
        self.domains = domains
        self._connection = connection
        self._domains = domains
        self._keep = keep
        self._faults = faults

    # -- creation and outcome -------------------------------------------------------

    async def create_checkpoint(self, uuid: str) -> CheckpointRecord:
        """Create a checkpoint of every backup-capable disk now and record it (pending)."""
        info = await self._require(uuid)
        for _ in range(_CREATE_ATTEMPTS):
            name = new_checkpoint_name()
            xml = checkpoint_xml(name, info.disks)
            try:
                await self._connection.call("create checkpoint", libvirt_calls.create, uuid, xml)
            except VirtError as exc:
                if "already exists" not in str(exc):
                    raise
                # A stale bitmap of that name is in an image; a fresh name avoids it.
                log.warning("stale bitmap in the way, choosing another name", checkpoint=name)
                continue
            self._faults(f"created:{name}")
            return await self.record(info, name)
        raise ChainError(
            "could not find a checkpoint name without a stale bitmap", domain=info.name
        )

    async def record(self, info: DomainInfo, name: str, *, judge: bool = True) -> CheckpointRecord:
        """Read a just-created checkpoint's full XML from libvirt and record it as pending.

        ``judge=False`` skips checking the chain again (a backup judged it when planning).
        """
        xml = await self._connection.call(
            "read checkpoint", libvirt_calls.full_xml, info.uuid, name
        )
        bitmaps = bitmap_disks(xml)
        disks = tuple(
            CheckpointDisk(
                target=d.target,
                bitmap=bitmaps[d.target],
                identity=d.identity.key(),
                capacity=d.capacity,
            )
            for d in info.disks
            if d.target in bitmaps and d.identity is not None
        )
        parent = parent_in_xml(xml)
        known = await self.ledger.checkpoint(info.name, parent) if parent is not None else None
        if parent is not None and (known is None or known.state not in LIVE_STATES):
            # Another tool's checkpoint, or one of ours being discarded: the agent's chain
            # starts here (a redefine naming a parent libvirt lost would always fail).
            log.warning(
                "checkpoint's parent is not live in the ledger", checkpoint=name, parent=parent
            )
            parent = None
        record = CheckpointRecord(
            domain=info.name,
            domain_uuid=info.uuid,
            name=name,
            parent=parent,
            born_parent=parent,
            created_at=_creation_time(xml),
            xml=xml,
            disks=disks,
            state=CheckpointState.PENDING,
        )
        record = await self.ledger.add_checkpoint(record)
        log.info(
            "checkpoint recorded", checkpoint=name, parent=parent, disks=[d.target for d in disks]
        )
        if judge:
            await self._judge(info, await self._records(info.name))
        return record

    async def backup_succeeded(
        self, domain: str, checkpoint: str, read_whole: Collection[str] = ()
    ) -> None:
        """A backup based on ``checkpoint`` is safe in the repository: trust it, then prune.
        ``read_whole``: its disks with no bitmap, copied whole; whatever broke their chain
        (verify found their image damaged, they were unplugged) is over."""
        record = await self.ledger.checkpoint(domain, checkpoint)
        if record is None:
            raise ChainError(
                "no such checkpoint in the ledger", domain=domain, checkpoint=checkpoint
            )
        if record.backed_up_at is not None:
            # Marked already (a job that failed later, pruning say, and is finished at the
            # next start): marking it again would trust every chain over a break since.
            return
        # Trusted, and a new chain starts at it for every disk it covers: one transaction.
        chains = {d.target: (True, None, f"chain from {checkpoint}") for d in record.disks}
        forget = [ForgetDiskChain(domain, target) for target in read_whole]
        await self.ledger.transaction(
            [MarkBackedUp(domain, checkpoint, time.time()), SetDiskChains(domain, chains), *forget]
        )
        await self.prune(domain, record.domain_uuid)

    async def discard(self, domain: str, uuid: str, checkpoint: str) -> None:
        """A checkpoint whose backup failed: delete it; the older one still covers everything."""
        await self.ledger.set_state(domain, [checkpoint], CheckpointState.DISCARDED)
        try:
            await self._delete_checkpoint(uuid, checkpoint)
        except VirtError as exc:
            # Recorded as discarded; the next reconcile deletes it as the agent's leftover.
            log.warning(
                "could not delete discarded checkpoint", checkpoint=checkpoint, error=str(exc)
            )

    async def discard_if_recorded(self, domain: str, uuid: str, checkpoint: str) -> None:
        """Undo a checkpoint a failed backup created, whether or not it was recorded yet."""
        if await self.ledger.checkpoint(domain, checkpoint) is not None:
            await self.discard(domain, uuid, checkpoint)
            return
        try:
            await self._delete_checkpoint(uuid, checkpoint)
        except VirtError as exc:
            # Not recorded: the next reconcile deletes it as the agent's own leftover.
            log.warning("could not delete checkpoint", checkpoint=checkpoint, error=str(exc))

    # -- pruning --------------------------------------------------------------------

    async def prune(self, domain: str, uuid: str) -> list[str]:
        """Delete from libvirt what no backup will start from again; the ledger keeps it."""
        records = await self._records(domain)
        plan = prune_plan(records, self._keep)
        if not plan.delete:
            return []
        # Intent first, in one transaction: after a crash the next reconcile finishes
        # what is marked pruning, with the parents the kept ones have then.
        await self.ledger.transaction(
            [
                SetParents(domain, plan.parents),
                SetState(domain, tuple(plan.delete), CheckpointState.PRUNING),
            ]
        )
        self._faults("prune:marked")
        return await self._finish_pruning(domain, uuid, list(plan.delete))

    async def _finish_pruning(self, domain: str, uuid: str, names: Sequence[str]) -> list[str]:
        defined = await self._libvirt_checkpoints(uuid)
        for name in names:
            if name in defined:
                await self._delete_checkpoint(uuid, name)
            self._faults(f"pruned:{name}")
            await self.ledger.set_state(domain, [name], CheckpointState.PRUNED)
            log.info("checkpoint pruned", checkpoint=name)
        return list(names)

    # -- repair ---------------------------------------------------------------------

    async def reconcile(self, uuid: str) -> ReconcileReport:
        """Make libvirt's checkpoints of a running or defined domain match the ledger."""
        info = await self._require(uuid)
        report = ReconcileReport(domain=info.name)
        records = await self._records(info.name)
        if not records:
            return report
        pruning = [r.name for r in records if r.state is CheckpointState.PRUNING]
        live = order_chain(r for r in records if r.state in LIVE_STATES)
        report.uuid_changed = any(r.domain_uuid != info.uuid for r in live)
        if report.uuid_changed:
            live = await self._adopt_new_uuid(info, live)
        defined = await self._libvirt_checkpoints(uuid)
        names = {r.name for r in live}
        # A parent no longer live (pruned or discarded) cannot be named: define a root.
        live = [
            r if r.parent is None or r.parent in names else dataclasses.replace(r, parent=None)
            for r in live
        ]
        await self._redefine(info, live, defined, report)
        if pruning:
            report.prunes_finished = await self._finish_pruning(info.name, uuid, pruning)
            defined = await self._libvirt_checkpoints(uuid)
        await self._sweep(info, records, defined, report)
        report.verdicts = await self._judge(info, await self._records(info.name))
        log.info(
            "reconciled",
            redefined=report.redefined,
            already_defined=len(report.already_defined),
            leftovers_deleted=report.leftovers_deleted,
            foreign=report.foreign,
            uuid_changed=report.uuid_changed,
        )
        return report

    async def _redefine(
        self,
        info: DomainInfo,
        live: Sequence[CheckpointRecord],
        defined: Mapping[str, str | None],
        report: ReconcileReport,
    ) -> None:
        """Redefine, parents first, each of ``live`` that libvirt lacks or has re-parented."""
        for record in live:
            if defined.get(record.name, _MISSING) == record.parent:
                report.already_defined.append(record.name)
                continue
            self._faults(f"redefine:{record.name}")
            xml = redefine_xml(record, keep_domain=_keeps_domain(record, info))
            try:
                await self._connection.call(
                    "redefine checkpoint", libvirt_calls.redefine, info.uuid, xml, 0
                )
            except Exception:
                self._on_redefine(False)
                raise
            self._on_redefine(True)
            report.redefined.append(record.name)

    async def _adopt_new_uuid(
        self, info: DomainInfo, live: list[CheckpointRecord]
    ) -> list[CheckpointRecord]:
        # The saved <domain> names the old UUID and libvirt refuses it; without it libvirt
        # cannot check the disks, so the agent does, by identity, before trusting anything.
        base = live[-1] if live else None
        verdicts = disk_verdicts(base, info.disks)
        broken = {t: v for t, v in verdicts.items() if not v.valid}
        if broken:
            await self._set_broken(info.name, broken)
        await self.ledger.set_domain_uuid(info.name, info.uuid)
        log.warning("domain has a new UUID; chain adopted", uuid=info.uuid, broken=sorted(broken))
        return await self._live(info.name)

    async def _sweep(
        self,
        info: DomainInfo,
        records: Sequence[CheckpointRecord],
        defined: Mapping[str, str | None],
        report: ReconcileReport,
    ) -> None:
        """Checkpoints libvirt has but the ledger does not keep: delete the agent's own."""
        keep = {r.name for r in records if r.state in LIVE_STATES}
        for name in sorted(set(defined) - keep):
            if is_own(name):
                await self._delete_checkpoint(info.uuid, name)
                report.leftovers_deleted.append(name)
            else:
                report.foreign.append(name)
                log.warning("checkpoint not made by the agent left alone", checkpoint=name)

    # -- judging --------------------------------------------------------------------

    async def _judge(
        self, info: DomainInfo, records: Sequence[CheckpointRecord]
    ) -> dict[str, Verdict]:
        """Identity, size and bitmaps of every disk against the base checkpoint."""
        base = base_checkpoint(records)
        verdicts = disk_verdicts(base, info.disks)
        if base is not None:
            good = [t for t, v in verdicts.items() if v.valid and t in _targets(base)]
            bitmaps = await (
                self._validate_running(info, base, good)
                if info.state.active
                else self._validate_stopped(info, base, good)
            )
            verdicts.update(bitmaps)
        return await self._apply(info.name, verdicts)

    async def _validate_running(
        self, info: DomainInfo, base: CheckpointRecord, targets: list[str]
    ) -> dict[str, Verdict]:
        """libvirt's REDEFINE_VALIDATE, one failing disk at a time.

        libvirt names only the first broken disk; it is dropped from libvirt's copy of
        the checkpoint (its bitmap is useless anyway) and the rest validated again.
        """
        verdicts: dict[str, Verdict] = {}
        remaining = list(targets)
        while remaining:
            xml = restrict_disks(
                redefine_xml(base, keep_domain=_keeps_domain(base, info)), remaining
            )
            try:
                await self._connection.call(
                    "validate checkpoint",
                    libvirt_calls.redefine,
                    info.uuid,
                    xml,
                    libvirt_calls.VALIDATE,
                )
                return verdicts
            except VirtError as exc:
                match = _BAD_BITMAP_DISK.search(str(exc))
                if exc.code != libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT or match is None:
                    raise
                target = match["disk"]
                if target not in remaining:
                    raise
                remaining.remove(target)
                verdicts[target] = await self._classify_running(info, base, target, str(exc))
        return verdicts

    async def _classify_running(
        self, info: DomainInfo, base: CheckpointRecord, target: str, error: str
    ) -> Verdict:
        # A running image's header lists only bitmaps QEMU loaded at start: if it lacks
        # the bitmap, it was removed; if it has it, QEMU loaded it broken (in-use).
        disk = info.disk(target)
        bitmap = _bitmap_of(base, target)
        try:
            chain = await read_chain(disk.source or "") if disk else ()
        except ImageError:
            chain = ()
        present = bool(chain) and chain[0].bitmap(bitmap) is not None
        reason = "bitmap-inconsistent" if present else "bitmap-missing"
        return Verdict.broken(reason, f"{target}: {error}")

    async def _validate_stopped(
        self, info: DomainInfo, base: CheckpointRecord, targets: list[str]
    ) -> dict[str, Verdict]:
        verdicts: dict[str, Verdict] = {}
        for target in targets:
            disk = info.disk(target)
            if disk is None or disk.source is None:
                continue
            try:
                chain = await read_chain(disk.source)
            except ImageError as exc:
                verdicts[target] = Verdict.broken("bitmap-missing", f"{target}: {exc}")
                continue
            problem = bitmap_problem(chain, _bitmap_of(base, target))
            if problem is not None:
                verdicts[target] = Verdict.broken(*problem)
        return verdicts

    async def _apply(self, domain: str, verdicts: Mapping[str, Verdict]) -> dict[str, Verdict]:
        """Store what validation found; return each disk's chain as it now stands.

        Validation only records breaks on disks whose chain it had no word on or held
        valid: a stored break is never undone (only a backup heals) nor reworded (the
        event that caused it, e.g. a crash, names the cause better than the symptom).
        """
        stored = await self.ledger.disk_chains(domain)
        changes: dict[str, tuple[bool, str | None, str]] = {}
        effective: dict[str, Verdict] = {}
        for target, verdict in verdicts.items():
            before = stored.get(target)
            if before is not None and (verdict.valid or not before.valid):
                effective[target] = Verdict(before.valid, before.reason, before.detail)
                continue
            changes[target] = (verdict.valid, verdict.reason, verdict.detail)
            effective[target] = verdict
        if changes:
            await self.ledger.set_disk_chains(domain, changes)
            broken = {t: c[1] for t, c in changes.items() if not c[0]}
            if broken:
                log.warning("disk chains broken", disks=broken)
        return effective

    async def _set_broken(self, domain: str, verdicts: Mapping[str, Verdict]) -> None:
        await self.ledger.set_disk_chains(
            domain, {t: (False, v.reason, v.detail) for t, v in verdicts.items()}
        )
        log.warning("disk chains broken", disks={t: v.reason for t, v in verdicts.items()})

    # -- what events tell -----------------------------------------------------------

    async def stopped_uncleanly(self, domain: str, detail: str) -> None:
        """QEMU died without writing bitmaps back: every bitmap of the chain is suspect."""
        base = base_checkpoint(await self._records(domain))
        if base is None:
            return
        reason = f"QEMU stopped uncleanly ({detail}); bitmaps were not written back"
        await self._set_broken(
            domain, {d.target: Verdict.broken("bitmap-inconsistent", reason) for d in base.disks}
        )

    async def migrated_away(self, domain: str) -> None:
        """The domain left this host; whoever runs it now continues (or restarts) the chain."""
        chains = await self.ledger.disk_chains(domain)
        base = base_checkpoint(await self._records(domain))
        targets = set(chains) | ({d.target for d in base.disks} if base else set())
        await self._set_broken(
            domain,
            {
                t: Verdict.broken("migrated-away", "the domain migrated to another host")
                for t in targets
            },
        )

    async def disk_removed(self, domain: str, target: str) -> None:
        if await self._tracked(domain):
            await self._set_broken(
                domain, {target: Verdict.broken("disk-removed", f"{target} was unplugged")}
            )

    async def disk_added(self, info: DomainInfo, target: str) -> None:
        """A disk appeared on ``target``: the same image as at the base, or another one?"""
        records = await self._records(info.name)
        if not records:
            return
        verdict = disk_verdicts(base_checkpoint(records), info.disks).get(target, VALID)
        if not verdict.valid:
            await self._set_broken(info.name, {target: verdict})

    # -- helpers --------------------------------------------------------------------

    async def _delete_checkpoint(self, uuid: str, name: str) -> None:
        """Delete a checkpoint from libvirt, and its bitmaps from the images.

        libvirt deletes a stopped domain's checkpoint only as metadata; its bitmaps would
        stay in the qcow2 files and record again at the next boot, so the agent removes
        them itself (no QEMU has the images open then).
        """
        if not await self._connection.call("delete checkpoint", libvirt_calls.delete, uuid, name):
            return
        info = self._domains.get(uuid)
        if info is None or info.state.active:
            return
        for disk in info.backup_disks:
            if disk.source is None:
                continue
            try:
                await remove_bitmap(disk.source, name)
            except ImageError as exc:
                if "not found" not in str(exc):
                    log.warning(
                        "could not remove a pruned bitmap",
                        disk=disk.target,
                        bitmap=name,
                        error=str(exc),
                    )

    async def _require(self, uuid: str) -> DomainInfo:
        info = await self._domains.refresh(uuid)
        if info is None:
            raise ChainError(f"domain {uuid} does not exist in libvirt")
        return info

    async def _records(self, domain: str) -> list[CheckpointRecord]:
        return await self.ledger.checkpoints(domain)

    async def _live(self, domain: str) -> list[CheckpointRecord]:
        return order_chain(await self.ledger.checkpoints(domain, states=LIVE_STATES))

    async def _tracked(self, domain: str) -> bool:
        return bool(await self.ledger.checkpoints(domain, states=LIVE_STATES))

    async def _libvirt_checkpoints(self, uuid: str) -> dict[str, str | None]:
        return await self._connection.call("list checkpoints", libvirt_calls.parents, uuid)


_MISSING = object()


def _keeps_domain(record: CheckpointRecord, info: DomainInfo) -> bool:
    # libvirt refuses a saved <domain> with another UUID than the domain has now.
    return domain_uuid_in_xml(record.xml) == info.uuid


def _targets(record: CheckpointRecord) -> set[str]:
    return {d.target for d in record.disks}


def _bitmap_of(record: CheckpointRecord, target: str) -> str:
    return next((d.bitmap for d in record.disks if d.target == target), record.name)


def _creation_time(xml: str) -> int:
    match = re.search(r"<creationTime>(\d+)</creationTime>", xml)
    return int(match.group(1)) if match else int(time.time())
