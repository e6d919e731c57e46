"""Disk inventory of a libvirt domain: which disks it has and which ones can be backed up.

The parsers turn a domain's XML (live or inactive, or the ``<domain>`` embedded in a
``<domaincheckpoint>`` document) into frozen records. They are pure: the only function
that touches the filesystem is :func:`probe_inode`, which blocks and is meant to run in a
worker thread.

Incremental backup needs a persistent dirty bitmap in each disk image, and only qcow2
images can hold one. Every disk therefore gets ``unsupported_reason``: ``None`` when the
disk can carry a bitmap (it is *backup-capable*: incremental backups), else one of these
machine-readable strings:

====================  =======================================================================
Reason                Why the disk has no bitmap
====================  =======================================================================
``device-cdrom``      a CD-ROM: removable, read-only media
``device-floppy``     a floppy: removable media
``device-lun``        SCSI passthrough of a host LUN; the guest talks to the device directly
``readonly``          ``<readonly/>``: the guest cannot change it
``source-empty``      no ``<source>`` (or one naming nothing): no medium inserted
``transient-disk``    ``<transient/>``: writes are discarded at shutdown, nothing to keep
``shareable``         ``<shareable/>``: other hosts or guests may write it behind our back
``source-network``    a network disk (rbd, nbd, iscsi, gluster, ...): no local image to track
``source-<type>``     another unsupported source type: ``source-volume``, ``source-dir``,
                      ``source-nvme``, ``source-vhostuser``, ...
``format-<fmt>``      an image format other than qcow2, e.g. ``format-raw``;
                      ``format-unknown`` when ``<driver type=...>`` is missing
====================  =======================================================================

When several apply, the first in the table wins, so a raw CD-ROM reports ``device-cdrom``
and a shareable raw disk ``shareable``.

A disk without a bitmap may still be backed up, in full each time (:attr:`Disk.full_only`):
a writable local file or block device of another format (``format-*``, e.g. a raw image or
an LVM volume), and a network disk (``source-network``: QEMU reads it for the backup
through its own block layer, whatever the protocol). Every other disk is left out of
backups, and :attr:`Disk.excluded_reason` says why (the reasons above, from
``device-cdrom`` to ``shareable``, and the other ``source-<type>``).

Identity of a backup-capable disk: a checkpoint remembers ``vda`` as it was then, and the
agent must notice when ``vda`` is now a different image. :class:`DiskIdentity` holds what
the XML says (source type, path, serial, wwn) plus, when probed, the file's inode.
Its :meth:`DiskIdentity.key` is ``<type>:<path>[|serial=S][|wwn=W][|ino=DEV:INO]``, fields
present only when known, in that fixed order; ``%``, ``|`` and non-printable characters in
values are percent-encoded so :meth:`DiskIdentity.from_key` can read it back. The inode is
part of the key because the checkpoint XML cannot carry it: the agent has to store it.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from urllib.parse import quote, unquote

from lxml import etree

from agent.core.errors import InventoryError

__all__ = [
    "Disk",
    "DiskIdentity",
    "DomainInfo",
    "DomainState",
    "parse_disks",
    "parse_domain",
    "probe_inode",
]

_BITMAP_FORMAT = "qcow2"
_BITMAP_SOURCE_TYPES = frozenset({"file", "block"})
# Source types whose <source> names a path in a single attribute.
_NETWORK_REASON = "source-network"
_PATH_ATTRIBUTE = {"file": "file", "block": "dev", "dir": "dir"}
# For source types this module does not know: the first of these found names the source.
_ANY_PATH_ATTRIBUTES = ("path", "dev", "file", "dir", "name")
_KEY_FIELDS = ("serial", "wwn", "ino")


class DomainState(enum.Enum):
    """A domain's state; values are libvirt's ``VIR_DOMAIN_*`` state numbers."""

    NOSTATE = 0
    RUNNING = 1
    BLOCKED = 2
    PAUSED = 3
    SHUTDOWN = 4
    SHUTOFF = 5
    CRASHED = 6
    PMSUSPENDED = 7

    @classmethod
    def from_libvirt(cls, value: int) -> DomainState:
        """Map libvirt's state number; numbers from a newer libvirt become ``NOSTATE``."""
        try:
            return cls(value)
        except ValueError:
            return cls.NOSTATE

    @property
    def active(self) -> bool:
        """Whether the domain has a QEMU process (libvirt's notion of "active")."""
        # NOSTATE is what libvirt reports while it does not know yet; assume no process.
        return self not in (DomainState.NOSTATE, DomainState.SHUTOFF)


@dataclass(frozen=True, slots=True)
class DiskIdentity:
    """What makes disk ``vda`` today the same image as ``vda`` at a checkpoint.

    ``inode`` is ``(st_dev, st_ino)`` of a file or ``(0, st_rdev)`` of a block device,
    ``None`` when unknown (always so when parsed from XML; see :func:`probe_inode`).
    """

    source_type: str
    path: str
    serial: str | None
    wwn: str | None
    inode: tuple[int, int] | None = None

    def key(self) -> str:
        """Deterministic text form for storage and logs (format in the module docstring)."""
        fields = [f"{self.source_type}:{_escape(self.path)}"]
        if self.serial is not None:
            fields.append(f"serial={_escape(self.serial)}")
        if self.wwn is not None:
            fields.append(f"wwn={_escape(self.wwn)}")
        if self.inode is not None:
            fields.append(f"ino={self.inode[0]}:{self.inode[1]}")
        return "|".join(fields)

    @classmethod
    def from_key(cls, key: str) -> DiskIdentity:
        """Read back a :meth:`key`; raise :class:`InventoryError` if it is malformed."""
        head, *rest = key.split("|")
        source_type, colon, path = head.partition(":")
        values: dict[str, str] = {}
        for field in rest:
            name, equals, value = field.partition("=")
            if not equals or name not in _KEY_FIELDS or name in values:
                raise InventoryError(f"malformed disk identity key {key!r}")
            values[name] = unquote(value)
        if not colon or not source_type:
            raise InventoryError(f"malformed disk identity key {key!r}")
        return cls(
            source_type=source_type,
            path=unquote(path),
            serial=values.get("serial"),
            wwn=values.get("wwn"),
            inode=_parse_inode(values["ino"], key) if "ino" in values else None,
        )

    def same_image(self, other: DiskIdentity) -> bool:
        """True unless something known on both sides differs.

        An unknown inode (e.g. the checkpoint side, parsed from XML) is not held against
        the match: only the XML-visible fields are compared then.
        """
        mine = (self.source_type, self.path, self.serial, self.wwn)
        if mine != (other.source_type, other.path, other.serial, other.wwn):
            return False
        return self.inode is None or other.inode is None or self.inode == other.inode


@dataclass(frozen=True, slots=True)
class Disk:
    """One ``<disk>`` of a domain.

    ``source`` is the file or device path; ``"protocol:name"`` for a network disk (e.g.
    ``"rbd:pool/img"``); ``"pool/volume"`` for a volume; ``None`` when there is no medium.
    ``backing_chain`` lists the backing images top-down, as far as the XML shows them.
    ``identity`` is set exactly when the disk is backup-capable.
    """

    target: str
    bus: str | None
    device: str
    source_type: str
    source: str | None
    format: str | None
    alias: str | None
    serial: str | None
    wwn: str | None
    readonly: bool
    backing_chain: tuple[str, ...]
    unsupported_reason: str | None
    capacity: int | None = None
    identity: DiskIdentity | None = None

    @property
    def backup_capable(self) -> bool:
        """Whether the disk can carry a persistent bitmap (and so be backed up incrementally)."""
        return self.unsupported_reason is None

    @property
    def full_only(self) -> bool:
        """Whether the disk is backed up, but in full each time: it has no bitmap, and it
        is a writable local image of another format or a network disk."""
        reason = self.unsupported_reason
        if reason is None:
            return False
        if reason == _NETWORK_REASON:
            return True
        return reason.startswith("format-") and self.source_type in _BITMAP_SOURCE_TYPES

    @property
    def excluded_reason(self) -> str | None:
        """Why the disk is in no backup; ``None`` when it is backed up (incrementally or
        in full)."""
        return None if self.backup_capable or self.full_only else self.unsupported_reason

    @property
    def writable(self) -> bool:
        """Whether the guest can change what the disk holds (a disk the agent leaves out
        of backups for another reason then holds data that is in no backup)."""
        return (
            self.device in ("disk", "lun")
            and not self.readonly
            and self.source is not None
            and self.unsupported_reason != "transient-disk"
        )

    def with_capacity(self, capacity: int | None) -> Disk:
        """A copy with the capacity in bytes (libvirt reports it, the XML does not)."""
        return replace(self, capacity=capacity)

    def with_inode(self, inode: tuple[int, int] | None) -> Disk:
        """A copy whose identity carries ``inode``.

        Raises ``ValueError`` when the disk has no identity (it is not backup-capable),
        since an inode there would be silently lost.
        """
        if self.identity is None:
            if inode is None:
                return self
            raise ValueError(f"disk {self.target} is not backup-capable and has no identity")
        return replace(self, identity=replace(self.identity, inode=inode))


@dataclass(frozen=True, slots=True)
class DomainInfo:
    """A domain and its disks, as known at one moment."""

    uuid: str
    name: str
    persistent: bool
    state: DomainState
    disks: tuple[Disk, ...]

    def disk(self, target: str) -> Disk | None:
        """The disk on ``target`` (e.g. ``"vda"``), or ``None``."""
        return next((d for d in self.disks if d.target == target), None)

    @property
    def backup_disks(self) -> tuple[Disk, ...]:
        """The backup-capable disks, in document order."""
        return tuple(d for d in self.disks if d.backup_capable)

    @property
    def backed_up_disks(self) -> tuple[Disk, ...]:
        """The disks a backup copies (with a bitmap or in full), in document order."""
        return tuple(d for d in self.disks if d.excluded_reason is None)


def parse_disks(domain_xml: str | bytes, *, domain: str | None = None) -> tuple[Disk, ...]:
    """Every ``<devices><disk>`` of a ``<domain>`` or ``<domaincheckpoint>``, in order.

    ``domain`` names the domain in errors; by default the XML's ``<name>`` is used.
    Raises :class:`InventoryError` for malformed XML or a disk without a target.
    """
    element = _domain_element(domain_xml, domain)
    return _parse_devices(element, domain or _child_text(element, "name"))


def parse_domain(domain_xml: str | bytes, *, persistent: bool, state: DomainState) -> DomainInfo:
    """A :class:`DomainInfo` from the XML plus the facts libvirt reports outside it."""
    element = _domain_element(domain_xml, None)
    name = _child_text(element, "name")
    if name is None:
        raise InventoryError("domain XML has no <name>")
    uuid = _child_text(element, "uuid")
    if uuid is None:
        raise InventoryError("domain XML has no <uuid>", domain=name)
    return DomainInfo(
        uuid=uuid,
        name=name,
        persistent=persistent,
        state=state,
        disks=_parse_devices(element, name),
    )


def probe_inode(identity: DiskIdentity) -> tuple[int, int] | None:
    """BLOCKING: stat the disk's path; ``None`` if it does not exist.

    A block device gives ``(0, st_rdev)``: its node in /dev gets a new inode whenever udev
    recreates it, while the device number stays. Anything else gives ``(st_dev, st_ino)``.
    The choice follows what the path is, not ``identity.source_type``. Other ``OSError``
    (e.g. permission denied) propagates: the caller should not mistake it for "gone".
    """
    try:
        st = os.stat(identity.path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISBLK(st.st_mode):
        return (0, st.st_rdev)
    return (st.st_dev, st.st_ino)


def _domain_element(domain_xml: str | bytes, domain: str | None) -> etree._Element:
    root = parse_xml(domain_xml, domain)
    if root.tag == "domain":
        return root
    if root.tag == "domaincheckpoint":
        inner = root.find("domain")
        if inner is None:
            # libvirt omits it when asked with VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN.
            raise InventoryError("checkpoint XML has no <domain>", domain=domain)
        return inner
    raise InventoryError(
        f"expected <domain> or <domaincheckpoint>, got <{root.tag}>", domain=domain
    )


def parse_xml(domain_xml: str | bytes, domain: str | None) -> etree._Element:
    """Domain (or checkpoint) XML parsed safely; InventoryError if it is not well-formed."""
    # lxml refuses str input that carries an encoding declaration; libvirt emits UTF-8.
    data = domain_xml.encode("utf-8") if isinstance(domain_xml, str) else domain_xml
    # Saved checkpoint XML is read back from storage we do not fully control: never read
    # files or the network on its behalf, nor expand entities (billion laughs).
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )
    try:
        root: etree._Element = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise InventoryError(f"domain XML is not well-formed: {exc}", domain=domain) from exc
    return root


def _parse_devices(element: etree._Element, domain: str | None) -> tuple[Disk, ...]:
    devices = element.find("devices")
    if devices is None:
        return ()
    return tuple(_parse_disk(disk, domain) for disk in devices.iterchildren("disk"))


def _parse_disk(element: etree._Element, domain: str | None) -> Disk:
    target, bus = _target(element, domain)
    # libvirt's defaults when the attributes are absent.
    source_type = element.get("type", "file")
    device = element.get("device", "disk")
    source = _source_locator(source_type, element.find("source"))
    driver = element.find("driver")
    image_format = driver.get("type") if driver is not None else None
    alias = element.find("alias")
    serial = _child_text(element, "serial")
    wwn = _child_text(element, "wwn")
    readonly = element.find("readonly") is not None
    reason = _unsupported_reason(
        device=device,
        readonly=readonly,
        source=source,
        source_type=source_type,
        image_format=image_format,
        transient=element.find("transient") is not None,
        shareable=element.find("shareable") is not None,
    )
    identity = None
    if reason is None and source is not None:
        identity = DiskIdentity(source_type=source_type, path=source, serial=serial, wwn=wwn)
    return Disk(
        target=target,
        bus=bus,
        device=device,
        source_type=source_type,
        source=source,
        format=image_format,
        alias=alias.get("name") if alias is not None else None,
        serial=serial,
        wwn=wwn,
        readonly=readonly,
        backing_chain=_backing_chain(element),
        unsupported_reason=reason,
        identity=identity,
    )


def _target(disk: etree._Element, domain: str | None) -> tuple[str, str | None]:
    target = disk.find("target")
    dev = None if target is None else target.get("dev")
    if target is None or not dev:
        raise InventoryError("a <disk> has no <target dev=...>", domain=domain)
    return dev, target.get("bus")


def _unsupported_reason(
    *,
    device: str,
    readonly: bool,
    source: str | None,
    source_type: str,
    image_format: str | None,
    transient: bool,
    shareable: bool,
) -> str | None:
    # Ordered by precedence (see the module docstring); the first failed check wins.
    checks = (
        (device != "disk", f"device-{device}"),
        (readonly, "readonly"),
        (source is None, "source-empty"),
        (transient, "transient-disk"),
        (shareable, "shareable"),
        (source_type not in _BITMAP_SOURCE_TYPES, f"source-{source_type}"),
        (image_format != _BITMAP_FORMAT, f"format-{image_format or 'unknown'}"),
    )
    return next((reason for failed, reason in checks if failed), None)


def _backing_chain(disk: etree._Element) -> tuple[str, ...]:
    chain: list[str] = []
    store = disk.find("backingStore")
    while store is not None:
        locator = _source_locator(store.get("type", "file"), store.find("source"))
        if locator is None:
            # An empty <backingStore/> marks the end of the chain.
            break
        chain.append(locator)
        store = store.find("backingStore")
    return tuple(chain)


def _source_locator(source_type: str, source: etree._Element | None) -> str | None:
    if source is None:
        return None
    special = _SPECIAL_LOCATORS.get(source_type)
    if special is not None:
        return special(source)
    if source_type in _PATH_ATTRIBUTE:
        attributes: tuple[str, ...] = (_PATH_ATTRIBUTE[source_type],)
    else:
        attributes = _ANY_PATH_ATTRIBUTES
    return next((value for name in attributes if (value := source.get(name))), None)


def _network_locator(source: etree._Element) -> str | None:
    protocol = source.get("protocol")
    if not protocol:
        return None
    name = source.get("name")
    if name:
        return f"{protocol}:{name}"
    # Some protocols (nbd) may name only a server; that is still a medium.
    host = source.find("host")
    if host is not None and (server := host.get("name") or host.get("socket")):
        port = host.get("port")
        return f"{protocol}://{server}:{port}" if port else f"{protocol}://{server}"
    return None


def _volume_locator(source: etree._Element) -> str | None:
    pool, volume = source.get("pool"), source.get("volume")
    return f"{pool}/{volume}" if pool and volume else None


def _nvme_locator(source: etree._Element) -> str | None:
    address = source.find("address")
    if address is None:
        return None
    pci = ":".join(address.get(part, "?") for part in ("domain", "bus", "slot"))
    return f"{pci}.{address.get('function', '?')}/ns{source.get('namespace', '?')}"


_SPECIAL_LOCATORS: dict[str, Callable[[etree._Element], str | None]] = {
    "network": _network_locator,
    "volume": _volume_locator,
    "nvme": _nvme_locator,
}


def _child_text(element: etree._Element, tag: str) -> str | None:
    child = element.find(tag)
    # An empty element says nothing; treat it like an absent one.
    return child.text if child is not None and child.text else None


def _escape(value: str) -> str:
    return "".join(c if c.isprintable() and c not in "%|" else quote(c, safe="") for c in value)


def _parse_inode(text: str, key: str) -> tuple[int, int]:
    dev, _, ino = text.partition(":")
    try:
        return (int(dev), int(ino))
    except ValueError as exc:
        raise InventoryError(f"malformed inode in disk identity key {key!r}") from exc
