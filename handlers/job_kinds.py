"""What each kind of job does: ``backup``, ``restore``, ``verify``, ``reconcile``.

One small runner per kind (see :class:`agent.control.jobs.JobRunner`): it gets the job and a
progress callback, does the work through the agent's parts, and returns what it
produced or raises an :class:`~agent.core.errors.AgentError` whose code the job reports.
Cancellation (``DELETE /v1/jobs/{id}``, shutdown) arrives as ``CancelledError``; the
backup undoes its work itself, a restore removes its partial image.

A backup job's ``disks`` name every disk of the domain, in the domain's order: each disk
copied (``full`` or ``incremental``, with the reason), and each disk left out as
``{"mode": "excluded", "reason": ..., "bytes_copied": 0}`` (:func:`job_disks`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.backup import whole_vm
from agent.backup.plan import BackupMode
from agent.chain.damage import break_damaged_chains
from agent.control.dispatch import HandlerContext
from agent.control.job_requests import DISK_EXCLUDED, Job, JobDisk, JobKind
from agent.control.jobs import JobFailedError, JobOutcome, JobRunner, Progress
from agent.control.metrics import chain_length
from agent.core.config import AgentConfig
from agent.core.errors import AgentError, JobError
from agent.core.logs import get_logger
from agent.repository.manifest import DiskManifest, ExcludedDisk
from agent.virt.inventory import DomainInfo

log = get_logger("handlers.job_kinds")


def job_runners(ctx: HandlerContext, config: AgentConfig) -> dict[JobKind, JobRunner]:
    return {
        JobKind.BACKUP: functools.partial(backup, ctx),
        JobKind.RESTORE: functools.partial(
            restore, ctx, config.restore_path, config.jobs.restore_mode
        ),
        JobKind.VERIFY: functools.partial(verify, ctx),
        JobKind.RECONCILE: functools.partial(reconcile, ctx),
    }


def _require(ctx: HandlerContext, domain: str) -> DomainInfo:
    info = ctx.domains.find(domain)
    if info is None:
        raise JobError(f"no domain {domain!r} in libvirt on this host", code="domain-not-found")
    return info


async def backup(ctx: HandlerContext, job: Job, progress: Progress) -> JobOutcome:
    info = _require(ctx, job.domain)
    mode = BackupMode(job.request.mode or "auto")
    result = await ctx.backups.run(
        info.uuid, mode, progress=progress, keep_last=job.request.keep_last, job_id=job.id
    )
    outcome: dict[str, object] = {
        "checkpoint": result.checkpoint,
        "seconds": round(result.seconds, 3),
    }
    try:  # after retention: the images a restore of this backup reads
        outcome["chain_length"] = chain_length(await ctx.backups.repository.backups(info.name))
    except AgentError as exc:
        log.warning("cannot read the repository's backups", error=str(exc))
    done = JobOutcome(
        backup_id=result.backup_id,
        disks=job_disks(result.disks, result.excluded, [d.target for d in info.disks]),
        result=outcome,
    )
    if result.retention_refused is not None:
        # The backup stands (its id is reported), but damage was found: not a success.
        raise JobFailedError(
            f"backup {result.backup_id} published, but {result.retention_refused}",
            code="retention-refused",
            result={**outcome, "retention_refused": result.retention_refused},
            outcome=done,
        )
    return done


def job_disks(
    disks: Sequence[DiskManifest],
    excluded: Sequence[ExcludedDisk],
    order: Sequence[str] = (),
) -> tuple[JobDisk, ...]:
    """A backup's disks as its job shows them: those copied, and those left out (mode
    ``excluded``, nothing copied); in ``order`` (the domain's targets), the rest after."""
    found = [JobDisk(d.target, d.mode, d.reason, d.bytes_copied) for d in disks]
    found += [JobDisk(x.target, DISK_EXCLUDED, x.reason, 0) for x in excluded]
    place = {target: i for i, target in enumerate(order)}
    return tuple(sorted(found, key=lambda d: place.get(d.target, len(place))))


async def restore(
    ctx: HandlerContext, restore_dir: Path, mode: int, job: Job, progress: Progress
) -> JobOutcome:
    request = job.request
    assert request.backup is not None  # checked at submission
    domain = await _in_repository(ctx, job.domain)
    fmt = request.format or "qcow2"
    if request.define:
        return await _restore_vm(ctx, restore_dir, mode, job, progress, domain)
    assert request.to is not None  # checked at submission
    manifest = await ctx.backups.repository.backup(domain, request.backup)
    targets = [d.target for d in manifest.disks]
    if request.disk is not None and request.disk not in targets:
        raise JobError(
            f"backup {request.backup} has no disk {request.disk!r} (it has {', '.join(targets)})",
            code="disk-not-found",
        )
    dest = restore_dir / request.to
    if request.disk is None:  # every disk, into a directory (also when the backup has one)
        await asyncio.to_thread(_new_directory, dest)
        plan = [(t, dest / f"{t}.{fmt}") for t in targets]
    else:
        await asyncio.to_thread(restore_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
        plan = [(request.disk, dest)]
    sizes = {d.target: d.virtual_size for d in manifest.disks}
    total = sum(sizes[t] for t, _ in plan)
    done = 0
    files = []
    for target, path in plan:
        size = sizes[target]

        def step(fraction: float, base: int = done, size: int = size) -> None:
            progress(base + int(fraction * size), total)

        await ctx.backups.repository.restore(
            domain, request.backup, target, path, fmt=fmt, mode=mode, progress=step
        )
        done += size
        files.append({"target": target, "path": str(path), "format": fmt})
    return JobOutcome(backup_id=request.backup, result={"files": files})


async def _restore_vm(
    ctx: HandlerContext, restore_dir: Path, mode: int, job: Job, progress: Progress, domain: str
) -> JobOutcome:
    """A restore with ``define``: the whole VM (:mod:`agent.backup.whole_vm`), its images
    in ``restore_dir`` (or the directory ``to`` names inside it)."""
    request = job.request
    assert request.backup is not None
    fmt = request.format or "qcow2"
    to = restore_dir / request.to if request.to else restore_dir
    await asyncio.to_thread(to.mkdir, mode=0o700, parents=True, exist_ok=True)
    manifest = await ctx.backups.repository.backup(domain, request.backup)
    sizes = {d.target: d.virtual_size for d in manifest.disks}
    total = sum(sizes.values())
    before = dict(zip(sizes, itertools.accumulate(sizes.values(), initial=0), strict=False))

    def step(target: str) -> Callable[[float], None]:
        return lambda fraction: progress(before[target] + int(fraction * sizes[target]), total)

    try:
        restored = await whole_vm.restore_vm(
            ctx.backups.repository,
            ctx.connection,
            domain,
            request.backup,
            name=request.name,
            to=to,
            fmt=fmt,
            start=bool(request.start),
            mode=mode,
            progress=step,
        )
    except whole_vm.WholeVmError as exc:
        raise JobError(str(exc), code=exc.code) from exc
    files = [{"target": t, "path": str(path), "format": fmt} for t, path in restored.images.items()]
    result = {
        "files": files,
        "domain": {
            "name": restored.name,
            "uuid": restored.uuid,
            "started": restored.started,
            "left_out": [{"target": t, "reason": why} for t, why in restored.left_out],
        },
    }
    return JobOutcome(backup_id=request.backup, result=result)


def _new_directory(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError as exc:
        raise JobError(f"{path} already exists; restores never overwrite", code="exists") from exc


async def _in_repository(ctx: HandlerContext, domain: str) -> str:
    """The name the repository keeps ``domain`` (a name or UUID) under, whether or not
    libvirt still has the domain."""
    repository, known = ctx.backups.repository, ctx.domains.name_of(domain)
    name = await repository.domain_named(known)
    if name is None and known != domain:
        name = await repository.domain_named(domain)
    if name is None:
        raise JobError(f"no backups of {domain!r} in the repository", code="no-backups")
    return name


async def verify(ctx: HandlerContext, job: Job, progress: Progress) -> JobOutcome:
    domain = await _in_repository(ctx, job.domain)
    problems = await ctx.backups.repository.verify(domain, job.request.backup)
    found = [
        {
            "backup_id": p.backup_id,
            "target": p.target,
            "image": str(p.image),
            "offset": p.offset,
            "length": p.length,
            "message": p.message,
        }
        for p in problems
    ]
    if found:
        # The next backup of a disk whose chain is damaged copies it in full.
        result: dict[str, object] = {"problems": found, "full_next": []}
        try:
            damaged, marked = await break_damaged_chains(
                ctx.backups.repository, ctx.chains.ledger, domain, problems
            )
            if marked:
                result["full_next"] = damaged
        except AgentError as exc:  # the problems found are still the job's result
            log.error("could not mark the damaged disks' chains", domain=domain, error=str(exc))
            result["full_next_error"] = str(exc)
        raise JobFailedError(
            f"verify found {len(found)} problem(s); first: {found[0]['message']}",
            code="verify-failed",
            result=result,
        )
    return JobOutcome(backup_id=job.request.backup, result={"problems": []})


async def reconcile(ctx: HandlerContext, job: Job, progress: Progress) -> JobOutcome:
    info = _require(ctx, job.domain)
    async with ctx.backups.domain_lock(info.uuid):
        report = await ctx.chains.reconcile(info.uuid)
    return JobOutcome(
        result={
            "redefined": report.redefined,
            "leftovers_deleted": report.leftovers_deleted,
            "foreign": report.foreign,
            "broken_disks": {
                target: verdict.reason
                for target, verdict in report.verdicts.items()
                if not verdict.valid
            },
        }
    )
