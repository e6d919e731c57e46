"""The repository verbs (`backups`, `restore`, `verify`) as an operator runs them: a real
repository (qemu-img images), the CLI in its own process, exit status and messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.backup.plan import BackupMode
from agent.backup.run import BackupResult
from agent.cli import backups as backups_cli
from agent.repository.manifest import DiskManifest, ExcludedDisk
from agent.repository.store import Repository
from tests.guest_model import agent_cli, config_file
from tests.guest_model import config as agent_config
from tests.test_repository import DOMAIN, Builder, KiB, MiB, _flip_byte, _host_offset

UUID = "6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11"  # what Builder records as the domain's UUID


@pytest.fixture
async def one_disk(tmp_path: Path) -> tuple[Path, Builder]:
    """A repository holding one backup of a one-disk domain, and the config naming it."""
    cfg = agent_config(tmp_path)  # its repository: tmp_path / "repo"
    builder = Builder(Repository(cfg.repository_path))
    await builder.backup({"vda": [(0, MiB, 0x31), (3 * MiB, 64 * KiB, 0x32)]})
    return config_file(tmp_path, cfg), builder


def test_restore_without_disk_writes_a_directory_even_for_one_disk(
    one_disk: tuple[Path, Builder], tmp_path: Path
) -> None:
    config, builder = one_disk
    (backup_id,) = builder.ids
    to = tmp_path / "restored"
    done = agent_cli(
        config, "restore", DOMAIN, "--backup", backup_id, "--to", str(to), "--format", "raw"
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in to.iterdir()) == ["vda.raw"]
    assert (to / "vda.raw").read_bytes() == builder.points[backup_id]["vda"]
    # With --disk, PATH is the file.
    single = tmp_path / "vda.raw"
    done = agent_cli(
        config,
        "restore",
        DOMAIN,
        "--backup",
        backup_id,
        "--disk",
        "vda",
        "--to",
        str(single),
        "--format",
        "raw",
    )
    assert done.returncode == 0, done.stderr
    assert single.read_bytes() == builder.points[backup_id]["vda"]


def test_the_repository_verbs_find_a_domain_by_its_uuid(
    one_disk: tuple[Path, Builder], tmp_path: Path
) -> None:
    config, builder = one_disk
    (backup_id,) = builder.ids
    listed = agent_cli(config, "backups", UUID.upper(), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [entry["id"] for entry in json.loads(listed.stdout)] == [backup_id]
    verified = agent_cli(config, "verify", UUID)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith(f"{DOMAIN}: all checked backups verified")
    to = tmp_path / "by-uuid"
    done = agent_cli(config, "restore", UUID, "--backup", backup_id, "--to", str(to))
    assert done.returncode == 0, done.stderr
    assert (to / "vda.qcow2").exists()


async def test_a_uuid_whose_domain_was_renamed_is_the_newest_name(tmp_path: Path) -> None:
    """Backups under an old name and a new one record the same UUID: the UUID names the
    domain with the newest backup."""
    repo = Repository(tmp_path / "repo")
    for name, count in (("aa-old", 1), ("zz-new", 2)):  # the old name sorts first
        builder = Builder(repo, domain=name)
        for i in range(count):
            await builder.backup({"vda": [(0, 64 * KiB, 0x40 + i)]})
    assert await repo.domain_named(UUID) == "zz-new"
    assert await repo.domain_named("aa-old") == "aa-old"  # a name is itself
    assert await repo.domain_named("0b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11") is None
    assert await repo.domain_named("nosuchvm") is None


@pytest.mark.parametrize(
    "args",
    [
        ("backups", "nosuchvm"),
        ("backups", "nosuchvm", "--json"),
        ("verify", "nosuchvm"),
        ("verify", "0b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11"),
        ("restore", "nosuchvm", "--backup", "20261128T000000Z-000000", "--to", "x"),
    ],
)
def test_a_domain_without_backups_is_an_error_in_every_verb(
    one_disk: tuple[Path, Builder], args: tuple[str, ...]
) -> None:
    config, _ = one_disk
    done = agent_cli(config, *args)
    assert done.returncode == 1
    assert f"no backups of {args[1]!r} in " in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_verify_of_damage_says_whether_the_disk_is_marked_for_a_full_backup(
    one_disk: tuple[Path, Builder], tmp_path: Path
) -> None:
    """Verified where no ledger knows the domain (a repository copied elsewhere): the
    damage is named, and the disk is said not to be marked."""
    config, builder = one_disk
    image = tmp_path / "repo" / DOMAIN / "backups" / builder.ids[0] / "vda.qcow2"
    _flip_byte(image, _host_offset(image, 3 * MiB + 10))
    done = agent_cli(config, "verify", DOMAIN)
    assert done.returncode == 1
    assert f"{builder.ids[0]} vda {image} bytes {3 * MiB}" in done.stdout, done.stdout
    assert f"vda: damaged, but not marked: no ledger here knows {DOMAIN}" in done.stderr


def test_restore_without_disk_to_an_image_file_name_is_refused(
    one_disk: tuple[Path, Builder], tmp_path: Path
) -> None:
    config, builder = one_disk
    to = tmp_path / "vm1.qcow2"
    done = agent_cli(config, "restore", DOMAIN, "--backup", builder.ids[0], "--to", str(to))
    assert done.returncode == 1 and not to.exists()
    assert "looks like an image file: add --disk (vda)" in done.stderr, done.stderr


def test_restore_into_a_directory_it_cannot_create_is_one_line(
    one_disk: tuple[Path, Builder], tmp_path: Path
) -> None:
    config, builder = one_disk
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = agent_cli(
        config, "restore", DOMAIN, "--backup", builder.ids[0], "--to", str(blocker / "x")
    )
    assert done.returncode == 1
    assert f"cannot create directory {blocker / 'x'}" in done.stderr
    assert "Traceback" not in done.stderr


async def test_backups_lists_the_good_and_names_the_damaged(
    one_disk: tuple[Path, Builder], tmp_path: Path
) -> None:
    """The newest manifest overwritten with garbage: listed in place, every other backup
    as ever, exit status 0; verify names it and fails."""
    config, builder = one_disk
    for pattern in (0x41, 0x42):
        await builder.backup({"vda": [(0, 64 * KiB, pattern)]})
    ids = builder.ids
    manifest = tmp_path / "repo" / DOMAIN / "backups" / ids[2] / "manifest.json"
    manifest.write_bytes(bytes(range(256)) * 8)
    listed = agent_cli(config, "backups", DOMAIN, "--json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert [e["id"] for e in entries] == ids
    # Every entry has the keys it always had, and "damaged"; an unreadable one too.
    keys = {"id", "domain", "domain_uuid", "created_at", "completed_at", "mode", "parent"}
    keys |= {"checkpoint", "bytes", "disks", "excluded", "damaged"}
    assert all(set(e) == keys for e in entries)
    assert [e["damaged"] for e in entries[:2]] == [[], []]
    assert entries[1]["mode"] == "incremental" and entries[1]["bytes"] == 64 * KiB
    [damage] = entries[2]["damaged"]
    assert damage["backup_id"] == ids[2] and damage["target"] is None
    assert damage["path"] == str(manifest) and damage["kind"] == "manifest-not-json"
    assert entries[2]["mode"] is None and entries[2]["disks"] == []
    table = agent_cli(config, "backups", DOMAIN)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[3].startswith(ids[2]) and "DAMAGED" in lines[3]
    assert "damaged (1; these do not restore):" in table.stdout
    assert f"  {ids[2]} -: manifest {manifest}: not JSON" in table.stdout
    verified = agent_cli(config, "verify", DOMAIN)
    assert verified.returncode == 1
    assert verified.stdout.startswith(f"{ids[2]} - {manifest}: manifest {manifest}: not JSON")
    assert "1 problem(s) found" in verified.stderr


def test_backups_of_a_domain_whose_every_backup_is_damaged_fails_after_listing(
    one_disk: tuple[Path, Builder], tmp_path: Path
) -> None:
    config, builder = one_disk
    (backup_id,) = builder.ids
    (tmp_path / "repo" / DOMAIN / "backups" / backup_id / "manifest.json").unlink()
    listed = agent_cli(config, "backups", DOMAIN, "--json")
    assert listed.returncode == 1
    [entry] = json.loads(listed.stdout)
    assert entry["id"] == backup_id and entry["damaged"][0]["kind"] == "manifest-missing"
    assert f"no backup of {DOMAIN} in " in listed.stderr and "every one is damaged" in listed.stderr
    restore = agent_cli(config, "restore", DOMAIN, "--backup", backup_id, "--to", str(tmp_path))
    assert restore.returncode == 1 and "is damaged" in restore.stderr, restore.stderr


def test_backup_names_every_disk_the_excluded_ones_with_their_reasons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``backup-agent backup`` (in this process) prints each disk copied and each left out."""
    copied = DiskManifest("vda", "vda.qcow2", "incremental", None, MiB, 4 * KiB, "../b", ())
    raw = DiskManifest(
        "vdb", "vdb.qcow2", "full", "format-raw: no persistent bitmap", MiB, 8 * KiB, None, ()
    )
    result = BackupResult(
        "20261128T101500Z-1a2b3c",
        "db1",
        "cp-2",
        (copied, raw),
        1.25,
        (ExcludedDisk("sdc", "device-cdrom"), ExcludedDisk("vdd", "excluded-by-config")),
    )

    async def run(config: object, domain: str, mode: BackupMode) -> BackupResult:
        assert (domain, mode) == ("db1", BackupMode.INCREMENTAL)
        return result

    monkeypatch.setattr(backups_cli, "_backup", run)
    backups_cli.backup(agent_config(tmp_path), "db1", "incremental")
    assert capsys.readouterr().out == (
        "backup 20261128T101500Z-1a2b3c of db1: vda incremental, "
        "vdb full (format-raw: no persistent bitmap), sdc excluded (device-cdrom), "
        "vdd excluded (excluded-by-config); 12288 bytes in 1.25 s\n"
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ((), "restore needs --to"),
        (("--name", "other"), "--name and --start go with --define"),
        (("--start",), "--name and --start go with --define"),
        (("--define", "--disk", "vda"), "--define restores every disk: leave out --disk"),
        (("--define", "--to", "/tmp/x.qcow2"), "looks like a file"),
    ],
)
def test_restore_options_that_do_not_go_together_are_one_line(
    one_disk: tuple[Path, Builder], args: tuple[str, ...], says: str
) -> None:
    config, builder = one_disk
    done = agent_cli(config, "restore", DOMAIN, "--backup", builder.ids[0], *args)
    assert done.returncode == 1, done.stderr
    assert says in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_restore_json_gives_the_files_on_stdout_and_progress_lines_on_stderr(
    one_disk: tuple[Path, Builder], tmp_path: Path
) -> None:
    config, builder = one_disk
    (backup_id,) = builder.ids
    to = tmp_path / "restored"
    done = agent_cli(
        config,
        "restore",
        DOMAIN,
        "--backup",
        backup_id,
        "--to",
        str(to),
        "--format",
        "raw",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    path = str(to / "vda.raw")
    assert result == {
        "domain": DOMAIN,
        "backup_id": backup_id,
        "files": [{"target": "vda", "path": path, "format": "raw"}],
    }
    assert (to / "vda.raw").read_bytes() == builder.points[backup_id]["vda"]
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    fractions = [line["fraction"] for line in lines if line.get("progress") == "vda"]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0, lines
    assert fractions == sorted(fractions)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("get", "/", "--to", "TMP"), "get /: name a file or directory below /"),
        (("get", "etc/motd", "--to", "TMP"), "give an absolute path in the guest"),
        (("ls", "/etc/../root"), "without '..'"),
        (("get", "/etc", "--to", "TMP/missing"), "give an existing directory"),
    ],
)
def test_files_refuses_what_it_cannot_do_before_starting_anything(
    one_disk: tuple[Path, Builder], tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    config, builder = one_disk
    args = tuple(a.replace("TMP", str(tmp_path)) for a in args)
    done = agent_cli(config, "files", DOMAIN, "--backup", builder.ids[0], *args)
    assert done.returncode == 1, done.stderr
    assert says in done.stderr, done.stderr
