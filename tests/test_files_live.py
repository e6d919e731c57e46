"""``backup-agent files``: files put into a disk's filesystem before the backup, listed and
copied out of the backup point by the CLI (its own process) through libguestfs, with the
same bytes; the repository untouched. The appliance starts under KVM where it can, else
TCG (about half a minute per command on these nested machines)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from tests.guest_model import MiB, agent_cli, config, config_file
from tests.harness import running_agent
from tests.test_export import _repository_files
from tests.testbed.domains import DiskSpec, DomainFactory

pytestmark = pytest.mark.libvirt


def _filesystem_image(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A 64 MiB raw disk holding one ext4 filesystem made from a directory (mkfs.ext4 -d)."""
    src = tmp_path / "tree"
    (src / "etc").mkdir(parents=True)
    (src / "data" / "nested").mkdir(parents=True)
    files = {
        "etc/motd": b"hello from the guest\n",
        "data/blob.bin": os.urandom(300_000),
        "data/nested/small.txt": b"x" * 17,
    }
    for name, content in files.items():
        (src / name).write_bytes(content)
        (src / name).chmod(0o644)
    raw = tmp_path / "fs.raw"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(src), str(raw), "64M"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return raw, files


async def test_files_of_a_backup_point_are_listed_and_copied_with_their_bytes(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    raw, files = _filesystem_image(tmp_path)
    td = await asyncio.to_thread(
        domain_factory, persistent=True, disks=[DiskSpec("vda", size=64 * MiB)], start=False
    )
    # The disk holds the filesystem before the domain starts (and is backed up).
    convert = [
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        str(raw),
        str(td.disk_paths["vda"]),
    ]
    await asyncio.to_thread(subprocess.run, convert, check=True, capture_output=True, timeout=60)
    await asyncio.to_thread(td.dom().create)
    cfg = config(tmp_path)
    async with running_agent(cfg) as run:
        backup = await run.agent.backups.run(td.uuid)
    cli = config_file(tmp_path, cfg)
    before = _repository_files(cfg.repository_path)
    point = (td.name, "--backup", backup.backup_id)

    listed = await asyncio.to_thread(agent_cli, cli, "files", *point, "ls", "/data")
    assert listed.returncode == 0, listed.stderr
    assert "blob.bin" in listed.stdout and "nested" in listed.stdout, listed.stdout
    assert "300000" in listed.stdout, listed.stdout  # (ls -la: the size)

    to = tmp_path / "out"
    to.mkdir()
    got = await asyncio.to_thread(agent_cli, cli, "files", *point, "get", "/data", "--to", str(to))
    assert got.returncode == 0, got.stderr
    for name in ("data/blob.bin", "data/nested/small.txt"):
        assert (to / name).read_bytes() == files[name], name
        assert (to / name).stat().st_mode & 0o077 == 0  # root's alone
    # Again: never overwritten; and a path the guest lacks is one line naming it.
    again = await asyncio.to_thread(
        agent_cli, cli, "files", *point, "get", "/data", "--to", str(to)
    )
    assert again.returncode == 1 and f"{to / 'data'} already exists" in again.stderr
    missing = await asyncio.to_thread(agent_cli, cli, "files", *point, "ls", "/no/such")
    assert missing.returncode == 1, missing.stderr
    assert "/no/such: no such file or directory in the guest" in missing.stderr
    assert _repository_files(cfg.repository_path) == before
    assert not list(cfg.socket_path.glob("files-*"))  # its qemu-nbd's socket is gone
