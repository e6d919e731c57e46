"""A local ``qemu-nbd`` serving one image on a Unix socket, for as long as a block runs.

The backup writes into repository images through it (qemu-nbd knows qcow2; the agent
only speaks NBD). An incremental overlay must be opened with its backing chain: qcow2
allocates whole clusters, and a write covering part of one is completed from the
backing file (with ``backing=False`` that would be zeroes). A full image has none.
The process is stopped (SIGTERM, then SIGKILL) and reaped on every way out. If the
agent itself dies (``kill -9``), the kernel stops qemu-nbd too: it is started through
``setpriv --pdeathsig KILL`` (util-linux), so no orphan keeps serving, and keeping open,
files the next agent removes.

qemu-nbd allocates a buffer for every request and frees it once done. glibc serves
buffers above its mmap threshold (128 KiB at first) with a fresh mmap each time, whose
pages the kernel faults in and zeroes: for the backup's 2 MiB writes that was two
thirds of qemu-nbd's CPU time (1.5 of 2.3 CPU-seconds per 2 GiB, on a host whose two
cores the copy saturates). :data:`MALLOC_TUNING` keeps them in the heap instead.

Direct I/O (``--cache=none``) goes through io_uring where the host has it. With Linux
AIO (``--aio=native``), qemu-nbd's exit waited 40 to 90 ms here to tear down its AIO
context, at the end of every full backup's copy; with io_uring, 5 to 8 ms. Where
io_uring is refused (an older kernel, ``kernel.io_uring_disabled``, a QEMU built
without it), Linux AIO is used, and io_uring is not tried again by this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from agent.errors import ImageError
from agent.logs import get_logger
from agent.shielding import to_completion

log = get_logger("qemu_nbd")

QEMU_NBD = "/usr/bin/qemu-nbd"
# Sends qemu-nbd SIGKILL when the thread that started it ends (with the agent, if killed).
_ORPHAN_GUARD = ["/usr/bin/setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []


# Asynchronous I/O modes for direct I/O, in the order tried; one qemu-nbd refused names it.
_DIRECT_AIO = ("io_uring", "native")
_refused_aio: set[str] = set()

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
) -> AsyncIterator[Path]:
    """Serve ``image`` (qcow2) on ``socket`` for up to ``clients`` connections at once.

    With ``direct``, writes bypass the page cache (``--cache=none``, io_uring or else
    Linux AIO), which is what fast copies need; a filesystem without O_DIRECT gets the
    page cache.
    """
    modes = [m for m in _DIRECT_AIO if m not in _refused_aio] if direct else []
    process = None
    for aio in modes:
        try:
            process = await _start(image, socket, clients, read_only, backing, aio, timeout)
            break
        except ImageError as exc:
            if aio in str(exc):
                _refused_aio.add(aio)
            log.info("qemu-nbd refused an I/O mode; trying the next", aio=aio, error=str(exc))
    if process is None:
        process = await _start(image, socket, clients, read_only, backing, None, timeout)
    try:
        yield socket
    finally:
        await to_completion(_stop(process, timeout))
        await asyncio.to_thread(_remove, socket)


async def _start(
    image: Path,
    socket: Path,
    clients: int,
    read_only: bool,
    backing: bool,
    aio: str | None,
    timeout: float,
) -> asyncio.subprocess.Process:
    """qemu-nbd, serving once it accepts connections; ``aio`` None: the page cache."""
    cache = ["--cache=none", f"--aio={aio}"] if aio else ["--cache=writeback"]
    args = [
        *_ORPHAN_GUARD,
        QEMU_NBD,
        f"--socket={socket}",
        f"--shared={clients}",
        "--persistent",
        *cache,
        "--discard=unmap",
        "--detect-zeroes=off",
    ]
    if read_only:
        args.append("--read-only")
    args.append(_json_filename(image, backing=backing))
    await asyncio.to_thread(_remove, socket)
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
        await _wait_for_socket(process, socket, image, timeout, errors)
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


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def _wait_for_socket(
    process: asyncio.subprocess.Process,
    socket: Path,
    image: Path,
    timeout: float,
    errors: asyncio.Task[bytes],
) -> None:
    """Wait until qemu-nbd accepts connections on ``socket``.

    The socket file appears at bind(), before listen(): a connection attempt, not the
    file's existence, tells that qemu-nbd is ready.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while not await _accepts(socket):
        if process.returncode is not None:
            err = (await asyncio.wait_for(errors, timeout)).decode(errors="replace").strip()
            raise ImageError(f"qemu-nbd exited at start: {err}", image=str(image))
        if asyncio.get_running_loop().time() > deadline:
            raise ImageError(f"qemu-nbd did not listen within {timeout:g} s", image=str(image))
        await asyncio.sleep(0.005)


async def _accepts(socket: Path) -> bool:
    try:
        _reader, writer = await asyncio.open_unix_connection(str(socket))
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


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
