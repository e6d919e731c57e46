"""Throw-away libvirt/QEMU domains for the real-libvirt tests.

``make_domain`` builds a minimal q35 guest (64 MiB, 1 vCPU, no OS, no graphics) whose
disks are fresh images in a per-domain work directory. ``TestDomain`` then lets a test
write known patterns into a disk *through QEMU* (HMP ``qemu-io``), hot-plug SCSI disks,
crash QEMU, and recreate the domain. ``TestDomain.cleanup`` removes everything the bed
made, tolerating a domain that is already gone, and touches only domains it created
(found by its own UUID, name checked, name prefixed ``lbat-``).

Everything here is synchronous; async tests call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Protocol

import libvirt
import libvirt_qemu

from .daemon import URI, wait_until

MiB = 1024 * 1024
NAME_PREFIX = "lbat-"
EMULATOR = "/usr/bin/qemu-system-x86_64"
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
QEMU_RUN_DIR = Path("/run/libvirt/qemu")
# read_guest parses qemu-io's hex dump (~5 bytes of log per guest byte) from the domain
# log; virtlogd rotates that log at 2 MiB, so keep one dump well below a rotation.
READ_GUEST_MAX = 256 * 1024
_POLL = 0.05

# qemu-io's own output lines that say a command went wrong. (Hex-dump lines are excluded
# before matching, because their ASCII column may spell anything.)
_QEMU_IO_ERROR = re.compile(r"failed|error|invalid|cannot|non-numeric|not found", re.I)
_HEXDUMP_LINE = re.compile(r"^([0-9a-f]{8,}):  (.*)$")

DiskBus = Literal["virtio", "scsi"]
DiskFormat = Literal["qcow2", "raw"]


@dataclass(frozen=True)
class DiskSpec:
    """One disk of a test domain: its guest target, bus, virtual size and image format."""

    target: str = "vda"
    bus: DiskBus = "virtio"
    size: int = 64 * MiB
    format: DiskFormat = "qcow2"


def kvm_available() -> bool:
    """True if /dev/kvm exists and we may open it (else domains fall back to TCG)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def domain_type() -> str:
    """The libvirt ``<domain type>`` to use on this host: 'kvm' or 'qemu' (TCG)."""
    return "kvm" if kvm_available() else "qemu"


def create_image(path: Path, size: int = 64 * MiB, fmt: DiskFormat = "qcow2") -> Path:
    """Create an empty disk image with ``qemu-img create``; RuntimeError on failure."""
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"qemu-img create {path} failed: {proc.stderr.strip()}")
    return path


def image_has_pattern(
    path: Path, offset: int, length: int, byte: int, fmt: DiskFormat = "qcow2"
) -> bool:
    """True if ``length`` bytes at ``offset`` of the image all equal ``byte``.

    Reads the image offline with ``qemu-io -r`` (so the domain using it must be gone or
    paused-and-flushed: qemu-io takes the image lock and would fail otherwise).
    """
    proc = subprocess.run(
        ["qemu-io", "-f", fmt, "-r", "-c", f"read -P 0x{byte:02x} {offset} {length}", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and "Pattern verification failed" not in out:
        raise RuntimeError(f"qemu-io on {path} failed ({proc.returncode}): {out.strip()}")
    if "Pattern verification failed" in out:
        return False
    if f"read {length}/{length} bytes at offset {offset}" not in out:
        raise RuntimeError(f"unexpected qemu-io output for {path}: {out.strip()}")
    return True


def _disk_xml(spec: DiskSpec, path: Path) -> ET.Element:
    disk = ET.Element("disk", type="file", device="disk")
    # Discards reach the image (QEMU ignores them by default): tests discard on purpose.
    ET.SubElement(disk, "driver", name="qemu", type=spec.format, discard="unmap")
    ET.SubElement(disk, "source", file=str(path))
    ET.SubElement(disk, "target", dev=spec.target, bus=spec.bus)
    return disk


def domain_xml(name: str, uuid: str | None, disks: list[tuple[DiskSpec, Path]]) -> str:
    """XML of a minimal q35 guest with a virtio-scsi controller and the given disks."""
    root = ET.Element("domain", type=domain_type())
    ET.SubElement(root, "name").text = name
    if uuid is not None:
        ET.SubElement(root, "uuid").text = uuid
    ET.SubElement(root, "memory", unit="MiB").text = "64"
    ET.SubElement(root, "vcpu").text = "1"
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(root, "on_crash").text = "destroy"
    devices = ET.SubElement(root, "devices")
    ET.SubElement(devices, "emulator").text = EMULATOR
    ET.SubElement(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    for spec, path in disks:
        devices.append(_disk_xml(spec, path))
    # No <graphics> at all: <graphics type='none'/> is rejected by libvirt.
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(root, encoding="unicode")


def _is_no_domain(exc: libvirt.libvirtError) -> bool:
    return exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (PID 1 here may reap late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(")") + 2 :].split(" ", 1)[0] not in ("Z", "X")


@dataclass(eq=False)
class TestDomain:
    """A domain made by :func:`make_domain`, with the handles a test needs to drive it.

    ``conn`` may die when a test restarts libvirtd; every method then transparently opens
    a fresh connection (owned and closed by :meth:`cleanup`).
    """

    __test__: ClassVar[bool] = False  # not a pytest test class despite its name

    name: str
    uuid: str
    xml: str
    disk_paths: dict[str, Path]
    persistent: bool
    conn: libvirt.virConnect
    workdir: Path
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _owned_conns: list[libvirt.virConnect] = field(default_factory=list, repr=False)

    # -- lookup -------------------------------------------------------------------------

    def connection(self) -> libvirt.virConnect:
        """``conn`` if it still answers, else a fresh connection (e.g. after a restart)."""
        try:
            self.conn.getLibVersion()
        except libvirt.libvirtError:
            self.conn = libvirt.open(URI)
            self._owned_conns.append(self.conn)
        return self.conn

    def find(self) -> libvirt.virDomain | None:
        """The libvirt domain with our UUID and name, or None if it does not exist."""
        try:
            dom = self.connection().lookupByUUIDString(self.uuid)
        except libvirt.libvirtError as exc:
            if _is_no_domain(exc):
                return None
            raise
        # Our UUID was random; a different name means it is not ours, so never touch it.
        if dom.name() != self.name:
            raise RuntimeError(f"UUID {self.uuid} now names {dom.name()!r}, not {self.name!r}")
        return dom

    def dom(self) -> libvirt.virDomain:
        """The libvirt domain; RuntimeError if it does not exist."""
        dom = self.find()
        if dom is None:
            raise RuntimeError(f"domain {self.name} ({self.uuid}) does not exist")
        return dom

    def is_active(self) -> bool:
        """True if the domain exists and runs (or is paused)."""
        dom = self.find()
        if dom is None:
            return False
        try:
            return bool(dom.isActive())
        except libvirt.libvirtError as exc:
            # A transient domain vanishes when it stops, possibly right after find().
            if _is_no_domain(exc):
                return False
            raise

    def state(self) -> tuple[int, int] | None:
        """libvirt (state, reason), or None if the domain is gone."""
        dom = self.find()
        if dom is None:
            return None
        try:
            state, reason = dom.state()
        except libvirt.libvirtError as exc:
            if _is_no_domain(exc):
                return None
            raise
        return state, reason

    def live_xml(self) -> str:
        """The running domain's XML (with aliases); the defined XML if it is inactive."""
        return str(self.dom().XMLDesc(0))

    def inactive_xml(self) -> str:
        """The persistent definition's XML."""
        return str(self.dom().XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))

    def disk_targets(self, *, inactive: bool = False) -> list[str]:
        """Guest targets (vda, sda, ...) of all disks in the live or inactive XML."""
        root = ET.fromstring(self.inactive_xml() if inactive else self.live_xml())
        return [t.get("dev", "") for t in root.findall("./devices/disk/target")]

    def _disk_element(self, target: str, xml: str) -> ET.Element:
        for disk in ET.fromstring(xml).findall("./devices/disk"):
            tgt = disk.find("target")
            if tgt is not None and tgt.get("dev") == target:
                return disk
        raise KeyError(f"{self.name} has no disk with target {target!r}")

    def disk_alias(self, target: str) -> str:
        """QEMU device id (libvirt alias) of the disk with guest target ``target``."""
        alias = self._disk_element(target, self.live_xml()).find("alias")
        if alias is None or not alias.get("name"):
            raise RuntimeError(f"disk {target} of {self.name} has no alias (domain inactive?)")
        return alias.get("name", "")

    # -- guest I/O through QEMU -----------------------------------------------------------

    def hmp(self, command: str) -> str:
        """Run an HMP command in QEMU's monitor and return its reply."""
        return str(
            libvirt_qemu.qemuMonitorCommand(
                self.dom(), command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            )
        )

    def _qemu_io_device(self, target: str) -> str:
        disk = self._disk_element(target, self.live_xml())
        tgt = disk.find("target")
        bus = tgt.get("bus") if tgt is not None else None
        alias = self.disk_alias(target)
        # The virtio-blk-pci proxy (the alias) has no block backend; its virtio child has.
        if bus == "virtio":
            return f"/machine/peripheral/{alias}/virtio-backend"
        return alias

    @property
    def log_path(self) -> Path:
        """QEMU's stdout/stderr log for this domain (written by virtlogd)."""
        return QEMU_LOG_DIR / f"{self.name}.log"

    def _log_since(self, start: int) -> str:
        log = self.log_path
        data = log.read_bytes() if log.exists() else b""
        if len(data) < start:
            # virtlogd rotated the log (to .log.0) after we took the offset.
            rotated = log.with_name(log.name + ".0")
            old = rotated.read_bytes() if rotated.exists() else b""
            data = old[start:] + data
        else:
            data = data[start:]
        return data.decode(errors="replace")

    def qemu_io(self, target: str, command: str, done: str, *, allow: tuple[str, ...] = ()) -> str:
        """Run one qemu-io ``command`` on the disk at ``target`` inside QEMU; return its output.

        QEMU 7.2 prints HMP qemu-io output to its own stdout, not into the monitor reply,
        so the output is read from the domain log (virtlogd) until the line ``done``
        appears. Raises RuntimeError on a monitor error, on an error line from qemu-io
        (unless it contains one of ``allow``), or if ``done`` does not appear in time.
        """
        device = self._qemu_io_device(target)
        with self._lock:  # one command at a time, so outputs cannot interleave in the log
            start = self.log_path.stat().st_size if self.log_path.exists() else 0
            reply = self.hmp(f'qemu-io -d {device} "{command}"').strip()
            if reply:
                raise RuntimeError(f"qemu-io {command!r} on {self.name}/{target}: {reply}")
            output = ""
            deadline = time.monotonic() + 10
            while True:
                output = self._log_since(start)
                for line in output.splitlines():
                    if _HEXDUMP_LINE.match(line) or any(a in line for a in allow):
                        continue
                    if _QEMU_IO_ERROR.search(line):
                        raise RuntimeError(
                            f"qemu-io {command!r} on {self.name}/{target}: {line.strip()}"
                        )
                if re.search(rf"^{re.escape(done)}$", output, re.M):
                    return output
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"qemu-io {command!r} on {self.name}/{target}: no {done!r} in "
                        f"{self.log_path} within 10s; got {output!r}"
                    )
                time.sleep(_POLL)

    def write_pattern(self, target: str, offset: int, length: int, byte: int) -> None:
        """Write ``length`` bytes of ``byte`` at ``offset`` to the disk, as the guest would."""
        self.qemu_io(
            target,
            f"write -P 0x{byte:02x} {offset} {length}",
            f"wrote {length}/{length} bytes at offset {offset}",
        )

    def guest_has_pattern(self, target: str, offset: int, length: int, byte: int) -> bool:
        """True if the guest sees ``byte`` in all ``length`` bytes at ``offset``."""
        out = self.qemu_io(
            target,
            f"read -P 0x{byte:02x} {offset} {length}",
            f"read {length}/{length} bytes at offset {offset}",
            allow=("Pattern verification failed",),
        )
        return "Pattern verification failed" not in out

    def read_guest(self, target: str, offset: int, length: int) -> bytes:
        """Read ``length`` (<= 256 KiB) bytes at ``offset`` of the disk as the guest sees it."""
        if not 0 < length <= READ_GUEST_MAX:
            raise ValueError(f"read_guest length must be 1..{READ_GUEST_MAX}, got {length}")
        out = self.qemu_io(
            target, f"read -v {offset} {length}", f"read {length}/{length} bytes at offset {offset}"
        )
        chunks: dict[int, bytes] = {}
        for line in out.splitlines():
            m = _HEXDUMP_LINE.match(line)
            if m is None:
                continue
            line_off = int(m.group(1), 16)
            # The hex column ends at the double space before the ASCII column.
            hex_part = m.group(2).split("  ", 1)[0]
            if offset <= line_off < offset + length:
                chunks[line_off] = bytes.fromhex(hex_part)
        data = b"".join(chunks[k] for k in sorted(chunks))
        if len(data) != length:
            raise RuntimeError(f"read_guest parsed {len(data)} of {length} bytes from the log")
        return data

    # -- devices --------------------------------------------------------------------------

    def _affect_flags(self) -> int:
        flags = 0
        if self.is_active():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        if self.dom().isPersistent():
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        return flags

    def attach_scsi_disk(self, target: str, image_path: Path, fmt: DiskFormat = "qcow2") -> None:
        """Hot-plug ``image_path`` as SCSI disk ``target`` (live, plus config if persistent)."""
        xml = ET.tostring(
            _disk_xml(DiskSpec(target=target, bus="scsi", format=fmt), image_path),
            encoding="unicode",
        )
        self.dom().attachDeviceFlags(xml, self._affect_flags())
        self.disk_paths[target] = image_path

    def detach_disk(self, target: str, timeout: float = 10) -> None:
        """Unplug disk ``target`` (live, plus config if persistent) and wait until it is gone.

        Only SCSI disks may be unplugged live: QEMU removes them at once, whereas a virtio
        unplug waits for the guest to acknowledge, and these guests run no OS.
        """
        active = self.is_active()
        xml = self.live_xml() if active else self.inactive_xml()
        disk = self._disk_element(target, xml)
        tgt = disk.find("target")
        if active and (tgt is None or tgt.get("bus") != "scsi"):
            raise ValueError(f"live unplug of non-SCSI disk {target} would hang on the guest")
        self.dom().detachDeviceFlags(ET.tostring(disk, encoding="unicode"), self._affect_flags())
        if active and not wait_until(lambda: target not in self.disk_targets(), timeout):
            raise RuntimeError(f"disk {target} still in {self.name} {timeout:g}s after detach")
        self.disk_paths.pop(target, None)

    def create_image(self, label: str, size: int = 64 * MiB, fmt: DiskFormat = "qcow2") -> Path:
        """Create an image in this domain's work dir (removed by :meth:`cleanup`)."""
        return create_image(self.workdir / f"{label}.{fmt}", size, fmt)

    # -- lifecycle ------------------------------------------------------------------------

    def qemu_pid(self) -> int:
        """Pid of this domain's QEMU process (from libvirt's pid file, cross-checked)."""
        pid = int((QEMU_RUN_DIR / f"{self.name}.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        # Guard against a recycled pid before anyone sends it SIGKILL.
        if not any(arg.startswith(f"guest={self.name},".encode()) for arg in cmdline):
            raise RuntimeError(f"pid {pid} from the pid file is not QEMU of {self.name}")
        return pid

    def crash(self, timeout: float = 30) -> None:
        """SIGKILL QEMU and wait until libvirt reports the domain not running (or gone)."""
        pid = self.qemu_pid()
        os.kill(pid, signal.SIGKILL)
        if not wait_until(lambda: not _pid_alive(pid) and not self.is_active(), timeout):
            raise RuntimeError(f"{self.name} still active {timeout:g}s after killing QEMU {pid}")

    def destroy(self) -> None:
        """Hard-stop the domain; a no-op if it is already stopped or gone."""
        dom = self.find()
        if dom is None:
            return
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as exc:
            # It may have stopped (or vanished, if transient) between the check and destroy.
            if not _is_no_domain(exc) and exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                raise

    def undefine(self) -> None:
        """Remove the persistent definition with its checkpoint/snapshot/NVRAM metadata."""
        dom = self.find()
        if dom is None:
            return
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )
        try:
            if dom.isPersistent():
                dom.undefineFlags(flags)
        except libvirt.libvirtError as exc:
            if not _is_no_domain(exc):
                raise

    def start(self) -> None:
        """Start the (persistent, inactive) domain."""
        if not self.persistent:
            raise RuntimeError(f"{self.name} is transient; use recreate()")
        self.dom().create()

    def recreate(self, *, new_uuid: bool = False) -> None:
        """Create the domain again from its saved XML (it must be stopped / gone).

        Transient: ``createXML`` again. Persistent: undefine, define and start again. With
        ``new_uuid`` the ``<uuid>`` is dropped so libvirt picks a new one (same name), as
        when an operator recreates a VM.
        """
        if self.is_active():
            raise RuntimeError(f"{self.name} is still running; destroy() it first")
        root = ET.fromstring(self.xml)
        if new_uuid:
            for el in root.findall("uuid"):
                root.remove(el)
        xml = ET.tostring(root, encoding="unicode")
        conn = self.connection()
        if self.persistent:
            self.undefine()
            dom = conn.defineXML(xml)
            self.uuid = dom.UUIDString()
            dom.create()
        else:
            dom = conn.createXML(xml, 0)
            self.uuid = dom.UUIDString()
        if new_uuid:
            ET.SubElement(root, "uuid").text = self.uuid
            self.xml = ET.tostring(root, encoding="unicode")

    def cleanup(self) -> None:
        """Destroy and undefine the domain and delete its files; tolerant of partial state.

        Every step is attempted even if an earlier one failed; failures are raised together
        at the end so teardown is loud but complete.
        """
        errors: list[str] = []
        if self.name.startswith(NAME_PREFIX):
            for step in (self.destroy, self.undefine):
                try:
                    step()
                except Exception as exc:  # collected and re-raised below
                    errors.append(f"{step.__name__}: {exc}")
            for log in QEMU_LOG_DIR.glob(f"{self.name}.log*"):
                with contextlib.suppress(FileNotFoundError):
                    log.unlink()
        else:
            errors.append(f"refusing to touch {self.name!r}: no {NAME_PREFIX} prefix")
        shutil.rmtree(self.workdir, ignore_errors=True)
        for conn in self._owned_conns:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        self._owned_conns.clear()
        if errors:
            raise RuntimeError(f"cleanup of {self.name} failed: " + "; ".join(errors))


def new_name() -> str:
    """A fresh ``lbat-xxxxxxxx`` domain name."""
    return f"{NAME_PREFIX}{secrets.token_hex(4)}"


def make_domain(
    conn: libvirt.virConnect,
    tmp_dir: Path,
    *,
    persistent: bool,
    disks: list[DiskSpec],
    start: bool = True,
    registry: list[TestDomain] | None = None,
) -> TestDomain:
    """Create images and a (persistent or transient) test domain; start it if asked.

    The domain is appended to ``registry`` *before* anything is created, so a fixture can
    clean up even when creation fails half-way; without a registry a failed creation
    cleans up after itself. A transient domain is always started (``start`` is ignored).
    If ``conn`` no longer answers (libvirtd was restarted), a fresh connection is used.
    """
    if len({d.target for d in disks}) != len(disks):
        raise ValueError(f"duplicate disk targets in {disks}")
    name = new_name()
    workdir = tmp_dir / name
    paths = {d.target: workdir / f"{d.target}.{d.format}" for d in disks}
    xml = domain_xml(name, str(uuidlib.uuid4()), [(d, paths[d.target]) for d in disks])
    uuid = ET.fromstring(xml).findtext("uuid", "")
    td = TestDomain(
        name=name,
        uuid=uuid,
        xml=xml,
        disk_paths=dict(paths),
        persistent=persistent,
        conn=conn,
        workdir=workdir,
    )
    # A fixture's connection dies when a test restarts libvirtd; use (and own) a fresh one.
    conn = td.connection()
    if registry is not None:
        registry.append(td)
    try:
        workdir.mkdir(parents=True)
        for d in disks:
            create_image(paths[d.target], d.size, d.format)
        if persistent:
            dom = conn.defineXML(xml)
            if start:
                dom.create()
        else:
            conn.createXML(xml, 0)
    except BaseException:
        if registry is None:
            with contextlib.suppress(Exception):
                td.cleanup()
        raise
    return td


class DomainFactory(Protocol):
    """What the ``domain_factory`` fixture yields: ``make_domain`` bound to the test."""

    def __call__(
        self,
        *,
        persistent: bool = False,
        disks: list[DiskSpec] | None = None,
        start: bool = True,
    ) -> TestDomain: ...
