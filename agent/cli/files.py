"""``backup-agent files``: list and copy files out of a backup point's guest filesystem.

The point is served read-only over NBD by a local ``qemu-nbd`` (as ``export`` does, on a
socket in the run directory) and read by **libguestfs** (its Python module): the guest's
filesystems are opened inside libguestfs' own small appliance VM, never mounted in the
host's kernel, so a damaged or hostile filesystem in a backup cannot reach the host; and
it reads whatever the guest used (ext4, XFS, Btrfs, LVM, partitions) without the host's
``nbd`` module (``qemu-nbd --connect``), which these machines do not even have. The
guest's operating system is inspected and its filesystems mounted where it mounts them;
a disk without one (a data disk) must hold exactly one filesystem, else ``--fs`` names
it. Everything is read-only: the appliance opens the export read-only, and the export is
read-only itself.

Where the host's KVM cannot start the appliance (nested virtualisation that refuses
``-cpu host``), it is started again under TCG, slower (half a minute) but the same.
Copied files are root's alone (owner root, group, other and set-id bits cleared), like
everything the agent writes: they are made in a private staging directory and renamed
into place; an existing file is never overwritten.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from agent.cli.backups import CommandError, _in_repository, point_disk
from agent.core.config import AgentConfig
from agent.core.errors import ImageError
from agent.qemu.qemu_nbd import serve_point
from agent.repository.store import Repository

_DEBIAN_DIST = "/usr/lib/python3/dist-packages"


def files(
    config: AgentConfig,
    domain: str,
    backup_id: str,
    disk: str | None,
    fs: str | None,
    action: str,
    path: str,
    to: Path | None,
) -> int:
    guest_path = PurePosixPath(path)
    if not guest_path.is_absolute() or ".." in guest_path.parts:
        raise CommandError(f"{path!r}: give an absolute path in the guest, without '..'")
    if action == "get":
        if not guest_path.name:
            raise CommandError("get /: name a file or directory below / (e.g. /etc)")
        if to is None or not to.is_dir():
            raise CommandError(f"--to {to}: give an existing directory to copy into")
        _refuse_existing(to / guest_path.name)
    repository = Repository(config.repository_path, state_dir=config.agent.state_dir)
    name_in_repo = _in_repository(repository, domain)
    return asyncio.run(
        _files(config, repository, name_in_repo, backup_id, disk, fs, action, guest_path, to)
    )


async def _files(
    config: AgentConfig,
    repository: Repository,
    domain: str,
    backup_id: str,
    disk: str | None,
    fs: str | None,
    action: str,
    path: PurePosixPath,
    to: Path | None,
) -> int:
    disk, image = await point_disk(repository, domain, backup_id, disk)
    run = config.socket_path
    await asyncio.to_thread(run.mkdir, mode=0o700, parents=True, exist_ok=True)
    socket = run / f"files-{backup_id}-{disk}-{os.getpid()}.sock"
    guestfs = _guestfs_module()
    try:
        async with serve_point(image, socket, clients=2, setpriv=config.agent.setpriv):
            return await asyncio.to_thread(_in_guest, guestfs, socket, fs, action, path, to)
    except ImageError as exc:
        raise CommandError(f"cannot serve {image}: {exc}") from exc


def _guestfs_module() -> Any:
    try:
        import guestfs  # type: ignore[import-not-found]  # noqa: PLC0415
    except ImportError:
        sys.path.append(_DEBIAN_DIST)  # Debian's python3-guestfs, for another Python
        try:
            import guestfs  # noqa: PLC0415
        except ImportError as exc:
            raise CommandError(
                "libguestfs' Python module is not installed (Debian: python3-guestfs; "
                "scripts/host-setup.sh installs it)"
            ) from exc
        finally:
            sys.path.remove(_DEBIAN_DIST)
    return guestfs


def _in_guest(
    guestfs: Any, socket: Path, fs: str | None, action: str, path: PurePosixPath, to: Path | None
) -> int:
    g = _launched(guestfs, socket)
    try:
        _mount(g, fs)
        where = str(path)
        if not g.exists(where):
            raise CommandError(f"{where}: no such file or directory in the guest")
        if action == "ls":
            sys.stdout.write(g.ll(where))
        else:
            assert to is not None
            print(f"copied {where} to {_copy_out(g, where, to)}", file=sys.stderr)
        return 0
    except RuntimeError as exc:  # libguestfs' errors
        raise CommandError(f"guest filesystem: {exc}") from exc
    finally:
        g.shutdown()
        g.close()


def _launched(guestfs: Any, socket: Path) -> Any:
    """A libguestfs handle on the export, launched: with KVM where it starts, else TCG."""
    last: RuntimeError | None = None
    for settings in ([], ["force_tcg"]):
        g = guestfs.GuestFS(python_return_dict=True)
        g.set_backend("direct")
        g.set_backend_settings(settings)
        g.add_drive_opts("", format="raw", readonly=True, protocol="nbd", server=[f"unix:{socket}"])
        try:
            g.launch()
            return g
        except RuntimeError as exc:
            last = exc
            g.close()
    raise CommandError(f"libguestfs could not start its appliance: {last}")


def _mount(g: Any, fs: str | None) -> None:
    """The guest's filesystems mounted read-only: ``fs`` at /, else where the inspected
    operating system mounts them, else the disk's only filesystem at /."""
    if fs is not None:
        g.mount_ro(fs, "/")
        return
    roots = g.inspect_os()
    if roots:
        points = g.inspect_get_mountpoints(roots[0])
        for mountpoint in sorted(points, key=len):
            try:
                g.mount_ro(points[mountpoint], mountpoint)
            except RuntimeError as exc:  # (/home on a disk of its own, not this one)
                if mountpoint == "/":
                    raise
                print(f"{mountpoint} not mounted: {exc}", file=sys.stderr)
        return
    found = {d: t for d, t in g.list_filesystems().items() if t not in ("swap", "unknown", "")}
    if len(found) != 1:
        listed = ", ".join(f"{d} ({t})" for d, t in sorted(found.items())) or "none"
        raise CommandError(
            f"no operating system on this disk, and {len(found)} filesystems ({listed}): "
            "say which with --fs"
        )
    g.mount_ro(next(iter(found)), "/")


def _copy_out(g: Any, where: str, to: Path) -> Path:
    """``where`` copied into ``to`` as ``to/<name>``: first into a private staging
    directory beside it (0700, root's: nobody can swap a path inside meanwhile), where
    everything becomes root's with no group or other bits and no set-id bits, then
    renamed into place if that name is still free."""
    name = PurePosixPath(where).name
    staging = Path(tempfile.mkdtemp(prefix=".backup-agent-files-", dir=to))
    try:
        g.copy_out(where, str(staging))
        _private(staging / name)
        _refuse_existing(to / name)
        os.rename(staging / name, to / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return to / name


def _refuse_existing(path: Path) -> None:
    if path.exists() or path.is_symlink():
        raise CommandError(f"{path} already exists (never overwritten)")


def _private(path: Path) -> None:
    """Everything at and under ``path`` root's, without group, other or set-id bits
    (symbolic links left as links, never followed)."""
    items = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for item in items:
        os.lchown(item, 0, 0)
        mode = item.lstat().st_mode
        if not stat.S_ISLNK(mode):
            os.chmod(item, stat.S_IMODE(mode) & 0o700)  # (no link: checked just above)
