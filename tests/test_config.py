"""Tests of the configuration: defaults, the committed files, strictness, error messages.

The ``test_cli_*`` tests run ``python -m agent`` and so also check the CLI's side of
the contract: a configuration error is one ``backup-agent: <message>`` line on stderr
and exit status 2.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pydantic
import pytest

from agent.core.config import (
    AgentConfig,
    AgentSection,
    BackupSection,
    HttpSection,
    JobsSection,
    LibvirtSection,
    LoggingSection,
    NatsSection,
    RepositorySection,
    RetentionSection,
    ScheduleEntry,
    json_schema,
    load_config,
    render_toml,
)
from agent.core.config_errors import position
from agent.core.errors import ConfigError
from agent.core.paths import DEFAULT_CONFIG_PATH

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FILE = REPO / "config" / "agent.toml"
SCHEMA_FILE = REPO / "config" / "agent.schema.json"


@pytest.fixture
def hostname(monkeypatch: pytest.MonkeyPatch) -> str:
    # A fixed name that cannot be confused with a default or an empty string.
    monkeypatch.setattr(socket, "gethostname", lambda: "testhost.example")
    return "testhost.example"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "\n" not in str(info.value)
    assert info.value.path == str(path)
    return info.value


# --- defaults and committed files ------------------------------------------------------


def test_defaults() -> None:
    cfg = load_config(None)
    assert cfg == AgentConfig()
    assert cfg.agent.state_dir == Path("/var/lib/libvirt-backup-agent")
    assert cfg.agent.host_id == ""
    assert cfg.libvirt.uri == "qemu:///system"
    assert cfg.libvirt.keepalive_interval == 5
    assert cfg.libvirt.keepalive_count == 3
    assert cfg.libvirt.call_timeout == 60.0
    assert cfg.libvirt.reconnect_initial_delay == 1.0
    assert cfg.libvirt.reconnect_max_delay == 60.0
    assert cfg.logging.level == "info"
    assert cfg.logging.format == "auto"
    assert cfg.http.listen == "127.0.0.1"
    assert cfg.http.port == 8710
    assert cfg.repository.path == ""
    assert Path("/etc/libvirt-backup-agent/agent.toml") == DEFAULT_CONFIG_PATH


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == AgentConfig()


def test_committed_default_file_equals_embedded_defaults() -> None:
    assert load_config(DEFAULT_FILE) == AgentConfig()


def test_committed_default_file_lists_every_key() -> None:
    # Equality with the defaults alone would pass for an empty file.
    written = tomllib.loads(DEFAULT_FILE.read_text(encoding="utf-8"))
    expected = AgentConfig().model_dump()
    # [[schedules]] are a list, empty by default: the file shows a commented example.
    assert expected.pop("schedules") == []
    assert {s: set(keys) for s, keys in written.items()} == {
        s: set(keys) for s, keys in expected.items()
    }


def test_the_commented_schedule_example_is_valid(tmp_path: Path) -> None:
    text = DEFAULT_FILE.read_text(encoding="utf-8")
    example = text[text.index("#   [[schedules]]") :]
    lines = [line.removeprefix("#   ") for line in example.splitlines() if line.startswith("#   ")]
    cfg = load_config(write(tmp_path, "\n".join(lines)))
    [entry] = cfg.schedules
    assert (entry.name, entry.cron, entry.domains, entry.keep_last) == (
        "nightly",
        "30 1 * * *",
        ["web-*", "db1"],
        7,
    )


def test_retention_per_domain_name_then_first_pattern_then_the_default(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            '[retention]\nkeep_last = 3\n[retention.domains]\n"web-*" = 14\n"w*" = 9\n'
            '"web-9" = 30\n"db1" = 0\n',
        )
    )
    retention = cfg.retention
    assert retention.keep_last_for("web-9") == 30  # written out, although patterns match
    assert retention.keep_last_for("web-1") == 14  # the first matching pattern
    assert retention.keep_last_for("www") == 9
    assert retention.keep_last_for("db1") == 0  # keeps all, whatever the default
    assert retention.keep_last_for("mail") == 3
    assert retention.keep_last_for("WEB-1") == 3  # names are case-sensitive
    assert AgentConfig().retention.keep_last_for("any") == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[retention.domains]\n"db1" = -1\n', "[retention.domains] db1: must be >= 0, got -1"),
        ('[retention.domains]\n"db1" = "7"\n', "[retention.domains] db1: expected an integer"),
        ('[retention.domains]\n"" = 7\n', "[retention.domains] key '': must not be empty"),
    ],
)
def test_retention_per_domain_values_are_checked(tmp_path: Path, text: str, message: str) -> None:
    error = config_error(write(tmp_path, text))
    assert message in str(error), str(error)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[jobs]\nrestore_file_mode = "0755"\n',
            "[jobs] restore_file_mode: '0755' has execute bits: an image is never a program",
        ),
        (
            '[jobs]\nrestore_file_mode = "rw-------"\n',
            "[jobs] restore_file_mode: string should match pattern",
        ),
        (
            '[http]\nallowed_hosts = ["evil/host"]\n',
            "[http.allowed_hosts] 0: 'evil/host' is not a host name or an IP address (no port)",
        ),
        (
            '[agent]\nsetpriv = "setpriv"\n',
            "[agent] setpriv: must be an absolute path",
        ),
        (
            '[[schedules]]\nname = "a"\ncron = "61 * * * *"\n',
            "[schedules.0] cron: not a valid five-field cron expression",
        ),
        (
            '[[schedules]]\nname = "a"\ncron = "* * * * *"\n'
            '[[schedules]]\nname = "a"\ncron = "0 1 * * *"\n',
            "schedule names must be unique: a",
        ),
    ],
)
def test_control_plane_settings_are_checked(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert message in str(caught.value)


def test_backup_exclude_by_name_and_pattern_every_matching_entry_applies(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            '[backup.exclude]\n"db1" = ["vdc"]\n"db*" = ["sd[x-z]", "vde"]\n"*" = ["hd?"]\n',
        )
    )
    backup = cfg.backup
    assert backup.exclude == {"db1": ["vdc"], "db*": ["sd[x-z]", "vde"], "*": ["hd?"]}
    excluded = {
        t for t in ("vda", "vdc", "vde", "sdx", "sdz", "sdw", "hda") if backup.excluded("db1", t)
    }
    assert excluded == {"vdc", "vde", "sdx", "sdz", "hda"}  # all three entries
    assert {t for t in ("vdc", "vde", "sdy", "hdb") if backup.excluded("db2", t)} == {
        "vde",
        "sdy",
        "hdb",
    }
    assert not backup.excluded("web", "vdc") and backup.excluded("web", "hdc")
    # Names and targets are matched case-sensitively, and whole.
    assert not backup.excluded("DB1", "vde") and not backup.excluded("db1", "VDC")
    assert not backup.excluded("db1", "vdc1") and not backup.excluded("xdb1", "vde")
    # Nothing is left out by default.
    assert AgentConfig().backup.exclude == {}
    assert not AgentConfig().backup.excluded("db1", "vda")
    assert not BackupSection(exclude={"db1": []}).excluded("db1", "vda")


@pytest.mark.parametrize(
    ("text", "message", "key"),
    [
        (
            '[backup.exclude]\n"" = ["vdc"]\n',
            "[backup.exclude] key '': must not be empty, got ''",
            "backup.exclude..[key]",
        ),
        (
            '[backup.exclude]\n"db1" = [""]\n',
            "[backup.exclude.db1] 0: must not be empty, got ''",
            "backup.exclude.db1.0",
        ),
        (
            '[backup.exclude]\n"db1" = "vdc"\n',
            "[backup.exclude] db1: input should be a valid list, got 'vdc'",
            "backup.exclude.db1",
        ),
        (
            '[backup.exclude]\n"db1" = ["vdc", 3]\n',
            "[backup.exclude.db1] 1: expected a string, got 3",
            "backup.exclude.db1.1",
        ),
        (
            "[backup]\nexclude = 5\n",
            "[backup] exclude: input should be a valid dictionary, got 5",
            "backup.exclude",
        ),
    ],
)
def test_backup_exclude_values_are_checked(
    tmp_path: Path, text: str, message: str, key: str
) -> None:
    path = write(tmp_path, text)
    error = config_error(path)
    assert str(error) == f"{path}: {message}"
    assert error.key == key


def test_backup_exclude_round_trips_through_render(tmp_path: Path) -> None:
    cfg = AgentConfig(backup=BackupSection(exclude={"db1": ["vdc"], "web-*": ["sd[x-z]"]}))
    loaded = load_config(write(tmp_path, render_toml(cfg)))
    assert loaded.backup.exclude == cfg.backup.exclude
    assert loaded.backup.excluded("web-3", "sdy")


def test_errors_are_ordered_by_where_their_keys_are_in_the_file() -> None:
    data = {"http": {"port": "x", "listen": 1}, "backup": {"exclude": {"a": [1], "b": [""]}}}
    assert position(data, ("http", "listen")) == (0, 1)
    assert position(data, ("backup", "exclude", "b", 0)) == (1, 0, 1)
    # A location the file does not hold (a default's check, pydantic's "[key]"): as far
    # as it goes.
    assert position(data, ("backup", "exclude", "a", "[key]")) == (1, 0, 0)
    assert position(data, ("jobs", "restore_dir")) == ()


def test_committed_schema_is_current() -> None:
    assert json.loads(SCHEMA_FILE.read_text(encoding="utf-8")) == json_schema()


def test_schema_forbids_unknown_keys() -> None:
    schema = json_schema()
    assert schema["additionalProperties"] is False
    sections = schema["$defs"]
    assert all(section["additionalProperties"] is False for section in sections.values())
    assert sections["HttpSection"]["properties"]["port"]["maximum"] == 65535


def test_write_schema_command(tmp_path: Path) -> None:
    out = tmp_path / "schema.json"
    subprocess.run(
        [sys.executable, "-m", "agent.core.config", "--write-schema", str(out)],
        cwd=REPO,
        check=True,
        timeout=60,
    )
    assert json.loads(out.read_text(encoding="utf-8")) == json_schema()


# --- valid files -----------------------------------------------------------------------


def test_override_changes_exactly_what_it_sets(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[libvirt]\nuri = "qemu+ssh://h/system"\nkeepalive_count = 7\n'
        '[logging]\nlevel = "debug"\n'
        "[http]\nport = 9000\n",
    )
    assert load_config(path) == AgentConfig(
        libvirt=LibvirtSection(uri="qemu+ssh://h/system", keepalive_count=7),
        logging=LoggingSection(level="debug"),
        http=HttpSection(port=9000),
    )


def test_integer_accepted_where_seconds_are_float(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[libvirt]\ncall_timeout = 30\n"))
    assert cfg.libvirt.call_timeout == 30.0
    assert isinstance(cfg.libvirt.call_timeout, float)


def test_reconnect_max_delay_may_equal_initial_delay(tmp_path: Path) -> None:
    path = write(tmp_path, "[libvirt]\nreconnect_initial_delay = 5\nreconnect_max_delay = 5\n")
    assert load_config(path).libvirt.reconnect_max_delay == 5.0


def test_repository_path_defaults_below_state_dir(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, f'[agent]\nstate_dir = "{tmp_path}/state"\n'))
    assert cfg.agent.state_dir == tmp_path / "state"
    assert cfg.repository_path == tmp_path / "state" / "repository"
    assert AgentConfig().repository_path == Path("/var/lib/libvirt-backup-agent/repository")


def test_repository_path_explicit(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[repository]\npath = "/srv/backups"\n'))
    assert cfg.repository_path == Path("/srv/backups")


def test_resolved_host_id(hostname: str) -> None:
    assert AgentConfig().resolved_host_id == hostname
    assert AgentConfig(agent=AgentSection(host_id="kvm-01")).resolved_host_id == "kvm-01"


def test_config_is_frozen() -> None:
    cfg = AgentConfig()
    with pytest.raises(pydantic.ValidationError):
        cfg.http.port = 1
    with pytest.raises(pydantic.ValidationError):
        cfg.http = HttpSection(port=1)
    assert cfg.http.port == 8710


# --- render_toml -----------------------------------------------------------------------


def test_render_shows_resolved_values(hostname: str) -> None:
    shown = tomllib.loads(render_toml(AgentConfig()))
    assert shown["agent"]["host_id"] == hostname
    assert shown["agent"]["state_dir"] == "/var/lib/libvirt-backup-agent"
    assert shown["repository"]["path"] == "/var/lib/libvirt-backup-agent/repository"
    assert shown["backup"]["scratch_dir"] == "/var/lib/libvirt-backup-agent/scratch"
    assert shown["libvirt"]["call_timeout"] == 60.0
    assert shown["http"]["port"] == 8710


def test_render_round_trips_explicit_config(tmp_path: Path) -> None:
    cfg = AgentConfig(
        agent=AgentSection(state_dir=tmp_path / "state", host_id="kvm-01"),
        libvirt=LibvirtSection(keepalive_interval=9, reconnect_max_delay=120.0),
        logging=LoggingSection(format="json"),
        http=HttpSection(listen="::1", port=1234, token_file=str(tmp_path / "token")),
        repository=RepositorySection(path=str(tmp_path / "repo")),
        backup=BackupSection(scratch_dir=str(tmp_path / "scratch"), connections=2),
        retention=RetentionSection(keep_last=3),
        jobs=JobsSection(restore_dir=str(tmp_path / "restores"), max_concurrent_backups=3),
        nats=NatsSection(url="nats://127.0.0.1:4222", ack_wait=10.0),
        schedules=[ScheduleEntry(name="nightly", cron="0 2 * * *", domains=["web-*"])],
    )
    assert load_config(write(tmp_path, render_toml(cfg))) == cfg


def test_render_round_trips_defaults_to_resolved_config(tmp_path: Path, hostname: str) -> None:
    cfg = AgentConfig()
    loaded = load_config(write(tmp_path, render_toml(cfg)))
    assert loaded == cfg.resolved()
    assert loaded.agent.host_id == hostname
    assert loaded.repository_path == cfg.repository_path
    assert render_toml(loaded) == render_toml(cfg)


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message", "key"),
    [
        ('[libvirt]\nurii = "x"\n', "[libvirt] unknown key 'urii'", "libvirt.urii"),
        ("[foo]\nx = 1\n", "unknown section [foo]", "foo"),
        ("top = 1\n", "unknown section [top]", "top"),
        (
            '[libvirt]\nkeepalive_interval = "five"\n',
            "[libvirt] keepalive_interval: expected an integer, got 'five'",
            "libvirt.keepalive_interval",
        ),
        (
            '[libvirt]\nkeepalive_interval = "5"\n',
            "[libvirt] keepalive_interval: expected an integer, got '5'",
            "libvirt.keepalive_interval",
        ),
        (
            "[libvirt]\nkeepalive_count = 2.5\n",
            "[libvirt] keepalive_count: expected an integer, got 2.5",
            "libvirt.keepalive_count",
        ),
        (
            "[libvirt]\nkeepalive_count = true\n",
            "[libvirt] keepalive_count: expected an integer, got true",
            "libvirt.keepalive_count",
        ),
        (
            "[libvirt]\nkeepalive_interval = 0\n",
            "[libvirt] keepalive_interval: must be >= 1, got 0",
            "libvirt.keepalive_interval",
        ),
        (
            '[libvirt]\ncall_timeout = "60"\n',
            "[libvirt] call_timeout: expected a number, got '60'",
            "libvirt.call_timeout",
        ),
        (
            "[libvirt]\ncall_timeout = 0.0\n",
            "[libvirt] call_timeout: must be > 0.0, got 0.0",
            "libvirt.call_timeout",
        ),
        (
            "[libvirt]\ncall_timeout = inf\n",
            "[libvirt] call_timeout: expected a finite number, got inf",
            "libvirt.call_timeout",
        ),
        (
            "[libvirt]\nreconnect_initial_delay = 10.0\nreconnect_max_delay = 5.0\n",
            "[libvirt] reconnect_max_delay: must be >= reconnect_initial_delay (10.0), got 5.0",
            "libvirt.reconnect_max_delay",
        ),
        ('[libvirt]\nuri = ""\n', "[libvirt] uri: must not be empty, got ''", "libvirt.uri"),
        (
            "[http]\nport = 70000\n",
            "[http] port: must be <= 65535, got 70000",
            "http.port",
        ),
        (
            '[logging]\nlevel = "loud"\n',
            "[logging] level: expected 'debug', 'info', 'warning' or 'error', got 'loud'",
            "logging.level",
        ),
        (
            '[agent]\nstate_dir = "var/lib/x"\n',
            "[agent] state_dir: must be an absolute path, got 'var/lib/x'",
            "agent.state_dir",
        ),
        (
            "[agent]\nstate_dir = 5\n",
            "[agent] state_dir: expected a path as a string, got 5",
            "agent.state_dir",
        ),
        (
            '[repository]\npath = "backups"\n',
            "[repository] path: must be an absolute path, got 'backups'",
            "repository.path",
        ),
        ("libvirt = 5\n", "libvirt: expected a table, got 5", "libvirt"),
        (
            "[backup]\nread_size = 5000\n",
            "[backup] read_size: input should be a multiple of 4096, got 5000",
            "backup.read_size",
        ),
        (
            '[http]\nport = "x"\nlisten = 1\n[logging]\nlevel = "loud"\n',
            "[http] port: expected an integer, got 'x' (and 2 more)",
            "http.port",
        ),
    ],
)
def test_invalid_value(tmp_path: Path, text: str, message: str, key: str) -> None:
    path = write(tmp_path, text)
    error = config_error(path)
    assert str(error) == f"{path}: {message}"
    assert error.key == key
    assert isinstance(error.__cause__, pydantic.ValidationError)


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, '[libvirt]\nuri = "qemu:///system\n')
    error = config_error(path)
    assert str(error).startswith(f"{path}: invalid TOML: ")
    assert "line 2" in str(error)
    assert error.key is None
    assert isinstance(error.__cause__, tomllib.TOMLDecodeError)


def test_duplicate_key_is_invalid_toml(tmp_path: Path) -> None:
    error = config_error(write(tmp_path, "[http]\nport = 1\nport = 2\n"))
    assert ": invalid TOML: " in str(error)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    error = config_error(path)
    assert str(error) == f"{path}: cannot read configuration: No such file or directory"
    assert error.key is None
    assert isinstance(error.__cause__, FileNotFoundError)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    error = config_error(tmp_path)
    assert str(error) == f"{tmp_path}: cannot read configuration: Is a directory"
    assert isinstance(error.__cause__, IsADirectoryError)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b'[libvirt]\nuri = "\xff"\n')
    error = config_error(path)
    assert str(error).startswith(f"{path}: cannot read configuration: not valid UTF-8")
    assert isinstance(error.__cause__, UnicodeDecodeError)


# --- CLI (needs agent/cli/main.py and agent/__main__.py) ------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


BAD_FILES = {
    "unknown-key": '[libvirt]\nurii = "x"\n',
    "wrong-type": '[libvirt]\nkeepalive_interval = "five"\n',
    "missing": None,
}


@pytest.mark.parametrize("command", [("config", "--show"), ("run",)], ids=["show", "run"])
@pytest.mark.parametrize("case", BAD_FILES)
def test_cli_rejects_bad_config(tmp_path: Path, command: tuple[str, ...], case: str) -> None:
    text = BAD_FILES[case]
    path = tmp_path / "agent.toml" if text is None else write(tmp_path, text)
    with pytest.raises(ConfigError) as expected:
        load_config(path)

    result = run_cli(*command, "--config", str(path))

    assert result.returncode == 2
    assert result.stderr == f"backup-agent: {expected.value}\n"
    assert result.stdout == ""


def test_cli_show_prints_effective_config(tmp_path: Path) -> None:
    path = write(tmp_path, "[http]\nport = 9000\n")

    result = run_cli("config", "--show", "--config", str(path))

    assert result.returncode == 0, result.stderr
    assert result.stdout == render_toml(load_config(path))
    assert tomllib.loads(result.stdout)["http"]["port"] == 9000
