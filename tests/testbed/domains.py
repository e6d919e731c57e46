"""Throw-away libvirt/QEMU domains for the real-libvirt tests.

``make_domain`` builds a minimal q35 guest (64 MiB, 1 vCPU, no OS, no graphics) whose
disks are fresh images in a per-domain work directory. A disk (:class:`DiskSpec`) is an
image file (qcow2 or raw), a raw file behind a loop device (``kind="block"``), or a raw
file served by a ``qemu-nbd`` of the bed over a Unix socket (``kind="nbd"``); it may be
read-only, or a CD-ROM with a raw medium. ``TestDomain`` then lets a test write known
patterns into a disk *through QEMU* (HMP ``qemu-io``), hot-plug SCSI disks, crash QEMU,
and recreate the domain. ``TestDomain.cleanup`` removes everything the bed made (the
domain, its loop devices, its qemu-nbd servers, its files), tolerating a domain that is
already gone, and touches only what it created: the domain found by its own UUID (name
checked, name prefixed ``lbat-``), each loop device by its recorded path (backing file
checked), each qemu-nbd by the pid of the child process it started.

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

# A Unix socket's path must fit sockaddr_un.sun_path (108 bytes with the NUL).
_SUN_PATH_MAX = 107

DiskBus = Literal["virtio", "scsi", "sata"]
DiskFormat = Literal["qcow2", "raw"]
DiskKind = Literal["file", "block", "nbd"]
DiskDevice = Literal["disk", "cdrom"]


@dataclass(frozen=True)
class DiskSpec:
    """One disk of a test domain: guest target, bus, virtual size, format and backing.

    ``kind`` says what QEMU opens: ``"file"`` an image file (``format`` qcow2, the
    default, or raw); ``"block"`` a loop device over a raw file; ``"nbd"`` an NBD export
    of a raw file, served by a qemu-nbd of the bed on a Unix socket. ``device="cdrom"``
    makes a CD-ROM (bus sata or scsi) whose medium is a raw file of ``size`` bytes; a
    CD-ROM is always read-only. ``readonly`` gives the disk ``<readonly/>``.

    ``format`` left as None becomes qcow2 for a file disk and raw for everything else
    (block and nbd disks are raw only); after construction it is always set.
    """

    target: str = "vda"
    bus: DiskBus = "virtio"
    size: int = 64 * MiB
    format: DiskFormat | None = None
    kind: DiskKind = "file"
    device: DiskDevice = "disk"
    readonly: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("file", "block", "nbd"):
            raise ValueError(f"disk {self.target}: unknown kind {self.kind!r}")
        if self.device not in ("disk", "cdrom"):
            raise ValueError(f"disk {self.target}: unknown device {self.device!r}")
        if self.kind != "file" and self.format not in (None, "raw"):
            raise ValueError(f"disk {self.target}: a {self.kind} disk is raw, not {self.format}")
        if self.device == "cdrom" and self.bus not in ("sata", "scsi"):
            raise ValueError(f"cdrom {self.target}: bus must be sata or scsi, not {self.bus}")
        if self.format is None:
            default: DiskFormat = (
                "qcow2" if self.kind == "file" and self.device == "disk" else "raw"
            )
            object.__setattr__(self, "format", default)
        if self.device == "cdrom":
            object.__setattr__(self, "readonly", True)

    @property
    def image_format(self) -> DiskFormat:
        """The format of the disk's data (``format``, typed as always set)."""
        return self.format or "qcow2"

    @property
    def file_name(self) -> str:
        """Name of the file in the work dir that holds the disk's data."""
        return f"{self.target}.{self.image_format}"


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


# -- loop devices (kind="block") ---------------------------------------------------------


def _losetup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["losetup", *args], capture_output=True, text=True, check=False)


def attach_loop(path: Path) -> str:
    """Attach ``path`` to a free loop device (``losetup --find --show``); its /dev path."""
    proc = _losetup("--find", "--show", str(path))
    dev = proc.stdout.strip()
    if proc.returncode != 0 or not dev.startswith("/dev/loop"):
        raise RuntimeError(f"losetup --find --show {path} failed: {proc.stderr.strip()}")
    return dev


def loop_devices_of(path: Path) -> list[str]:
    """Loop devices whose backing file is ``path`` (``losetup -j``), e.g. ['/dev/loop3']."""
    proc = _losetup("--associated", str(path), "--noheadings", "--output", "NAME", "--list")
    if proc.returncode != 0:
        raise RuntimeError(f"losetup -j {path} failed: {proc.stderr.strip()}")
    return proc.stdout.split()


def loop_backing_file(dev: str) -> str | None:
    """The backing file of loop device ``dev`` as the kernel names it; None if it is free."""
    proc = _losetup("--noheadings", "--output", "BACK-FILE", "--list", dev)
    back = proc.stdout.strip()
    return back if proc.returncode == 0 and back else None


def _maps(dev: str, backing: Path) -> bool:
    """True if loop device ``dev`` is attached to the file ``backing``."""
    if backing.exists():
        return dev in loop_devices_of(backing)  # by device and inode
    back = loop_backing_file(dev)  # file gone: by the name the kernel kept
    return back is not None and back.removesuffix(" (deleted)") == os.path.realpath(backing)


def detach_loop(dev: str, backing: Path, timeout: float = 5) -> None:
    """Detach loop device ``dev`` if it (still) maps ``backing``; else leave it alone.

    The backing file is checked first, so a device that was freed and then taken by
    someone else is never detached. RuntimeError if the device still maps ``backing``
    after ``timeout`` (the kernel defers the detach while someone, e.g. a QEMU that
    would not die, holds the device open).
    """
    if not _maps(dev, backing):
        return
    proc = _losetup("--detach", dev)
    if proc.returncode != 0:
        raise RuntimeError(f"losetup -d {dev} ({backing}) failed: {proc.stderr.strip()}")
    if not wait_until(lambda: not _maps(dev, backing), timeout):
        raise RuntimeError(f"{dev} still maps {backing} {timeout:g}s after losetup -d (busy?)")


# -- qemu-nbd servers (kind="nbd") -----------------------------------------------------------


@dataclass(eq=False)
class NbdServer:
    """A ``qemu-nbd`` child process serving one raw file as export ``export`` on ``socket``."""

    path: Path
    socket: Path
    export: str
    process: subprocess.Popen[bytes] = field(repr=False)
    log: Path

    @property
    def pid(self) -> int:
        """The qemu-nbd's pid (our child: it cannot be recycled before we reap it)."""
        return self.process.pid

    def alive(self) -> bool:
        """True while the qemu-nbd runs."""
        return self.process.poll() is None

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the qemu-nbd (SIGKILL after ``timeout``) and reap it; idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def start_nbd_server(path: Path, socket: Path, export: str, timeout: float = 10) -> NbdServer:
    """Start ``qemu-nbd`` serving raw ``path`` on Unix ``socket``; return once it listens.

    The server is persistent (it outlives client disconnects, so a domain may be
    destroyed and recreated) and takes up to four clients. Its output goes to
    ``<socket>.log``. RuntimeError, with that log, if it does not come up in time.
    """
    if len(os.fsencode(socket)) > _SUN_PATH_MAX:
        raise ValueError(f"NBD socket path too long for a Unix socket: {socket}")
    log = socket.with_name(socket.name + ".log")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                "qemu-nbd",
                "--persistent",
                "--shared=4",
                "--format=raw",
                "--discard=unmap",
                f"--socket={socket}",
                f"--export-name={export}",
                str(path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C of the test run must not kill it before cleanup.
            start_new_session=True,
        )
    server = NbdServer(path=path, socket=socket, export=export, process=process, log=log)
    wait_until(lambda: socket.is_socket() or not server.alive(), timeout)
    if not server.alive() or not socket.is_socket():
        server.stop()
        raise RuntimeError(
            f"qemu-nbd for {path} not listening on {socket} within {timeout:g}s "
            f"(exit {process.returncode}): {log.read_text(errors='replace').strip()}"
        )
    return server


# -- domain XML ---------------------------------------------------------------------------


def _disk_xml(spec: DiskSpec, source: Path | NbdServer) -> ET.Element:
    """The ``<disk>`` of ``spec``; ``source`` is the image file, the loop device (block)
    or the NBD server (nbd)."""
    disk = ET.Element("disk", type="network" if spec.kind == "nbd" else spec.kind)
    disk.set("device", spec.device)
    driver = ET.SubElement(disk, "driver", name="qemu", type=spec.image_format)
    if not spec.readonly:
        # Discards reach the image (QEMU ignores them by default): tests discard on purpose.
        driver.set("discard", "unmap")
    if isinstance(source, NbdServer):
        if spec.kind != "nbd":
            raise ValueError(f"disk {spec.target}: an NBD source for a {spec.kind} disk")
        src = ET.SubElement(disk, "source", protocol="nbd", name=source.export)
        ET.SubElement(src, "host", transport="unix", socket=str(source.socket))
    elif spec.kind == "nbd":
        raise ValueError(f"disk {spec.target}: an nbd disk needs an NbdServer source")
    elif spec.kind == "block":
        ET.SubElement(disk, "source", dev=str(source))
    else:
        ET.SubElement(disk, "source", file=str(source))
    ET.SubElement(disk, "target", dev=spec.target, bus=spec.bus)
    if spec.readonly:
        ET.SubElement(disk, "readonly")
    return disk


def domain_xml(name: str, uuid: str | None, disks: list[tuple[DiskSpec, Path | NbdServer]]) -> str:
    """XML of a minimal q35 guest with a virtio-scsi controller and the given disks.

    Each disk comes with its source: the image file (file), the loop device (block) or
    the NBD server (nbd). q35 has a SATA controller of its own for sata CD-ROMs.
    """
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
    for spec, source in disks:
        devices.append(_disk_xml(spec, source))
    # No <graphics> at all: <graphics type='none'/> is rejected by libvirt.
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(root, encoding="unicode")


def _is_no_domain(exc: libvirt.libvirtError) -> bool:
    return bool(exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN)


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

    ``disk_paths`` maps every target to the file holding its data: the image, the loop
    device's backing file (block) or the file qemu-nbd serves (nbd). ``block_devices``
    maps block targets to their loop device (``/dev/loopN``), ``nbd_servers`` nbd targets
    to their :class:`NbdServer`; both stay until :meth:`cleanup` releases them.
    """

    __test__: ClassVar[bool] = False  # not a pytest test class despite its name
    name_prefix: ClassVar[str] = NAME_PREFIX
    """The only names :meth:`cleanup` touches (a benchmark's domains have their own)."""

    name: str
    uuid: str
    xml: str
    disk_paths: dict[str, Path]
    persistent: bool
    conn: libvirt.virConnect
    workdir: Path
    block_devices: dict[str, str] = field(default_factory=dict)
    nbd_servers: dict[str, NbdServer] = field(default_factory=dict)
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
        return self._qemu_io_sequence(target, [command], done, allow=allow)

    def _qemu_io_sequence(
        self, target: str, commands: list[str], done: str, *, allow: tuple[str, ...] = ()
    ) -> str:
        """:meth:`qemu_io` for several commands in a row, all checked, ``done`` after the last."""
        device = self._qemu_io_device(target)
        command = "; ".join(commands)  # for messages
        with self._lock:  # one command at a time, so outputs cannot interleave in the log
            start = self.log_path.stat().st_size if self.log_path.exists() else 0
            for one in commands:
                reply = self.hmp(f'qemu-io -d {device} "{one}"').strip()
                if reply:
                    raise RuntimeError(f"qemu-io {one!r} on {self.name}/{target}: {reply}")
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

    def flush(self, target: str) -> None:
        """Flush the disk's write cache through QEMU, as a guest's fsync would.

        QEMU caches a block disk's writes in the host page cache of its loop device, so
        they reach the backing file only on a flush or when QEMU closes the device; after
        this the backing file can be checked while the domain runs. (File and nbd disks
        need no flush for that.) ``flush`` prints nothing on success, so a one-sector read
        follows as the marker that qemu-io is done and reported no error.
        """
        self._qemu_io_sequence(target, ["flush", "read 0 512"], "read 512/512 bytes at offset 0")

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

    def stop_nbd(self, target: str) -> None:
        """Stop (and reap) the qemu-nbd serving ``target``, e.g. to fail the disk under QEMU.

        The record stays in ``nbd_servers`` (stopped), so a test can still check its pid;
        the domain cannot be started again with that disk.
        """
        self.nbd_servers[target].stop()

    def _release_disks(self, errors: list[str]) -> None:
        """Stop our qemu-nbd servers and detach our loop devices, collecting failures."""
        for target, server in self.nbd_servers.items():
            try:
                server.stop()
            except Exception as exc:  # collected and re-raised by cleanup
                errors.append(f"stop qemu-nbd {server.pid} of {target}: {exc}")
        for target, dev in list(self.block_devices.items()):
            backing = self.disk_paths.get(target, self.workdir / f"{target}.raw")
            try:
                detach_loop(dev, backing)
                del self.block_devices[target]
            except Exception as exc:  # collected and re-raised by cleanup
                errors.append(f"detach {dev} of {target}: {exc}")

    def cleanup(self) -> None:
        """Destroy and undefine the domain, release its loop devices and qemu-nbd servers
        and delete its files; tolerant of partial state (e.g. a domain already gone).

        Every step is attempted even if an earlier one failed; failures are raised together
        at the end so teardown is loud but complete.
        """
        errors: list[str] = []
        if self.name.startswith(self.name_prefix):
            for step in (self.destroy, self.undefine):
                try:
                    step()
                except Exception as exc:  # collected and re-raised below
                    errors.append(f"{step.__name__}: {exc}")
            for log in QEMU_LOG_DIR.glob(f"{self.name}.log*"):
                with contextlib.suppress(FileNotFoundError):
                    log.unlink()
        else:
            errors.append(f"refusing to touch {self.name!r}: no {self.name_prefix} prefix")
        # After destroy, so QEMU has let go; whatever the domain's fate, these are ours.
        self._release_disks(errors)
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

    Block disks get a loop device and nbd disks a qemu-nbd (socket
    ``<workdir>/nbd-<target>.sock``, export named after the target), each recorded in the
    ``TestDomain`` as soon as it exists. The domain is appended to ``registry`` *before*
    anything is created, so a fixture can clean up even when creation fails half-way;
    without a registry a failed creation cleans up after itself. A transient domain is
    always started (``start`` is ignored). If ``conn`` no longer answers (libvirtd was
    restarted), a fresh connection is used.
    """
    if len({d.target for d in disks}) != len(disks):
        raise ValueError(f"duplicate disk targets in {disks}")
    name = new_name()
    workdir = tmp_dir / name
    paths = {d.target: workdir / d.file_name for d in disks}
    td = TestDomain(
        name=name,
        uuid=str(uuidlib.uuid4()),
        xml="",  # set once the disks' sources exist
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
        sources: list[tuple[DiskSpec, Path | NbdServer]] = []
        for d in disks:
            path = create_image(paths[d.target], d.size, d.image_format)
            source: Path | NbdServer = path
            if d.kind == "block":
                td.block_devices[d.target] = attach_loop(path)
                source = Path(td.block_devices[d.target])
            elif d.kind == "nbd":
                socket = workdir / f"nbd-{d.target}.sock"
                td.nbd_servers[d.target] = start_nbd_server(path, socket, d.target)
                source = td.nbd_servers[d.target]
            sources.append((d, source))
        xml = td.xml = domain_xml(name, td.uuid, sources)
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
