"""``backup-agent export``: one disk of a backup point served over NBD, until stopped.

A local ``qemu-nbd`` (through ``[agent] setpriv``, as the agent starts its own) opens
the point's image with its backing chain and serves it, by default read-only on a Unix
socket in the agent's run directory, or on ``127.0.0.1`` at ``--port`` with TLS and a
pre-shared key made for the export (root-only, in the run directory: a local user who
could connect to a loopback port can still not read a root-only backup); with
``--overlay FILE`` it serves a new qcow2 overlay on top of the chain instead, writable,
so that a VM can run on the export at once while the chain stays untouched. The first
line on stdout is the NBD URI (``nbd+unix:///?socket=...``, or
``nbds://backup-agent@127.0.0.1:N/?tls-psk-file=...``, which libnbd's tools and QEMU
read), for scripts; what is served is said on stderr. SIGINT, SIGTERM or SIGHUP stop
qemu-nbd and remove its socket and key; the exit status is 0. If qemu-nbd ends by
itself, 1.

While the export runs, qemu-nbd holds QEMU's lock on every image of the chain, so a
retention merge of that domain fails (and is tried again at the next backup) instead
of changing an image under it. The overlay is left where it was made when the export
ends (it holds what was written); it reads right only as long as its backup point is
kept as it is, so it is for the export's lifetime: delete it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import sys
from pathlib import Path

from agent.cli.backups import CommandError, _in_repository, point_disk
from agent.core.config import AgentConfig
from agent.core.errors import ImageError
from agent.qemu.images import run_qemu_img
from agent.qemu.qemu_nbd import serve_point
from agent.repository.store import Repository

_QEMU_IMG_TIMEOUT = 60.0


def export(
    config: AgentConfig,
    domain: str,
    backup_id: str,
    disk: str | None,
    socket: Path | None,
    port: int | None,
    overlay: Path | None,
) -> int:
    repository = Repository(config.repository_path, state_dir=config.agent.state_dir)
    name = _in_repository(repository, domain)
    return asyncio.run(_export(config, repository, name, backup_id, disk, socket, port, overlay))


async def _export(
    config: AgentConfig,
    repository: Repository,
    domain: str,
    backup_id: str,
    disk: str | None,
    socket: Path | None,
    port: int | None,
    overlay: Path | None,
) -> int:
    disk, image = await point_disk(repository, domain, backup_id, disk)
    # qemu-nbd's pid file, the default socket and (with --port) the TLS key are in the
    # agent's run directory (root's alone), never beside a path the caller gave.
    run = config.socket_path
    await asyncio.to_thread(_private_dir, run)
    own = run / f"export-{backup_id}-{disk}-{os.getpid()}"
    socket = socket or run / f"export-{backup_id}-{disk}.sock"
    if port is None:
        await asyncio.to_thread(_refuse_existing, socket, "socket")
    served = image
    if overlay is not None:
        await _make_overlay(image, overlay)
        served = overlay
    serving: list[bool] = []
    try:
        tls = None if port is None else await asyncio.to_thread(_psk_dir, own.with_suffix(".tls"))
        return await _serve(
            config,
            served,
            socket,
            port,
            tls,
            own.with_suffix(".pid"),
            overlay,
            domain,
            disk,
            serving,
        )
    except BaseException:
        if overlay is not None and not serving:  # nothing was written into it
            await asyncio.to_thread(_unlink_if_new, overlay)
        raise
    finally:
        await asyncio.to_thread(shutil.rmtree, own.with_suffix(".tls"), True)


async def _serve(
    config: AgentConfig,
    image: Path,
    socket: Path,
    port: int | None,
    tls: Path | None,
    pid_file: Path,
    overlay: Path | None,
    domain: str,
    disk: str,
    serving: list[bool],
) -> int:
    """Serve until a signal (0) or until qemu-nbd ends by itself (CommandError);
    ``serving`` gets an entry once clients could connect."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with serve_point(
            image,
            socket,
            port=port,
            pid_file=pid_file,
            tls_psk=tls,
            writable=overlay is not None,
            setpriv=config.agent.setpriv,
        ) as process:
            serving.append(True)
            if tls is not None:
                uri = f"nbds://{_PSK_USER}@127.0.0.1:{port}/?tls-psk-file={tls / 'keys.psk'}"
            else:
                uri = f"nbd+unix:///?socket={socket}"
            print(uri, flush=True)
            how = f"writable into the overlay {image}" if overlay else "read-only"
            print(
                f"serving {domain} {disk} {how} at {uri}; SIGINT or SIGTERM stops it",
                file=sys.stderr,
                flush=True,
            )
            ended = asyncio.ensure_future(process.wait())
            stopped = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({ended, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                stopped.cancel()
            if not stop.is_set():
                raise CommandError(
                    f"qemu-nbd serving {image} exited by itself (status {process.returncode})"
                )
    except ImageError as exc:
        raise CommandError(f"cannot serve {image}: {exc}") from exc
    finally:
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)
    print(f"export of {domain} {disk} stopped", file=sys.stderr)
    return 0


async def _make_overlay(image: Path, overlay: Path) -> None:
    """A new qcow2 ``overlay`` (0600) whose backing file is ``image``; an existing file
    is never replaced."""
    await asyncio.to_thread(_refuse_existing, overlay, "overlay")
    args = ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(overlay)]
    try:
        await run_qemu_img(args, timeout=_QEMU_IMG_TIMEOUT, image=str(overlay))
    except ImageError as exc:
        await asyncio.to_thread(_unlink_if_new, overlay)
        raise CommandError(f"cannot create the overlay {overlay}: {exc}") from exc
    await asyncio.to_thread(os.chmod, overlay, 0o600)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # (SIGHUP: a closed terminal)
_PSK_USER = "backup-agent"


def _psk_dir(path: Path) -> Path:
    """A directory (0700) with a new TLS pre-shared key, ``keys.psk`` (0600): on TCP,
    only who can read it (root) can connect, as only root can reach the Unix socket."""
    path.mkdir(mode=0o700)
    key = path / "keys.psk"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"{_PSK_USER}:{secrets.token_hex(32)}\n")
    return path


def _refuse_existing(path: Path, what: str) -> None:
    if path.exists() or path.is_symlink():
        raise CommandError(f"{what} {path} already exists (an export never replaces a file)")
    if not path.parent.is_dir():
        raise CommandError(f"directory {path.parent} does not exist")


def _unlink_if_new(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
