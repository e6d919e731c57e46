"""``backup-agent checkpoints`` and ``ledger export|import`` on a real ledger file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agent.chain.ledger import Ledger
from agent.chain.records import CheckpointDisk, CheckpointRecord, CheckpointState

UUID = "6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def config_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[agent]\nstate_dir = "{tmp_path / name}"\n')
    return path


async def seed(state_dir: Path) -> list[str]:
    names = ["lba-20260101T000000Z-aaaaaa", "lba-20260102T000000Z-bbbbbb"]
    async with await Ledger.open(state_dir / "ledger.sqlite") as ledger:
        parent = None
        for i, name in enumerate(names):
            await ledger.add_checkpoint(
                CheckpointRecord(
                    domain="web1",
                    domain_uuid=UUID,
                    name=name,
                    parent=parent,
                    born_parent=parent,
                    created_at=1767225600 + i * 86400,
                    xml=f"<domaincheckpoint><name>{name}</name></domaincheckpoint>",
                    disks=(CheckpointDisk("vda", name, "file:/img/vda.qcow2", 1 << 30),),
                    state=CheckpointState.ACTIVE,
                )
            )
            parent = name
        await ledger.mark_backed_up("web1", names[0], 1767225700.0)
        await ledger.set_disk_chains(
            "web1", {"vda": (True, None, "ok"), "sdb": (False, "disk-replaced", "another image")}
        )
    return names


async def test_checkpoints_table_and_json(tmp_path: Path) -> None:
    names = await seed(tmp_path / "a")
    cfg = config_file(tmp_path, "a")
    table = cli("checkpoints", "web1", "--config", str(cfg))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[2].split()[:2] == ["CHECKPOINT", "PARENT"]
    assert lines[3].split()[0] == names[0] and lines[4].split()[:2] == [names[1], names[0]]
    assert any(line.split()[:3] == ["sdb", "broken", "disk-replaced"] for line in lines)

    by_uuid = cli("checkpoints", UUID, "--json", "--config", str(cfg))
    data = json.loads(by_uuid.stdout)
    assert data["domain"] == "web1"
    assert [c["name"] for c in data["checkpoints"]] == names
    assert data["checkpoints"][0]["backed_up_at"] == 1767225700.0
    assert data["disks"]["sdb"] == {
        "valid": False,
        "reason": "disk-replaced",
        "detail": "another image",
        "updated_at": data["disks"]["sdb"]["updated_at"],
    }


async def test_unknown_domain_is_a_clear_error(tmp_path: Path) -> None:
    await seed(tmp_path / "a")
    result = cli("checkpoints", "nope", "--config", str(config_file(tmp_path, "a")))
    assert result.returncode == 1
    assert result.stderr.startswith("backup-agent: no checkpoints recorded for domain 'nope'")
    assert len(result.stderr.splitlines()) == 1


async def test_export_then_import_on_another_host(tmp_path: Path) -> None:
    await seed(tmp_path / "a")
    exported = tmp_path / "web1.json"
    out = cli(
        "ledger", "export", "web1", "-o", str(exported), "--config", str(config_file(tmp_path, "a"))
    )
    assert out.returncode == 0, out.stderr
    other = config_file(tmp_path, "b")
    first = cli("ledger", "import", str(exported), "--config", str(other))
    assert first.returncode == 0 and "imported 2 checkpoints" in first.stdout, first.stderr
    again = cli("ledger", "import", str(exported), "--config", str(other))
    assert again.returncode == 0, again.stderr  # the same chain twice is harmless
    original = json.loads(
        cli("checkpoints", "web1", "--json", "--config", str(config_file(tmp_path, "a"))).stdout
    )
    copied = json.loads(cli("checkpoints", "web1", "--json", "--config", str(other)).stdout)
    assert copied["checkpoints"] == original["checkpoints"]
    assert copied["disks"] == original["disks"]


async def test_bad_import_changes_nothing(tmp_path: Path) -> None:
    await seed(tmp_path / "a")
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "something-else"}')
    cfg = config_file(tmp_path, "a")
    result = cli("ledger", "import", str(broken), "--config", str(cfg))
    assert result.returncode == 1 and result.stderr.startswith("backup-agent: ")
    assert "format: expected 'libvirt-backup-agent/ledger-export'" in result.stderr
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    result = cli("ledger", "import", str(garbage), "--config", str(cfg))
    assert result.returncode == 1 and f"{garbage}: cannot read an exported chain" in result.stderr
    data = json.loads(cli("checkpoints", "web1", "--json", "--config", str(cfg)).stdout)
    assert len(data["checkpoints"]) == 2
