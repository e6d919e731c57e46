"""Start, kill and restart the host's libvirtd (and virtlogd) for the real-libvirt tests.

The machines this runs on have no systemd, so nobody socket-activates the daemons: the
test bed starts them itself (``libvirtd -d``/``virtlogd -d``) and fails loudly when it
cannot. Killing libvirtd does not kill running QEMU processes; a restarted libvirtd
reconnects to them, which is what the agent's reconnect tests rely on.

Everything here is synchronous; async tests call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import libvirt

URI = "qemu:///system"
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")
VIRTLOGD_PIDFILE = Path("/run/virtlogd.pid")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
# A daemonised libvirtd without journald logs here; its tail is the best failure hint.
LIBVIRTD_LOG = Path("/var/log/libvirt/libvirtd.log")
VIRTLOGD_LOG = Path("/var/log/libvirt/virtlogd.log")

_POLL = 0.05


def _alive(pid: int, comm: str) -> bool:
    """True if ``pid`` runs and is named ``comm``.

    A zombie counts as dead: PID 1 in these containers may reap late, and a killed daemon
    can linger as ``<defunct>`` although it holds no sockets or locks any more. The name
    check guards against a stale pid file pointing at a recycled pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # Format is "pid (comm) state ..."; comm may hold spaces, so split at the last ')'.
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    state = stat[stat.rindex(")") + 2 :].split(" ", 1)[0]
    return name == comm[:15] and state not in ("Z", "X")


def _pid_from(pidfile: Path, comm: str) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid, comm) else None


def libvirtd_pid() -> int | None:
    """Pid of the running libvirtd according to its pid file, or None if it is not alive."""
    return _pid_from(LIBVIRTD_PIDFILE, "libvirtd")


def virtlogd_pid() -> int | None:
    """Pid of the running virtlogd according to its pid file, or None if it is not alive."""
    return _pid_from(VIRTLOGD_PIDFILE, "virtlogd")


def can_connect(uri: str = URI) -> bool:
    """True if a libvirt connection to ``uri`` can be opened and answers a call."""
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    try:
        conn.getLibVersion()
        return True
    except libvirt.libvirtError:
        return False
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def _spawn_daemon(argv: list[str]) -> str:
    """Run ``argv`` (a ``-d`` daemon) and return its stderr+stdout; raise if it failed.

    Output goes to a temporary file, not a pipe: a daemonised child that kept the pipe
    open would make us wait forever for EOF.
    """
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=30, check=False
            )
        except FileNotFoundError as exc:
            raise RuntimeError(
                f"{argv[0]} is not installed (run scripts/host-setup.sh): {exc}"
            ) from exc
        out.seek(0)
        text = out.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {text}")
    return text


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)


def start_virtlogd(timeout: float = 30) -> None:
    """Start virtlogd unless it runs; libvirtd hands QEMU's stdout/stderr to it."""
    if virtlogd_pid() is not None:
        return
    output = _spawn_daemon(["virtlogd", "-d"])
    if not wait_until(lambda: virtlogd_pid() is not None and VIRTLOGD_SOCKET.exists(), timeout):
        raise RuntimeError(
            f"virtlogd did not come up within {timeout:g}s (output: {output!r}); "
            f"tail of {VIRTLOGD_LOG}:\n{_tail(VIRTLOGD_LOG)}"
        )


def start_libvirtd(timeout: float = 30) -> None:
    """Start libvirtd (and virtlogd first) and wait until ``URI`` is connectable."""
    start_virtlogd(timeout)
    output = ""
    if libvirtd_pid() is None:
        output = _spawn_daemon(["libvirtd", "-d"])
    if not wait_until(can_connect, timeout):
        raise RuntimeError(
            f"libvirtd did not accept connections on {URI} within {timeout:g}s "
            f"(pid {libvirtd_pid()}, output: {output!r}); tail of {LIBVIRTD_LOG}:\n"
            f"{_tail(LIBVIRTD_LOG)}\n(is /etc/libvirt/qemu.conf set up by "
            "scripts/host-setup.sh?)"
        )


def ensure_libvirtd(timeout: float = 30) -> None:
    """Return at once if ``URI`` is connectable, else start the daemons; RuntimeError on failure."""
    if can_connect():
        # libvirtd answers, but domains cannot start without virtlogd behind it.
        start_virtlogd(timeout)
        return
    start_libvirtd(timeout)


def _kill_and_wait(pid: int, comm: str, sig: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    if not wait_until(lambda: not _alive(pid, comm), timeout):
        raise RuntimeError(f"{comm} (pid {pid}) still alive {timeout:g}s after signal {sig}")


def kill_libvirtd(sig: int = signal.SIGKILL, timeout: float = 30) -> None:
    """Signal libvirtd (by the pid in its pid file) and wait until it is gone.

    A SIGKILLed libvirtd leaves its pid file behind; it is removed so that
    :func:`libvirtd_pid` and a later start see a clean state. Running QEMU domains survive.
    """
    pid = libvirtd_pid()
    if pid is None:
        raise RuntimeError(f"libvirtd is not running (no live pid in {LIBVIRTD_PIDFILE})")
    _kill_and_wait(pid, "libvirtd", sig, timeout)
    # Only remove the pid file if it still names the process we killed.
    with contextlib.suppress(FileNotFoundError, ValueError):
        if int(LIBVIRTD_PIDFILE.read_text().strip()) == pid:
            LIBVIRTD_PIDFILE.unlink()


def stop_virtlogd(timeout: float = 30) -> None:
    """SIGTERM virtlogd and wait until it is gone (no-op if it does not run)."""
    pid = virtlogd_pid()
    if pid is not None:
        _kill_and_wait(pid, "virtlogd", signal.SIGTERM, timeout)


def restart_libvirtd(sig: int = signal.SIGKILL, timeout: float = 30) -> None:
    """Kill libvirtd with ``sig`` (if it runs) and start it again; existing connections die."""
    if libvirtd_pid() is not None:
        kill_libvirtd(sig, timeout)
    start_libvirtd(timeout)


def live_processes_mentioning(text: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found
