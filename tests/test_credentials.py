"""The API token file and the API's request gate, as pure logic (no agent, no libvirt)."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.control.api import ApiParts, make_app
from agent.control.credentials import ensure_token, read_token
from agent.control.gate import Gate, RefusalLog, _host_name
from agent.control.metrics import Metrics
from agent.core.config import BackupSection
from agent.core.errors import ConfigError


def test_the_default_token_is_made_once_root_only_and_read_back(tmp_path: Path) -> None:
    for round_ in range(30):  # eight starts at once, many times: none reads a half token
        path = tmp_path / f"state-{round_}" / "api-token"
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            make = functools.partial(ensure_token, path, made_here=True)
            tokens = set(pool.map(lambda _, make=make: make(), range(8)))
        assert len(tokens) == 1
        assert sorted(p.name for p in path.parent.iterdir()) == ["api-token"]  # no temporary
    [token] = tokens
    assert len(token) >= 32 and token.isascii() and " " not in token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_token(path) == token == ensure_token(path, made_here=True)


def test_a_named_token_file_is_never_made(tmp_path: Path) -> None:
    path = tmp_path / "token"
    with pytest.raises(ConfigError, match=r"token_file .*/token: no API token there"):
        ensure_token(path, made_here=False)
    assert not path.exists()


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        ("a-good-long-token-1234\n", 0o644, r"group or others may read it \(mode 0644\)"),
        ("a-good-long-token-1234\n", 0o602, r"group or others may read it \(mode 0602\)"),
        ("a-good-long-token-1234\n", 0o640, r"group or others may read it \(mode 0640\)"),
        ("short\n", 0o600, "one word of at least 16 characters"),
        ("two words here, long enough\n", 0o600, "one word of at least 16 characters"),
        ("\n", 0o600, "one word of at least 16 characters"),
    ],
)
def test_a_token_file_others_may_read_or_a_bad_token_is_refused(
    tmp_path: Path, content: str, mode: int, message: str
) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    path.chmod(mode)
    with pytest.raises(ConfigError, match=message) as caught:
        read_token(path)
    assert caught.value.key == "http.token_file"


def test_a_token_file_someone_else_owns_or_a_planted_link_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("chosen-by-someone-else-1234\n")
    path.chmod(0o600)
    os.chown(path, 65534, 65534)  # nobody's: they chose the token
    with pytest.raises(ConfigError, match=r"owned by uid 65534, not by this process's user"):
        read_token(path)
    # A link planted where the default token goes is not followed, nor replaced.
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    target.write_text("known-to-the-attacker-1234\n")
    target.chmod(0o600)
    (state / "api-token").symlink_to(target)
    with pytest.raises(ConfigError, match="cannot read it: a symbolic link"):
        ensure_token(state / "api-token", made_here=True)
    assert (
        state / "api-token"
    ).is_symlink() and target.read_text() == "known-to-the-attacker-1234\n"
    # An operator's named token file may be a link (to a secrets store, say).
    assert read_token(state / "api-token") == "known-to-the-attacker-1234"


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:8710", "localhost"),
        ("LOCALHOST", "localhost"),
        ("[::1]:8710", "::1"),
        ("[::1]", "::1"),
        ("[0:0::1]", "::1"),  # one address, however it is written
        ("[FD00:0::2]:1", "fd00::2"),
        ("127.0.0.1", "127.0.0.1"),
        ("evil.example:80", "evil.example"),
        ("a:b:c", None),  # not host:port
        ("[::1]evil.example", None),
        ("[::1]:abc", None),
        ("user@localhost", None),
        ("localhost:8710/x", None),
        ("", None),
    ],
)
def test_host_names_are_read_without_their_port(header: str, name: str | None) -> None:
    assert _host_name(header) == name


def test_refusals_are_logged_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[dict[str, Any]] = []
    monkeypatch.setattr(
        "agent.control.gate.log.warning", lambda event, **kw: lines.append({"event": event, **kw})
    )
    clock = [1000.0]
    monkeypatch.setattr("agent.control.gate.time.monotonic", lambda: clock[0])
    refusals = RefusalLog(every=60.0)
    request: Any = type("R", (), {"path": "/v1/jobs", "remote": "127.0.0.1"})()
    for _ in range(50):
        refusals.refused("missing bearer token", request)
    clock[0] += 61
    refusals.refused("wrong bearer token", request)
    refusals.refused("host-not-allowed", request)
    refusals.flush()  # at shutdown: what is still uncounted
    refusals.flush()  # (nothing more)
    assert [
        (line.get("why"), line["refused_since_last_line"], line["reasons"]) for line in lines
    ] == [
        ("missing bearer token", 1, {"missing bearer token": 1}),
        ("wrong bearer token", 50, {"missing bearer token": 49, "wrong bearer token": 1}),
        (None, 1, {"host-not-allowed": 1}),
    ]
    assert lines[1]["remotes"] == {"127.0.0.1": 50}


async def test_the_gate_checks_host_then_token_then_media_type() -> None:
    parts: Any = ApiParts(
        jobs=None,  # type: ignore[arg-type]
        chains=None,  # type: ignore[arg-type]
        domains=None,  # type: ignore[arg-type]
        connection=None,  # type: ignore[arg-type]
        repository=None,  # type: ignore[arg-type]
        metrics=Metrics(),
        backup=BackupSection(),
    )
    token = "t0ken-" + "x" * 26
    app: web.Application = make_app(parts, Gate(token=token, hosts=frozenset({"vm-host.lan"})))
    async with TestClient(TestServer(app)) as client:
        auth = {"Authorization": f"Bearer {token}"}
        body = b'{"kind": "reconcile", "domain": "x"}'
        cases = [
            ({"Host": "evil.example", **auth}, 400, "host-not-allowed"),
            ({"Host": "vm-host.lan:8710"}, 401, "unauthorized"),
            ({"Host": "vm-host.lan", **auth, "Content-Type": "text/plain"}, 415, None),
            ({"Host": "localhost", **auth}, 415, "unsupported-media-type"),  # no type at all
        ]
        for headers, status, code in cases:
            response = await client.post("/v1/jobs", data=body, headers=headers)
            answer = await response.json()
            assert response.status == status, (headers, answer)
            assert code is None or answer["error"]["code"] == code
        response = await client.get("/healthz", headers={"Host": "vm-host.lan"})
        assert response.status == 200
        response = await client.get("/v1/openapi.json", headers={"Host": "localhost"})
        assert response.status == 401  # every /v1 route, its document included
