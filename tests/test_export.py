"""``backup-agent export``: a backup point served over NBD by a real qemu-nbd, read by
``nbdcopy`` and ``nbdinfo``, written through ``qemu-io`` into an overlay; stopped by a
signal, the chain untouched; a retention merge refused while it runs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core.errors import RepositoryError
from agent.repository.store import Repository
from tests.guest_model import agent_cli, config_file
from tests.guest_model import config as agent_config
from tests.test_repository import DOMAIN, Builder, KiB, MiB


@pytest.fixture
async def chain(tmp_path: Path) -> tuple[Path, Builder]:
    """Two points of a two-disk domain (a full, an incremental), and the config."""
    cfg = agent_config(tmp_path)
    builder = Builder(Repository(cfg.repository_path))
    await builder.backup({"vda": [(0, MiB, 0x31), (3 * MiB, 64 * KiB, 0x32)], "vdb": []})
    await builder.backup({"vda": [(512 * KiB, 128 * KiB, 0x33)], "vdb": [(0, KiB, 0x34)]})
    return config_file(tmp_path, cfg), builder


def _repository_files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@contextlib.contextmanager
def exporting(config: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``backup-agent export ARGS`` in its own process, once it printed its URI; at the
    end it is stopped (SIGINT) if it still runs, and reaped."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "export", *args, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        if not uri:
            proc.wait(timeout=30)
            pytest.fail(f"export printed no URI: {proc.stderr.read() if proc.stderr else ''}")
        yield proc, uri
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def _stop(proc: subprocess.Popen[str], signum: int = signal.SIGINT) -> str:
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return err


def _read(uri: str, dest: Path) -> bytes:
    subprocess.run(["nbdcopy", uri, str(dest)], check=True, timeout=60, capture_output=True)
    return dest.read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_point_is_served_read_only_and_reads_as_its_restore(
    chain: tuple[Path, Builder], tmp_path: Path
) -> None:
    config, builder = chain
    older, newer = builder.ids
    before = _repository_files(builder.repo.root)
    for backup_id in (older, newer):
        with exporting(config, DOMAIN, "--backup", backup_id, "--disk", "vda") as (proc, uri):
            assert uri.startswith("nbd+unix:///?socket="), uri
            sock = Path(uri.split("socket=", 1)[1])
            assert sock.is_socket() and sock.stat().st_mode & 0o077 == 0
            info = json.loads(
                subprocess.run(
                    ["nbdinfo", "--json", uri], check=True, capture_output=True, text=True
                ).stdout
            )
            assert info["exports"][0]["is_read_only"] is True
            exported = _read(uri, tmp_path / f"{backup_id}.raw")
            assert exported == builder.points[backup_id]["vda"]
            restored = tmp_path / f"{backup_id}-restored.raw"  # the restore of the same point
            asyncio.run(builder.repo.restore(DOMAIN, backup_id, "vda", restored, fmt="raw"))
            assert restored.read_bytes() == exported
            # A write is refused.
            wrote = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4k", uri],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert wrote.returncode != 0 or "failed" in wrote.stdout + wrote.stderr
            err = _stop(proc, signal.SIGHUP if backup_id == newer else signal.SIGINT)
        assert "stopped" in err
        assert not sock.exists()
    assert _repository_files(builder.repo.root) == before


def test_on_a_tcp_port_on_loopback_until_sigterm(
    chain: tuple[Path, Builder], tmp_path: Path
) -> None:
    config, builder = chain
    _, newer = builder.ids
    port = _free_port()
    with exporting(config, DOMAIN, "--backup", newer, "--disk", "vdb", "--port", str(port)) as (
        proc,
        uri,
    ):
        assert uri.startswith(f"nbds://backup-agent@127.0.0.1:{port}/?tls-psk-file="), uri
        key = Path(uri.split("tls-psk-file=", 1)[1])
        assert key.stat().st_mode & 0o077 == 0  # only root can read it, so connect
        assert _read(uri, tmp_path / "vdb.raw") == builder.points[newer]["vdb"]
        # Without the key (plain NBD, as any local user could try): refused.
        plain = subprocess.run(
            ["nbdinfo", f"nbd://127.0.0.1:{port}"], capture_output=True, timeout=30, check=False
        )
        assert plain.returncode != 0
        _stop(proc, signal.SIGTERM)
    with socket.socket() as s:  # nothing listens any more
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert not key.exists()


def test_an_overlay_takes_the_writes_and_the_chain_stays_as_it_was(
    chain: tuple[Path, Builder], tmp_path: Path
) -> None:
    config, builder = chain
    older, _ = builder.ids
    before = _repository_files(builder.repo.root)
    overlay = tmp_path / "overlay.qcow2"
    args = (DOMAIN, "--backup", older, "--disk", "vda", "--overlay", str(overlay))
    with exporting(config, *args) as (proc, uri):
        wrote = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x55 4k 8k", uri],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert "wrote 8192/8192 bytes" in wrote.stdout, wrote.stdout
        expected = bytearray(builder.points[older]["vda"])
        expected[4 * KiB : 12 * KiB] = b"\x55" * 8 * KiB
        assert _read(uri, tmp_path / "written.raw") == expected
        _stop(proc)
    assert overlay.stat().st_mode & 0o777 == 0o600
    assert _repository_files(builder.repo.root) == before
    # The point itself still reads as it was backed up.
    with exporting(config, DOMAIN, "--backup", older, "--disk", "vda") as (proc, uri):
        assert _read(uri, tmp_path / "again.raw") == builder.points[older]["vda"]
        _stop(proc)


async def test_a_retention_merge_waits_for_the_export_of_a_point_of_its_chain(
    chain: tuple[Path, Builder], tmp_path: Path
) -> None:
    """qemu-nbd holds QEMU's lock on every image of the chain it serves: a merge fails
    on it, before it changed an image; the served point reads right all along. As after
    a crash, the retention stays begun (the point it drops is no longer listed) and the
    next one, once the export is over, finishes it; the kept point restores exactly."""
    config, builder = chain
    older, newer = builder.ids
    with exporting(config, DOMAIN, "--backup", newer, "--disk", "vda") as (proc, uri):
        with pytest.raises(RepositoryError, match="lock"):
            await builder.repo.apply_retention(DOMAIN, 1)
        assert _read(uri, tmp_path / "during.raw") == builder.points[newer]["vda"]
        assert older not in [m.backup_id for m in await builder.repo.backups(DOMAIN)]
        _stop(proc)
    await builder.repo.apply_retention(DOMAIN, 1)
    assert [m.backup_id for m in await builder.repo.backups(DOMAIN)] == [newer]
    assert await builder.repo.verify(DOMAIN) == []
    for target in ("vda", "vdb"):
        dest = tmp_path / f"{target}.raw"
        await builder.repo.restore(DOMAIN, newer, target, dest, fmt="raw")
        assert dest.read_bytes() == builder.points[newer][target]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--backup", "BACKUP"), "has 2 disks (vda, vdb): say which with --disk"),
        (("--backup", "BACKUP", "--disk", "sdz"), "has no disk 'sdz' (it has vda, vdb)"),
        (("--backup", "20200101T000000Z-000000", "--disk", "vda"), "20200101T000000Z-000000"),
    ],
)
def test_what_cannot_be_exported_is_one_line_naming_why(
    chain: tuple[Path, Builder], args: tuple[str, ...], says: str
) -> None:
    config, builder = chain
    args = tuple(builder.ids[0] if a == "BACKUP" else a for a in args)
    done = agent_cli(config, "export", DOMAIN, *args)
    assert done.returncode == 1, done.stderr
    assert says in done.stderr, done.stderr
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_existing_overlay_or_socket_is_never_replaced(
    chain: tuple[Path, Builder], tmp_path: Path
) -> None:
    config, builder = chain
    taken = tmp_path / "taken"
    taken.write_bytes(b"mine")
    for option in ("--overlay", "--socket"):
        done = agent_cli(
            config,
            "export",
            DOMAIN,
            "--backup",
            builder.ids[0],
            "--disk",
            "vda",
            option,
            str(taken),
        )
        assert done.returncode == 1, done.stderr
        assert f"{taken} already exists" in done.stderr, done.stderr
        assert taken.read_bytes() == b"mine"
    # The overlay's directory must exist; nothing is made when it does not.
    missing = tmp_path / "no-such-dir" / "overlay.qcow2"
    done = agent_cli(
        config,
        "export",
        DOMAIN,
        "--backup",
        builder.ids[0],
        "--disk",
        "vda",
        "--overlay",
        str(missing),
    )
    assert done.returncode == 1, done.stderr
    assert f"directory {missing.parent} does not exist" in done.stderr
    assert not missing.parent.exists()


@pytest.mark.parametrize(
    "args",
    [("--port", "0"), ("--port", "70000"), ("--port", "8710", "--socket", "/tmp/x.sock")],
)
def test_bad_options_are_refused_by_the_parser(
    chain: tuple[Path, Builder], args: tuple[str, ...]
) -> None:
    config, builder = chain
    done = agent_cli(config, "export", DOMAIN, "--backup", builder.ids[0], "--disk", "vda", *args)
    assert done.returncode == 2, done.stderr
    assert "usage:" in done.stderr
