"""A test domain and a model of what each of its disks holds, and restore checks.

Every write a test makes through QEMU is applied to the model too; a snapshot of the
model taken when a backup starts is what restoring that backup must give, byte for byte.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest

from agent.core.config import AgentConfig
from agent.repository.store import Repository
from tests.harness import RunningAgent, started_domain
from tests.testbed.domains import DiskSpec, DomainFactory, TestDomain

KiB = 1024
MiB = 1024 * KiB
SIZE = 64 * MiB


class Guest:
    """A test domain and the model of what each of its disks holds."""

    def __init__(self, td: TestDomain) -> None:
        self.td = td
        self.disks = {target: bytearray(SIZE) for target in td.disk_paths}

    async def write(self, target: str, offset: int, length: int, byte: int) -> None:
        await asyncio.to_thread(self.td.write_pattern, target, offset, length, byte)
        self.disks[target][offset : offset + length] = bytes([byte]) * length

    async def zero(self, target: str, offset: int, length: int) -> None:
        await asyncio.to_thread(
            self.td.qemu_io,
            target,
            f"write -z {offset} {length}",
            f"wrote {length}/{length} bytes at offset {offset}",
        )
        self.disks[target][offset : offset + length] = bytes(length)

    async def discard(self, target: str, offset: int, length: int) -> None:
        await asyncio.to_thread(
            self.td.qemu_io,
            target,
            f"discard {offset} {length}",
            f"discard {length}/{length} bytes at offset {offset}",
        )
        # Whether a discard zeroes depends on the disk's discard mode: ask the guest.
        held = await asyncio.to_thread(self.td.read_guest, target, offset, length)
        self.disks[target][offset : offset + length] = held

    async def flush(self) -> None:
        """What a guest does before it may lose power: QEMU writes out its qcow2 metadata.

        Without it, killing QEMU loses writes the guest never flushed, and the model of
        what the disk holds would be wrong, not the backup.
        """
        for target in self.disks:
            device = self.td._qemu_io_device(target)
            await asyncio.to_thread(self.td.hmp, f'qemu-io -d {device} "flush"')
            # The monitor runs commands in order: a read after it proves it finished.
            await asyncio.to_thread(self.td.read_guest, target, 0, 512)

    def resize(self, target: str, size: int) -> None:
        """Grow the disk while the domain runs (blocking: libvirt's blockResize)."""
        self.td.dom().blockResize(target, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        self.disks[target] += bytes(size - len(self.disks[target]))

    def attach(self, target: str) -> None:
        self.disks[target] = bytearray(SIZE)

    def snapshot(self) -> dict[str, bytes]:
        return {t: bytes(d) for t, d in self.disks.items()}


def config(tmp_path: Path, **sections: dict[str, object]) -> AgentConfig:
    data: dict[str, object] = {
        "agent": {"state_dir": str(tmp_path / "state")},
        "libvirt": {"reconnect_initial_delay": 0.2, "reconnect_max_delay": 2.0},
        "repository": {"path": str(tmp_path / "repo")},
        "http": {"port": 0},
    }
    data.update(sections)
    return AgentConfig.model_validate(data)


def config_file(tmp_path: Path, cfg: AgentConfig, extra: str = "") -> Path:
    """``agent.toml`` for an agent process on ``cfg``'s state directory and repository
    (``extra``: more TOML), beside the in-process agents a test runs on ``cfg``."""
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nstate_dir = "{cfg.agent.state_dir}"\n'
        f'[repository]\npath = "{cfg.repository_path}"\n{extra}'
    )
    return path


def agent_cli(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``backup-agent ARGS --config CONFIG`` in its own process (blocking: to a thread)."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


async def assert_restores(
    repo: Repository, domain: str, backup_id: str, expected: dict[str, bytes], tmp_path: Path
) -> None:
    for target, content in expected.items():
        dest = tmp_path / f"restore-{backup_id}-{target}.raw"
        await repo.restore(domain, backup_id, target, dest, fmt="raw")
        restored = await asyncio.to_thread(dest.read_bytes)
        await asyncio.to_thread(dest.unlink)
        if restored != content:
            pytest.fail(
                f"{backup_id} {target}: the restored image {_difference(restored, content)}"
            )


async def assert_cli_restores(
    config: Path, domain: str, backup_id: str, expected: dict[str, bytes], tmp_path: Path
) -> None:
    """``backup-agent restore`` (its own process, as an operator runs it) of every disk
    equals what the guest held."""
    out = tmp_path / f"restored-{backup_id}"
    args = ("restore", domain, "--backup", backup_id, "--to", str(out), "--format", "raw")
    done = await asyncio.to_thread(agent_cli, config, *args)
    assert done.returncode == 0, done.stderr
    for target, content in expected.items():
        restored = await asyncio.to_thread((out / f"{target}.raw").read_bytes)
        await asyncio.to_thread((out / f"{target}.raw").unlink)
        if restored != content:
            pytest.fail(f"{backup_id} {target}: the restored disk {_difference(restored, content)}")


def _difference(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"has {len(got)} bytes, not {len(want)}"
    first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    return f"differs at byte {first}"


async def started_guest(
    run: RunningAgent, factory: DomainFactory, disks: list[DiskSpec], *, persistent: bool = True
) -> Guest:
    return Guest(await started_domain(run, factory, persistent=persistent, disks=disks))
