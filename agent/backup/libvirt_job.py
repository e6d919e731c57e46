"""libvirt's side of a backup job: the XML that begins it, the calls that begin, end and
inspect it, and the wait for its end.

A pull-mode backup (``virDomainBackupBegin``) exports the domain's disks over NBD on the
job's Unix socket and creates the new checkpoint in the same QEMU transaction. For pull
mode ``virDomainAbortJob`` is the normal end; libvirt then sends ``JOB_COMPLETED`` with
the job's statistics (:func:`end_job` waits for it, and asks libvirt as well).

The functions that take ``conn`` are blocking libvirt calls, run in worker threads
through :meth:`VirtConnection.call`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import libvirt
from lxml import etree

from agent.backup.job import Job
from agent.backup.plan import BackupPlan
from agent.core.errors import BackupError
from agent.virt.connection import VirtConnection
from agent.virt.inventory import DomainInfo


def backup_xml(plan: BackupPlan, job: Job) -> str:
    """Every disk listed: a backup with ``<disks>`` leaves every disk it does not name
    out (libvirt sets ``backup='no'``), and every exported disk needs its scratch file."""
    root = etree.Element("domainbackup", mode="pull")
    if plan.base is not None:
        etree.SubElement(root, "incremental").text = plan.base
    etree.SubElement(root, "server", transport="unix", socket=str(job.socket))
    disks = etree.SubElement(root, "disks")
    for disk in plan.disks:
        attrs = {"name": disk.target, "backup": "yes", "type": "file", "backupmode": disk.mode}
        if not disk.full and disk.since is not None:
            attrs["incremental"] = disk.since
        element = etree.SubElement(disks, "disk", attrs)
        etree.SubElement(element, "scratch", file=str(job.scratch[disk.target]))
        etree.SubElement(element, "driver", type="qcow2")
    for excluded in plan.excluded:
        etree.SubElement(disks, "disk", name=excluded.target, backup="no")
    return etree.tostring(root, encoding="unicode")


def checkpoint_xml(plan: BackupPlan, job: Job) -> str:
    """A bitmap on each disk that can have one and is backed up; none elsewhere (libvirt
    refuses a checkpoint of a raw disk: "unsupported for storage type raw")."""
    root = etree.Element("domaincheckpoint")
    etree.SubElement(root, "name").text = job.checkpoint
    disks = etree.SubElement(root, "disks")
    for disk in plan.disks:
        checkpoint = "bitmap" if disk.bitmap else "no"
        etree.SubElement(disks, "disk", name=disk.target, checkpoint=checkpoint)
    for excluded in plan.excluded:
        etree.SubElement(disks, "disk", name=excluded.target, checkpoint="no")
    return etree.tostring(root, encoding="unicode")


async def end_job(
    connection: VirtConnection,
    info: DomainInfo,
    completion: asyncio.Future[Mapping[str, Any]],
    *,
    timeout: float,
) -> None:
    """End the domain's backup job and wait until it is over (``completion`` is set as
    its JOB_COMPLETED arrives); BackupError if it does not end within ``timeout`` or
    libvirt reports it failed."""
    await connection.call("end backup job", abort_job, info.uuid)
    stats = await _ended(connection, info, completion, timeout)
    if not stats.get("success", False):
        raise BackupError(
            f"libvirt reported the backup job failed: {stats.get('errmsg')}",
            code="job-failed",
            domain=info.name,
        )


async def _ended(
    connection: VirtConnection,
    info: DomainInfo,
    completion: asyncio.Future[Mapping[str, Any]],
    timeout: float,
) -> Mapping[str, Any]:
    """The ended job's statistics. JOB_COMPLETED wakes us as it arrives; an event lost
    with the connection would not, so libvirt is also asked, every second, whether the
    job is over."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.wait_for(asyncio.shield(completion), 1.0)
        except TimeoutError:
            if not await connection.call("read job", job_active, info.uuid):
                return await connection.call("read job stats", completed_stats, info.uuid)
            if time.monotonic() > deadline:
                raise BackupError(
                    "libvirt's backup job did not end after it was asked to",
                    code="job-stuck",
                    domain=info.name,
                ) from None


# Blocking libvirt calls (worker threads via VirtConnection.call).


def begin(conn: Any, uuid: str, backup_xml: str, checkpoint_xml: str) -> None:
    conn.lookupByUUIDString(uuid).backupBegin(backup_xml, checkpoint_xml, 0)


def abort_job(conn: Any, uuid: str) -> None:
    conn.lookupByUUIDString(uuid).abortJob()


def abort_own_job(conn: Any, uuid: str, socket: str) -> None:
    """Abort the domain's backup job only if it is ours (it exports on our socket)."""
    try:
        dom = conn.lookupByUUIDString(uuid)
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in _NO_JOB:
            return  # no domain, or no backup job: nothing to abort
        raise
    if socket in xml:
        try:
            dom.abortJob()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in _NO_JOB:
                raise


_NO_JOB = frozenset(
    {libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_DOMAIN_BACKUP, libvirt.VIR_ERR_OPERATION_INVALID}
)


def job_active(conn: Any, uuid: str) -> bool:
    info = conn.lookupByUUIDString(uuid).jobInfo()
    return bool(info[0] != libvirt.VIR_DOMAIN_JOB_NONE)


def completed_stats(conn: Any, uuid: str) -> dict[str, Any]:
    stats = conn.lookupByUUIDString(uuid).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    return dict(stats)


def domain_xml(conn: Any, uuid: str) -> str:
    return str(conn.lookupByUUIDString(uuid).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
