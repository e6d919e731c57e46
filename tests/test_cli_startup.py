"""What the short verbs import: ``--help`` and the verbs that only talk to the running
agent load neither pydantic, aiohttp, structlog, asyncio, rich nor libvirt (their start-up
time is measured in the benchmarks; what makes it is checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("pydantic", "aiohttp", "structlog", "asyncio", "rich", "libvirt", "http", "email", "ssl")

_PROBE = """
import json, sys
from agent.cli.main import main
try:
    status = main(sys.argv[1:])
except SystemExit as exc:
    status = exc.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.stdin.read())))
print(json.dumps({"status": status, "heavy": heavy}))
"""


def _imports(*argv: str) -> tuple[int, list[str], str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv],
        input=json.dumps(HEAVY),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["status"], result["heavy"], done.stderr


def _config(tmp_path: Path, **http: object) -> Path:
    token = tmp_path / "token"
    token.write_text("t" * 43)
    token.chmod(0o600)
    lines = [f'token_file = "{token}"', "port = 9"]  # (discard: nothing listens there)
    lines += [f"{k} = {json.dumps(v)}" for k, v in http.items()]
    path = tmp_path / "agent.toml"
    path.write_text("[http]\n" + "\n".join(lines) + "\n")
    return path


def test_help_imports_nothing_heavy() -> None:
    status, heavy, _ = _imports("--help")
    assert status == 0
    assert heavy == []


@pytest.mark.parametrize(
    "argv",
    [
        ("jobs",),
        ("jobs", "--json", "--domain", "d", "--state", "failed"),
        ("status",),
        ("cancel", "some-job"),
        ("backup", "some-domain"),
        ("backup", "some-domain", "--wait"),
    ],
)
def test_api_verbs_import_nothing_heavy_and_say_the_agent_is_unreachable(
    tmp_path: Path, argv: tuple[str, ...]
) -> None:
    status, heavy, stderr = _imports(*argv, "--config", str(_config(tmp_path)))
    assert status == 1, stderr
    assert "cannot reach the agent at http://127.0.0.1:9" in stderr, stderr
    assert "is `backup-agent run` running?" in stderr, stderr
    assert heavy == []


def test_an_api_verb_on_a_unix_socket_nobody_serves(tmp_path: Path) -> None:
    config = _config(tmp_path, socket=str(tmp_path / "api.sock"))
    status, heavy, stderr = _imports("jobs", "--config", str(config))
    assert status == 1, stderr
    assert f"cannot reach the agent at unix:{tmp_path / 'api.sock'}" in stderr, stderr
    assert heavy == []


def test_a_bad_http_key_is_a_configuration_error_for_the_api_verbs(tmp_path: Path) -> None:
    config = _config(tmp_path, listen="")
    status, _, stderr = _imports("status", "--config", str(config))
    assert status == 2, stderr
    assert f"{config}: [http] listen: must not be empty" in stderr, stderr


def test_backup_local_still_reads_the_whole_configuration(tmp_path: Path) -> None:
    """``backup --local`` runs the backup in this process: the full configuration is
    validated (an unknown key is refused), which the API verbs leave to the agent."""
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nstate_dir = "/nonexistent"\n[backup]\nno_such_key = 1\n')
    status, heavy, stderr = _imports("backup", "d", "--local", "--config", str(config))
    assert status == 2, stderr
    assert "no_such_key" in stderr, stderr
    assert "pydantic" in heavy


def test_the_api_verbs_read_http_answers_as_sent() -> None:
    from agent.cli.control import _parse_response  # noqa: PLC0415

    sized = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nContent-Type: x\r\n\r\n{}trailing"
    assert _parse_response(sized) == (201, b"{}")
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2;x=y\r\n2]\r\n0\r\n\r\n"
    )
    assert _parse_response(chunked) == (200, b"[1,2]")
    assert _parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nbody") == (404, b"body")
    for broken in (
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-",
    ):
        with pytest.raises(OSError):
            _parse_response(broken)
