"""A whole VM back from one backup point: every disk restored, the domain defined again.

The domain XML recorded with the backup (libvirt's inactive definition, read as the
backup ended) is the definition. :func:`definition` rewrites it, purely:

- each backed-up disk's source becomes its restored image, ``<dir>/<name>-<target>.<fmt>``
  (``dir``: the one asked for, else the directory the disk's image was in; a disk that
  was not a file, say a block device, needs a directory asked for), its driver type the
  restored format, any ``<backingStore>`` gone (the restored image is standalone);
- a disk in no backup is kept if read-only (a CD-ROM's medium), and left out otherwise
  (a shareable or excluded writable disk: the restored VM must not write into a disk it
  shares with the original), said in :attr:`Definition.left_out`;
- with a new name: that name, no ``<uuid>`` and no ``<mac>`` (libvirt makes new ones),
  so that it can run beside the original.

:func:`restore_vm` first checks everything it can (no domain of that name or UUID in
libvirt, no file at any image path), then restores each disk (checked against the
point's digest, as ``restore`` does), then defines the domain and, if asked, starts it.
If a step fails, the images it restored are removed and nothing is defined: nothing is
left half-made. A start that fails leaves the domain defined (and says so).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
from lxml import etree

from agent.core.errors import (
    AgentError,
    DestinationExistsError,
    RepositoryError,
    VirtTimeoutError,
)
from agent.core.logs import get_logger
from agent.core.names import domain_name_problem
from agent.core.shielding import to_completion
from agent.repository.manifest import Manifest
from agent.repository.store import Repository
from agent.virt.connection import VirtConnection
from agent.virt.inventory import parse_xml

log = get_logger("whole_vm")


class WholeVmError(AgentError):
    """A whole-VM restore cannot be done as asked (``code`` ``cannot-define``), or the
    domain was defined and did not start (``cannot-start``)."""

    def __init__(self, message: str, *, code: str = "cannot-define") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Definition:
    """The domain to define: its name, XML, the image each backed-up disk is restored to,
    and the disks left out (target, why)."""

    name: str
    uuid: str | None
    xml: str
    images: dict[str, Path]
    left_out: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class RestoredVm:
    name: str
    uuid: str
    images: dict[str, Path]
    left_out: tuple[tuple[str, str], ...]
    started: bool


def definition(
    manifest: Manifest, *, name: str | None = None, to: Path | None = None, fmt: str = "qcow2"
) -> Definition:
    """The definition of the VM restored from ``manifest`` (see the module docstring)."""
    if not manifest.domain_xml.strip() or manifest.domain_xml.strip() == "<domain/>":
        raise WholeVmError(f"backup {manifest.backup_id} recorded no domain definition")
    try:
        root = parse_xml(manifest.domain_xml, manifest.domain)
    except AgentError as exc:
        raise WholeVmError(f"backup {manifest.backup_id}: {exc}") from exc
    if root.tag != "domain":
        raise WholeVmError(f"backup {manifest.backup_id}: the recorded XML is not a <domain>")
    new_name = name or _text(root, "name") or manifest.domain
    problem = domain_name_problem(new_name)
    if problem is not None:  # (it names the images' files, too)
        raise WholeVmError(f"domain name {new_name!r}: {problem}")
    backed_up = {d.target for d in manifest.disks}
    excluded = {e.target: e.reason for e in manifest.excluded}
    images: dict[str, Path] = {}
    left_out: list[tuple[str, str]] = []
    devices = root.find("devices")
    for disk in [] if devices is None else list(devices.iterchildren("disk")):
        target_el = disk.find("target")
        target = target_el.get("dev") if target_el is not None else None
        if target is None:
            continue
        if target not in backed_up:
            assert devices is not None
            if disk.get("device") == "cdrom":
                _empty_drive(disk)  # the drive stays; which medium it held is not trusted
            else:
                devices.remove(disk)
                left_out.append((target, excluded.get(target, "not in the backup")))
            continue
        images[target] = _image_path(disk, target, new_name, to, fmt, manifest.backup_id)
        _point_at(disk, images[target], fmt)
    missing = backed_up - set(images)
    if missing:
        raise WholeVmError(
            f"backup {manifest.backup_id}: the recorded definition has no disk "
            f"{', '.join(sorted(missing))}"
        )
    _only_what_a_restore_needs(root)
    if name is not None:
        _rename(root, name)
    uuid = None if name is not None else _text(root, "uuid")
    xml = etree.tostring(root, encoding="unicode")
    return Definition(new_name, uuid, xml, images, tuple(left_out))


def _text(root: etree._Element, tag: str) -> str | None:
    element = root.find(tag)
    return element.text.strip() if element is not None and element.text else None


def _image_path(
    disk: etree._Element, target: str, name: str, to: Path | None, fmt: str, backup_id: str
) -> Path:
    if to is None:
        source = disk.find("source")
        original = source.get("file") if source is not None else None
        if disk.get("type") != "file" or not original:
            raise WholeVmError(
                f"backup {backup_id}: disk {target} was not an image file "
                f"(type {disk.get('type')!r}); say where to restore it with --to DIR"
            )
        to = Path(original).parent
    return to / f"{name}-{target}.{fmt}"


def _point_at(disk: etree._Element, image: Path, fmt: str) -> None:
    disk.set("type", "file")
    for old in [*disk.iterchildren("source"), *disk.iterchildren("backingStore")]:
        disk.remove(old)
    driver = disk.find("driver")
    if driver is None:
        driver = etree.Element("driver", name="qemu")
        disk.insert(0, driver)
    driver.set("type", fmt)
    source = etree.Element("source", file=str(image))
    driver.addnext(source)


# What of the recorded definition could make libvirt or QEMU touch host files or devices
# (a manifest is read back from storage another host may write: it is not trusted to
# run programs or open paths), or is the original's own: left out, so that libvirt
# picks its defaults (the emulator, a pty for a serial console, a VARS file of the VM's
# own made from the template). The disks are rewritten above.
_UNTRUSTED = (
    "devices/emulator",
    "devices/hostdev",
    "devices/filesystem",
    "devices/smartcard",
    "devices/redirdev",
    "devices/shmem",
    ".//seclabel",
    ".//log",
    "os/kernel",
    "os/initrd",
    "os/dtb",
    "os/cmdline",
)
_CHAR_DEVICES = ("serial", "console", "parallel", "channel")


def _only_what_a_restore_needs(root: etree._Element) -> None:
    for path in _UNTRUSTED:
        _remove_all(root.findall(path))
    # Elements of other namespaces (qemu:commandline, qemu:capabilities, metadata's own).
    _remove_all([e for e in root.iter() if isinstance(e.tag, str) and e.tag.startswith("{")])
    for nvram in root.findall("os/nvram"):  # the VM's own VARS file, from the template
        nvram.text = None
        _remove_all(list(nvram))
    for kind in _CHAR_DEVICES:
        for device in root.findall(f"devices/{kind}"):
            if device.get("type") in ("file", "dev", "pipe", "unix", "tcp", "udp"):
                _remove_all(device.findall("source"))
                device.set("type", "unix" if kind == "channel" else "pty")


def _empty_drive(disk: etree._Element) -> None:
    disk.set("type", "file")
    _remove_all([*disk.findall("source"), *disk.findall("backingStore")])


def _remove_all(elements: list[etree._Element]) -> None:
    for element in elements:
        parent = element.getparent()
        if parent is not None:
            parent.remove(element)


def _rename(root: etree._Element, name: str) -> None:
    """The original's identity left out: UUID (and SMBIOS's copy), MAC addresses, the
    VM generation id, fixed display ports and vsock addresses; libvirt makes new ones."""
    name_el = root.find("name")
    if name_el is None:
        name_el = etree.SubElement(root, "name")
    name_el.text = name
    _remove_all(root.findall("uuid"))
    _remove_all(root.findall("genid"))
    _remove_all(root.findall("devices/interface/mac"))
    _remove_all(root.findall("sysinfo/system/entry[@name='uuid']"))
    for graphics in root.findall("devices/graphics"):
        for attribute in ("port", "tlsPort", "websocket"):
            if attribute in graphics.attrib:
                del graphics.attrib[attribute]
        if graphics.get("type") in ("vnc", "spice"):
            graphics.set("autoport", "yes")
    for vsock in root.findall("devices/vsock"):
        _remove_all(vsock.findall("cid"))


async def restore_vm(
    repository: Repository,
    connection: VirtConnection,
    domain: str,
    backup_id: str,
    *,
    name: str | None = None,
    to: Path | None = None,
    fmt: str = "qcow2",
    start: bool = False,
    mode: int = 0o600,
    check_digest: bool = True,
    progress: Callable[[str], Callable[[float], None] | None] | None = None,
) -> RestoredVm:
    """Restore every disk of ``domain`` at ``backup_id`` and define the VM (see the
    module docstring); ``progress(target)`` gives the callback for that disk's restore."""
    manifest = await repository.backup(domain, backup_id)
    plan = definition(manifest, name=name, to=to, fmt=fmt)
    await connection.call("look for the domain", _refuse_taken, plan.name, plan.uuid)
    await asyncio.to_thread(_refuse_existing, plan.images)
    done: list[Path] = []
    try:
        for target, image in plan.images.items():
            await repository.restore(
                domain,
                backup_id,
                target,
                image,
                fmt=fmt,
                mode=mode,
                progress=progress(target) if progress is not None else None,
                check_digest=check_digest,
            )
            done.append(image)
        # Again just before: a domain defined meanwhile would be replaced by the define.
        await connection.call("look for the domain", _refuse_taken, plan.name, plan.uuid)
    except BaseException:
        await asyncio.to_thread(_remove, done)
        raise
    try:
        uuid = await connection.call("define the domain", _define, plan.xml)
    except BaseException as exc:
        await _after_failed_define(connection, plan, done, exc)
        raise
    started = False
    if start:
        try:
            await connection.call("start the domain", _start, uuid)
            started = True
        except AgentError as exc:
            raise WholeVmError(
                f"domain {plan.name} ({uuid}) is defined on its restored disks, but did not "
                f"start: {exc}",
                code="cannot-start",
            ) from exc
    log.info("domain restored", domain=plan.name, uuid=uuid, backup_id=backup_id, started=started)
    return RestoredVm(plan.name, uuid, dict(plan.images), plan.left_out, started)


async def _after_failed_define(
    connection: VirtConnection, plan: Definition, images: list[Path], exc: BaseException
) -> None:
    """The define failed, timed out or was cancelled: the images go unless libvirt has
    the domain after all (a define it finished after we stopped waiting), which then
    keeps them. A libvirt refusal is raised as this module's error."""
    if isinstance(exc, VirtTimeoutError) and exc.pending is not None:
        with contextlib.suppress(Exception):  # its real end, bounded: libvirt's answer
            await asyncio.wait_for(asyncio.shield(exc.pending), _DEFINE_SETTLE)
    try:
        defined = await to_completion(
            connection.call("look for the domain", _named, plan.name), timeout=_DEFINE_SETTLE
        )
    except Exception:  # cannot tell: keep the images (an operator removes them)
        log.error("define of a restored domain undecided; its images kept", domain=plan.name)
        return
    if defined:
        log.error("restored domain defined after all; its images kept", domain=plan.name)
        return
    await to_completion(asyncio.to_thread(_remove, images))
    if isinstance(exc, AgentError) and not isinstance(exc, VirtTimeoutError):
        raise WholeVmError(f"libvirt did not define {plan.name}: {exc}") from exc


_DEFINE_SETTLE = 30.0


def _named(conn: Any, name: str) -> bool:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise
    return True


def _refuse_taken(conn: Any, name: str, uuid: str | None) -> None:
    for what, lookup, key in (
        ("named", conn.lookupByName, name),
        ("with UUID", conn.lookupByUUIDString, uuid),
    ):
        if key is None:
            continue
        try:
            lookup(key)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue
            raise
        raise DestinationExistsError(
            f"a domain {what} {key} exists already (never replaced: restore beside it "
            "with --name NEW)"
        )


def _refuse_existing(images: dict[str, Path]) -> None:
    for target, image in images.items():
        if image.exists() or image.is_symlink():
            raise DestinationExistsError(
                f"disk {target}: {image} exists already (never overwritten)", path=str(image)
            )
        if not image.parent.is_dir():
            raise RepositoryError(
                f"disk {target}: directory {image.parent} does not exist",
                path=str(image.parent),
            )


def _define(conn: Any, xml: str) -> str:
    return str(conn.defineXML(xml).UUIDString())


def _start(conn: Any, uuid: str) -> None:
    conn.lookupByUUIDString(uuid).create()


def _remove(images: list[Path]) -> None:
    for image in images:
        with contextlib.suppress(FileNotFoundError):
            image.unlink()
