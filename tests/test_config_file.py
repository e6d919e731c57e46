"""agent.core.config_file: the API verbs' reading of ``[http]`` gives what the full
configuration gives, for every way a file can say it, and refuses what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.core.config import AgentConfig, AgentSection, HttpSection, load_config
from agent.core.config_file import SECTION_KEYS, ApiEndpoint, api_endpoint
from agent.core.errors import ConfigError


def _full(config: AgentConfig) -> ApiEndpoint:
    return ApiEndpoint(
        listen=config.http.listen,
        port=config.http.port,
        socket=config.http.socket,
        token_path=config.token_path,
    )


def test_the_embedded_defaults_are_the_full_configurations() -> None:
    assert api_endpoint(None) == _full(AgentConfig())


@pytest.mark.parametrize(
    "text",
    [
        "",
        '[agent]\nstate_dir = "/srv/lba"\n',
        '[agent]\nstate_dir = "/srv/lba"\n[http]\ntoken_file = "/etc/lba/token"\n',
        '[http]\nlisten = "::"\nport = 0\n',
        '[http]\nlisten = "0.0.0.0"\nport = 65535\nsocket = "/run/lba/api.sock"\n',
        '[http]\nallowed_hosts = ["backup.example"]\n[jobs]\nmax_concurrent_backups = 4\n',
    ],
)
def test_a_file_reads_as_the_full_configuration_reads_it(tmp_path: Path, text: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    assert api_endpoint(path) == _full(load_config(path))


def test_the_rest_of_the_file_is_left_to_the_agent(tmp_path: Path) -> None:
    """A mistake outside ``[http]`` and ``state_dir`` (the agent refused it when it
    started, or the file changed since) does not keep the API verbs from the agent."""
    path = tmp_path / "agent.toml"
    path.write_text("[http]\nport = 8711\n[backup]\nno_such_key = 1\n")
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config(path)
    assert api_endpoint(path).port == 8711


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[http]\nlisten = ""\n', "[http] listen: must not be empty, got ''"),
        ('[http]\nport = "8710"\n', "[http] port: must be a whole number, got '8710'"),
        ("[http]\nport = true\n", "[http] port: must be a whole number, got True"),
        ("[http]\nport = 70000\n", "[http] port: must be a whole number from 0 to 65535"),
        ('[http]\nsocket = "api.sock"\n', "[http] socket: must be an absolute path"),
        ('[http]\ntoken_file = "token"\n', "[http] token_file: must be an absolute path"),
        ('[agent]\nstate_dir = "var/lib"\n', "[agent] state_dir: must be an absolute path"),
        ("[agent]\nstate_dir = 3\n", "[agent] state_dir: must be a string, got 3"),
        ('http = "x"\n', "[http] must be a table"),
        ("[http\n", "invalid TOML"),
        ("[http]\nprot = 9000\n", "[http] unknown key 'prot'"),
        ('[agent]\nstatedir = "/srv"\n', "[agent] unknown key 'statedir'"),
    ],
)
def test_what_the_full_configuration_refuses_is_refused_naming_the_key(
    tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as peeked:
        api_endpoint(path)
    assert str(peeked.value).startswith(f"{path}: "), peeked.value
    assert says in str(peeked.value), peeked.value
    with pytest.raises(ConfigError):
        load_config(path)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        api_endpoint(tmp_path / "missing.toml")
    (tmp_path / "latin1.toml").write_bytes(b"# \xe9\n")
    with pytest.raises(ConfigError, match=r"not valid UTF-8 \(byte 2\)"):
        api_endpoint(tmp_path / "latin1.toml")


def test_the_keys_it_knows_are_the_models() -> None:
    assert {
        "http": frozenset(HttpSection.model_fields),
        "agent": frozenset(AgentSection.model_fields),
    } == SECTION_KEYS
