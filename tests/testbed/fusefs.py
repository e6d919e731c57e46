"""A passthrough FUSE filesystem in its own process, to make a mount hang on purpose.

``python -m tests.testbed.fusefs SOURCE MOUNTPOINT`` serves ``SOURCE`` at ``MOUNTPOINT``
(mfusepy on libfuse 3, in the foreground) until it is unmounted. Every request on the
mount is answered by that process, so SIGSTOP to it makes every call on the mount wait,
like an NFS mount whose server went away; SIGCONT answers them all.

:func:`passthrough_mount` starts it, waits until the mount is there, and at the end always
resumes the server, unmounts (lazily, so that a caller still inside cannot stop it),
aborts the FUSE connection if anything still hangs, and stops the process by its own pid.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


class Passthrough:
    """Every operation on ``root``'s tree, as the kernel would do it on ``root`` itself."""

    use_ns = True

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    # -- metadata --------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None else os.lstat(self._full(path))
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_ino")
        attrs: dict[str, Any] = {k: getattr(st, k) for k in keys}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._full(path), amode):
            raise OSError(errno.EACCES, "access denied")
        return 0

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._full(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._full(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        if times is None:
            os.utime(self._full(path))
        else:
            os.utime(self._full(path), ns=times)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._full(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files")
        return {
            **{k: getattr(st, k) for k in keys},
            "f_frsize": st.f_frsize,
            "f_namemax": st.f_namemax,
            "f_flag": st.f_flag,
        }

    def readlink(self, path: str) -> str:
        return os.readlink(self._full(path))

    # -- directories -----------------------------------------------------------------

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._full(path))]

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._full(path), mode)
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._full(path))
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        fd = os.open(self._full(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0

    # -- names -----------------------------------------------------------------------

    def unlink(self, path: str) -> int:
        os.unlink(self._full(path))
        return 0

    def rename(self, old: str, new: str) -> int:
        os.rename(self._full(old), self._full(new))
        return 0

    def link(self, target: str, source: str) -> int:
        os.link(self._full(source), self._full(target))
        return 0

    def symlink(self, target: str, source: str) -> int:
        os.symlink(source, self._full(target))
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        os.mknod(self._full(path), mode, dev)
        return 0

    # -- files -----------------------------------------------------------------------

    # O_DIRECT is not passed on: this server reads and writes through Python's buffers,
    # which are aligned only by chance, so that a file it opened O_DIRECT would fail
    # some calls with EINVAL and pass others (qemu's alignment probe among them). What
    # the kernel asked for direct stays direct up to this server.

    def open(self, path: str, flags: int) -> int:
        return os.open(self._full(path), flags & ~os.O_DIRECT)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        return os.open(self._full(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._full(path), length)
        return 0

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        if mode:
            raise OSError(errno.EOPNOTSUPP, "only plain fallocate")
        os.posix_fallocate(fh, offset, size)
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        (os.fdatasync if datasync else os.fsync)(fh)
        return 0

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0


class FuseServer:
    """The server process of one passthrough mount."""

    def __init__(self, proc: subprocess.Popen[bytes], mountpoint: Path, log: Path) -> None:
        self.proc = proc
        self.mountpoint = mountpoint
        self.log = log

    def hang(self) -> None:
        """Every call on the mount waits from now on (until :meth:`resume`).

        Returns once every thread of the server is stopped: SIGSTOP takes effect in each
        thread only as it next returns from the kernel, and a loaded machine can let a
        few more calls through in between.
        """
        os.kill(self.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not _all_stopped(self.proc.pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"the FUSE server {self.proc.pid} did not stop")
            time.sleep(0.001)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


def _all_stopped(pid: int) -> bool:
    """Every thread of ``pid`` in the stopped state (``T``)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            stat = (task / "stat").read_text()
            if stat[stat.rindex(")") + 2] not in "Tt":
                return False
    return True


def _mounted(mountpoint: Path) -> bool:
    # /proc/self/mounts, not os.path.ismount: stat on a hung mount would hang too.
    target = str(mountpoint)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def _abort_connections(mountpoint: Path) -> None:
    """Abort the FUSE connection of ``mountpoint``: every waiting call fails (ENOTCONN)."""
    device = None
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            if fields[4] == str(mountpoint):
                device = fields[2].split(":")[1]  # the connection is named by minor
    if device is not None:
        with contextlib.suppress(OSError):
            Path(f"/sys/fs/fuse/connections/{device}/abort").write_text("1")


@contextlib.contextmanager
def passthrough_mount(source: Path, mountpoint: Path, log: Path) -> Iterator[FuseServer]:
    """``source`` served at ``mountpoint`` by a FUSE server process, inside the block."""
    source.mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.testbed.fusefs", str(source), str(mountpoint)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = FuseServer(proc, mountpoint, log)
    try:
        deadline = time.monotonic() + 15
        while not _mounted(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"the FUSE server did not mount {mountpoint}: {log.read_text(errors='replace')}"
                )
            time.sleep(0.05)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.resume()
        if _mounted(mountpoint):
            _abort_connections(mountpoint)
            subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def main() -> None:
    import mfusepy  # type: ignore[import-untyped]  # noqa: PLC0415 - the server process only

    source, mountpoint = sys.argv[1], sys.argv[2]

    class Served(Passthrough, mfusepy.Operations):  # type: ignore[misc]
        pass

    mfusepy.FUSE(Served(source), mountpoint, foreground=True, allow_other=True)


if __name__ == "__main__":
    main()
