"""A local ``qemu-nbd`` serving one image on a Unix socket, for as long as a block runs.

The backup writes into repository images through it (qemu-nbd knows qcow2; the agent
only speaks NBD). An incremental overlay must be opened with its backing chain: qcow2
allocates whole clusters, and a write covering part of one is completed from the
backing file (with ``backing=False`` that would be zeroes). A full image has none.
The process is stopped (SIGTERM, then SIGKILL) and reaped on every way out. It is
started through ``setpriv`` (util-linux, ``[agent] setpriv``): with ``--pdeathsig
KILL``, so that if the agent itself dies (``kill -9``) the kernel stops qemu-nbd too
and no orphan keeps serving, and keeping open, files the next agent removes; and with
no capabilities and no new privileges, so that a qemu-nbd subverted by what it parses
is root only over files root owns (the repository's, all 0600 in 0700 directories),
not over the host. An empty ``setpriv`` runs qemu-nbd without it, as the operator
chose; a missing one is an error, never skipped in silence.

qemu-nbd allocates a buffer for every request and frees it once done. glibc serves
buffers above its mmap threshold (128 KiB at first) with a fresh mmap each time, whose
pages the kernel faults in and zeroes: for the backup's 2 MiB writes that was two
thirds of qemu-nbd's CPU time (1.5 of 2.3 CPU-seconds per 2 GiB, on a host whose two
cores the copy saturates). :data:`MALLOC_TUNING` keeps them in the heap instead.

Direct I/O (``--cache=none``) goes through io_uring where the host has it. With Linux
AIO (``--aio=native``), qemu-nbd's exit waited 40 to 90 ms here to tear down its AIO
context, at the end of every full backup's copy; with io_uring, 5 to 8 ms. Where
io_uring is refused (an older kernel, ``kernel.io_uring_disabled``, a seccomp profile,
a QEMU built without it), Linux AIO is used. The agent asks the kernel itself first:
QEMU 8.2 and later start with ``--aio=io_uring`` even where they cannot use it, and
fall back to a thread pool at the first request (not to Linux AIO).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from agent.core.errors import ImageError
from agent.core.logs import get_logger
from agent.core.shielding import to_completion

log = get_logger("qemu_nbd")

QEMU_NBD = "/usr/bin/qemu-nbd"
SETPRIV = "/usr/bin/setpriv"
# SIGKILL when the thread that started it ends (with the agent, if killed); no
# capabilities, now or after exec; no new privileges (setuid binaries) ever.
_GUARD_OPTIONS = (
    "--pdeathsig=KILL",
    "--no-new-privs",
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--bounding-set=-all",
    "--",
)


def setpriv_problem(path: str) -> str | None:
    """Why ``path`` (``[agent] setpriv``) cannot guard qemu-nbd, or None ("" is fine:
    the operator chose to go without)."""
    if not path:
        return None
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        return (
            f'{path} is not an executable: install util-linux, or set [agent] setpriv = "" '
            "to run qemu-nbd with root's full privileges (and outliving a killed agent)"
        )
    return None


# Asynchronous I/O modes for direct I/O, in the order tried.
_DIRECT_AIO = ("io_uring", "native")
# What qemu-nbd says when it cannot use a mode at all (``Invalid aio mode '...'`` aside).
_CANNOT_USE = {"io_uring": "Unable to use io_uring: ", "native": "Unable to use native AIO: "}
# Modes not to try again. Linux AIO is never put here: its refusal can pass (all of
# fs.aio-max-nr in use).
_refused_aio: set[str] = set()
_SYS_IO_URING_SETUP = 425  # the same on every architecture (new syscalls since Linux 5.1)
_IO_URING_PARAMS_SIZE = 120  # struct io_uring_params

# Buffers up to 32 MiB (the largest NBD request) come from the heap, and the heap is not
# given back to the kernel below 256 MiB of free space at its top.
MALLOC_TUNING = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    tunables = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{tunables}:{MALLOC_TUNING}" if tunables else MALLOC_TUNING
    return env


def _json_filename(image: Path, *, backing: bool) -> str:
    spec: dict[str, object] = {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": str(image)},
    }
    if not backing:
        spec["backing"] = None
    return "json:" + json.dumps(spec)


@contextlib.asynccontextmanager
async def serve_image(
    image: Path,
    socket: Path,
    *,
    clients: int = 1,
    read_only: bool = False,
    backing: bool = False,
    direct: bool = True,
    timeout: float = 30.0,
    setpriv: str = SETPRIV,
) -> AsyncIterator[Path]:
    """Serve ``image`` (qcow2) on ``socket`` for up to ``clients`` connections at once,
    started through ``setpriv`` ("": without).

    With ``direct``, writes bypass the page cache (``--cache=none``, io_uring or else
    Linux AIO), which is what fast copies need; a filesystem without O_DIRECT gets the
    page cache.
    """
    process = None
    for aio in await _direct_modes() if direct else []:
        try:
            process = await _start(
                image, socket, clients, read_only, backing, aio, timeout, setpriv
            )
            break
        except ImageError as exc:
            if not _refuses(aio, str(exc)):  # not the mode: say, no O_DIRECT here
                log.info("qemu-nbd cannot do direct I/O; using the page cache", error=str(exc))
                break
            if aio != "native":
                _refused_aio.add(aio)
            log.info("qemu-nbd cannot use an I/O mode; trying the next", aio=aio, error=str(exc))
    if process is None:
        process = await _start(image, socket, clients, read_only, backing, None, timeout, setpriv)
    try:
        yield socket
    finally:
        await to_completion(_stop(process, timeout))
        await asyncio.to_thread(_remove, socket, _pid_file(socket))


@contextlib.asynccontextmanager
async def serve_point(
    image: Path,
    socket: Path,
    *,
    port: int | None = None,
    pid_file: Path | None = None,
    tls_psk: Path | None = None,
    writable: bool = False,
    clients: int = 8,
    timeout: float = 30.0,
    setpriv: str = SETPRIV,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Serve ``image`` with its backing chain, through the page cache, for as long as the
    block runs: on ``socket``, or with ``port`` on 127.0.0.1 at that port (``socket``
    then unused), read-only unless ``writable``; its pid file ``pid_file`` (default
    beside the socket); with ``tls_psk`` (a directory holding ``keys.psk``) only TLS
    clients that know its key. The block gets the process (to notice that it ended)."""
    pid_file = pid_file or _pid_file(socket)
    process = await _start(
        image,
        socket,
        clients,
        not writable,
        True,
        None,
        timeout,
        setpriv,
        port=port,
        pid_file=pid_file,
        tls_psk=tls_psk,
    )
    try:
        yield process
    finally:
        await to_completion(_stop(process, timeout))
        await asyncio.to_thread(_remove, *([socket] if port is None else []), pid_file)


async def _direct_modes() -> list[str]:
    untried = "io_uring" in _DIRECT_AIO and "io_uring" not in _refused_aio
    if untried and not await asyncio.to_thread(_io_uring_usable):
        log.info("io_uring is refused on this host; direct I/O uses Linux AIO")
        _refused_aio.add("io_uring")
    return [m for m in _DIRECT_AIO if m not in _refused_aio]


@functools.cache
def _io_uring_usable() -> bool:
    """Whether this process may set up an io_uring (and so its child, qemu-nbd)."""
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(_IO_URING_PARAMS_SIZE)
    fd = libc.syscall(_SYS_IO_URING_SETUP, ctypes.c_uint(1), params)
    if fd < 0:
        return False
    os.close(fd)
    return True


def _refuses(aio: str, error: str) -> bool:
    """Whether qemu-nbd's start-up ``error`` says it cannot use ``aio`` at all."""
    return f"Invalid aio mode '{aio}'" in error or (
        aio in _CANNOT_USE and _CANNOT_USE[aio] in error
    )


async def _start(
    image: Path,
    socket: Path,
    clients: int,
    read_only: bool,
    backing: bool,
    aio: str | None,
    timeout: float,
    setpriv: str,
    *,
    port: int | None = None,
    pid_file: Path | None = None,
    tls_psk: Path | None = None,
) -> asyncio.subprocess.Process:
    """qemu-nbd, once it serves the image; ``aio`` None: the page cache."""
    problem = setpriv_problem(setpriv)
    if problem is not None:
        raise ImageError(f"cannot start qemu-nbd: [agent] setpriv {problem}", image=str(image))
    cache = ["--cache=none", f"--aio={aio}"] if aio else ["--cache=writeback"]
    pid_file = pid_file or _pid_file(socket)
    tls = (
        [f"--object=tls-creds-psk,id=tls0,endpoint=server,dir={tls_psk}", "--tls-creds=tls0"]
        if tls_psk is not None
        else []
    )
    args = [
        *([setpriv, *_GUARD_OPTIONS] if setpriv else []),
        QEMU_NBD,
        *([f"--socket={socket}"] if port is None else ["--bind=127.0.0.1", f"--port={port}"]),
        f"--pid-file={pid_file}",
        f"--shared={clients}",
        "--persistent",
        *cache,
        *tls,
        "--discard=unmap",
        "--detect-zeroes=off",
    ]
    if read_only:
        args.append("--read-only")
    args.append(_json_filename(image, backing=backing))
    await asyncio.to_thread(_remove, *([socket] if port is None else []), pid_file)
    try:
        process = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=_environment(),
        )
    except OSError as exc:
        raise ImageError(f"cannot start qemu-nbd: {exc}", image=str(image)) from exc
    # Read stderr all along: a pipe nobody reads can block a chatty qemu-nbd.
    errors = asyncio.create_task(_tail(process))
    try:
        await _wait_until_serving(process, pid_file, image, timeout, errors)
    except ImageError as exc:
        await to_completion(_stop(process, timeout))
        if setpriv and "Permission denied" in str(exc):
            raise ImageError(
                f"{exc} (qemu-nbd runs with no capabilities through [agent] setpriv: root "
                "then reads and writes only what root owns or its modes allow; the "
                "repository's directories and images must be root's, or set "
                '[agent] setpriv = "")',
                image=str(image),
            ) from exc
        raise
    except BaseException:
        await to_completion(_stop(process, timeout))
        raise
    return process


async def _tail(process: asyncio.subprocess.Process, keep: int = 4096) -> bytes:
    """The last ``keep`` bytes qemu-nbd wrote to stderr, once it has exited."""
    assert process.stderr is not None
    tail = b""
    while chunk := await process.stderr.read(4096):
        tail = (tail + chunk)[-keep:]
    return tail


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _pid_file(socket: Path) -> Path:
    return socket.with_name(socket.name + ".pid")


def _written(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except FileNotFoundError:
        return False


async def _wait_until_serving(
    process: asyncio.subprocess.Process,
    pid_file: Path,
    image: Path,
    timeout: float,
    errors: asyncio.Task[bytes],
) -> None:
    """Wait until qemu-nbd has opened the image and listens.

    qemu-nbd listens on its socket before it opens the image, and exits if it cannot:
    a connection accepted says nothing. It writes its pid file once the image is open.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(_written, pid_file):
        if process.returncode is not None:
            err = (await asyncio.wait_for(errors, timeout)).decode(errors="replace").strip()
            raise ImageError(f"qemu-nbd exited at start: {err}", image=str(image))
        if asyncio.get_running_loop().time() > deadline:
            raise ImageError(f"qemu-nbd did not start within {timeout:g} s", image=str(image))
        await asyncio.sleep(0.005)


async def _stop(process: asyncio.subprocess.Process, timeout: float) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            # Bounded too: a process stuck in the kernel (hung NFS) must not hang us.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), timeout)
