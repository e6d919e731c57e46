"""Security on the defaults, against a real agent process (#17).

- Every ``/v1`` route answers 401 without the token the agent made on its first start
  (``<state_dir>/api-token``, 0600), and with a wrong one; ``/healthz``, ``/readyz`` and
  ``/metrics`` stay open. Refusals are logged once a minute, not once a request.
- A job body a browser could send without asking first (``text/plain``, a form) is
  refused with 415 and creates no job; the same body as JSON does. A ``Host`` that is
  not a name of the agent is refused (DNS rebinding); no CORS header is ever sent.
- The CLI, as root, talks to the agent with no token configured anywhere.
- Every file and socket the agent makes (repository, scratch, restores, sockets, the
  ledger and job store, the token) cannot be read or connected to by ``nobody``: checked
  while a backup is stopped half-way (the agent killed -9 mid-copy, so scratch files and
  sockets are there) and after the next backup and a restore. The agent's directories
  sit in a directory every user may enter, and a file there that ``nobody`` may read is
  read, so a refusal is the agent's doing.
- The Unix socket listener (``[http] socket``): 0600, no token, refused to ``nobody``.
- A setpriv that is missing stops the agent at start, naming the setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.core.config import AgentConfig, load_config
from agent.core.faults import CRASH_ENV
from tests.guest_model import Guest, MiB, agent_cli
from tests.testbed.agent_process import AgentProcess, agent_process
from tests.testbed.domains import DiskSpec, DomainFactory

pytestmark = pytest.mark.libvirt

SYSTEM_PYTHON = "/usr/bin/python3"  # one `nobody` may run (the venv's lies under /root)
VALID_JOB = {"kind": "reconcile", "domain": "sec-no-such-domain"}

# Run as nobody: for each "kind:path" argument, "ok" if it could be read (a file: a byte;
# a directory: listed; a socket: connected), else the errno's name.
_PROBE = r"""
import errno, json, os, socket, sys
out = {}
for arg in sys.argv[1:]:
    kind, _, path = arg.partition(":")
    try:
        if kind == "f":
            with open(path, "rb") as f:
                f.read(1)
        elif kind == "d":
            os.listdir(path)
        else:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
            finally:
                s.close()
        out[path] = "ok"
    except OSError as exc:
        out[path] = errno.errorcode.get(exc.errno, str(exc.errno))
print(json.dumps(out))
"""


def _as_nobody(entries: Mapping[Path, str]) -> dict[str, str]:
    """What ``nobody`` gets for each path (kind ``f``, ``d`` or ``s``)."""
    assert Path(SYSTEM_PYTHON).exists(), f"{SYSTEM_PYTHON} is needed to act as nobody"
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", _PROBE, *(f"{kind}:{path}" for path, kind in entries.items())],
        user="nobody",
        group="nogroup",
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd="/",
    )
    result: dict[str, str] = json.loads(done.stdout)
    return result


def _kind(path: Path) -> str:
    mode = path.lstat().st_mode
    if stat.S_ISSOCK(mode):
        return "s"
    return "d" if stat.S_ISDIR(mode) else "f"


def _everything_under(*roots: Path) -> dict[Path, str]:
    found: dict[Path, str] = {}
    for root in roots:
        if not root.exists():
            continue
        found[root] = _kind(root)
        for directory, dirs, files in os.walk(root):
            for name in [*dirs, *files]:
                path = Path(directory) / name
                if not path.is_symlink():
                    found[path] = _kind(path)
    return found


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A short directory every user may enter (0755, in /var/tmp): the agent's own
    directories go in it, so nothing above them hides them from ``nobody``."""
    base = Path(tempfile.mkdtemp(prefix="lbat-sec-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _settings(base: Path, **more: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults but for where the files go (inside ``base``): no token configured."""
    return {
        "agent": {"state_dir": str(base / "state")},
        "repository": {"path": str(base / "repo")},
        **more,
    }


def _request(
    agent: AgentProcess,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Mapping[str, str], Any]:
    """One request with exactly these headers (urllib adds no Content-Type to a body
    given as bytes with one set here); (status, headers, decoded JSON or text)."""
    request = urllib.request.Request(agent.url + path, data=body, method=method)
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, got, payload = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, got, payload = exc.code, dict(exc.headers), exc.read()
    try:
        return status, got, json.loads(payload)
    except ValueError:
        return status, got, payload.decode(errors="replace")


def _routes(agent: AgentProcess) -> list[tuple[str, str]]:
    """Every (method, path) of ``/v1`` the agent's own OpenAPI document lists, with
    sample parameters filled in."""
    status, document = agent.call("GET", "/v1/openapi.json")
    assert status == 200, document
    samples = {"{job_id}": "sec-job-1", "{domain}": "sec-domain"}
    routes = [("GET", "/v1/openapi.json")]
    for template, operations in document["paths"].items():
        path = template
        for name, value in samples.items():
            path = path.replace(name, value)
        routes += [
            (method.upper(), path)
            for method in operations
            if method in ("get", "post", "put", "patch", "delete") and path.startswith("/v1")
        ]
    return routes


def _refusal_lines(agent: AgentProcess) -> list[dict[str, Any]]:
    lines = []
    for line in agent.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == "API request refused":
                lines.append(record)
    return lines


async def test_the_api_on_its_defaults_refuses_what_lacks_the_token_or_a_browser_could_forge(
    libvirtd: None, tmp_path: Path, open_base: Path
) -> None:
    with agent_process(tmp_path, _settings(open_base)) as agent:
        await asyncio.to_thread(agent.start)
        await asyncio.to_thread(_check_token_and_routes, agent, load_config(agent.config))
        await asyncio.to_thread(_check_forged_bodies, agent)
        await asyncio.to_thread(_check_hosts_and_cors, agent)
        # Every refusal above (dozens, within a minute) made one log line so far...
        refusals = await asyncio.to_thread(_refusal_lines, agent)
        assert len(refusals) == 1, refusals
        assert refusals[0]["why"] == "missing bearer token"
        await asyncio.to_thread(agent.stop)
    # ... and one more as the agent stopped, with the count of all the others, by reason.
    refusals = await asyncio.to_thread(_refusal_lines, agent)
    assert len(refusals) == 2, refusals
    assert refusals[1]["refused_since_last_line"] >= 40, refusals[1]
    assert set(refusals[1]["reasons"]) == {
        "missing bearer token",
        "wrong bearer token",
        "host-not-allowed",
    }


def _check_token_and_routes(agent: AgentProcess, cfg: AgentConfig) -> None:
    token_file = cfg.agent.state_dir / "api-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 32 and agent.token == token
    routes = _routes(agent)
    expected = {
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/sec-job-1"),
        ("DELETE", "/v1/jobs/sec-job-1"),
        ("GET", "/v1/domains"),
        ("GET", "/v1/domains/sec-domain/checkpoints"),
        ("GET", "/v1/domains/sec-domain/backups"),
        ("GET", "/v1/openapi.json"),
    }
    assert expected <= set(routes), routes
    body = json.dumps(VALID_JOB).encode()
    for method, path in routes:
        data = body if method == "POST" else None
        json_type = {"Content-Type": "application/json"}
        for headers in (
            json_type,
            {**json_type, "Authorization": "Bearer " + "x" * len(token)},
            {**json_type, "Authorization": token},  # no scheme
            {**json_type, "Authorization": "Basic " + token},
        ):
            status, got, answer = _request(agent, method, path, body=data, headers=headers)
            assert status == 401, (method, path, headers, answer)
            assert answer["error"]["code"] == "unauthorized"
            assert got.get("WWW-Authenticate", "").startswith("Bearer")
    for path in ("/healthz", "/readyz", "/metrics"):
        status, _, answer = _request(agent, "GET", path)
        assert status == 200, (path, answer)
    status, jobs = agent.call("GET", "/v1/jobs")
    assert status == 200 and jobs["jobs"] == [], jobs


def _check_forged_bodies(agent: AgentProcess) -> None:
    auth = {"Authorization": f"Bearer {agent.token}"}
    body = json.dumps(VALID_JOB).encode()
    for content_type, data in (
        ("text/plain", body),
        ("text/plain;charset=UTF-8", body),
        ("application/x-www-form-urlencoded", body),
        ("application/x-www-form-urlencoded", b"kind=reconcile&domain=sec-no-such-domain"),
        ("multipart/form-data; boundary=x", b"--x\r\n\r\n" + body + b"\r\n--x--\r\n"),
    ):
        headers = {**auth, "Content-Type": content_type}
        status, got, answer = _request(agent, "POST", "/v1/jobs", body=data, headers=headers)
        assert status == 415, (content_type, answer)
        assert answer["error"]["code"] == "unsupported-media-type"
        assert not any(k.lower().startswith("access-control-") for k in got)
    status, jobs = agent.call("GET", "/v1/jobs")
    assert status == 200 and jobs["jobs"] == [], jobs  # no job from any of them
    # The same body as JSON is a valid job: the refusals were for the media type alone.
    headers = {**auth, "Content-Type": "application/json; charset=utf-8"}
    status, _, job = _request(agent, "POST", "/v1/jobs", body=body, headers=headers)
    assert status == 201, job
    status, jobs = agent.call("GET", "/v1/jobs")
    assert [j["id"] for j in jobs["jobs"]] == [job["id"]]


def _check_hosts_and_cors(agent: AgentProcess) -> None:
    auth = {"Authorization": f"Bearer {agent.token}"}
    port = agent.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "[::2]", ""):
        for path in ("/v1/jobs", "/metrics"):
            status, _, answer = _request(agent, "GET", path, headers={**auth, "Host": host})
            assert status == 400, (host, path, answer)
            assert answer["error"]["code"] == "host-not-allowed"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
        status, _, answer = _request(agent, "GET", "/v1/jobs", headers={**auth, "Host": host})
        assert status == 200, (host, answer)
    # A CORS preflight gets no permission, and no answer carries a CORS header.
    preflight = {
        "Origin": "http://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    status, got, _ = _request(agent, "OPTIONS", "/v1/jobs", headers=preflight)
    assert status in (401, 405), status
    status, got2, _ = _request(agent, "GET", "/v1/jobs", headers={**auth, "Origin": "http://x"})
    assert status == 200
    for headers in (got, got2):
        assert not any(k.lower().startswith("access-control-") for k in headers), headers


async def test_what_the_agent_writes_is_root_only(
    domain_factory: DomainFactory, tmp_path: Path, open_base: Path
) -> None:
    canary = open_base / "canary"
    canary.write_bytes(b"readable")
    canary.chmod(0o644)
    with agent_process(tmp_path, _settings(open_base)) as agent:
        cfg = load_config(agent.config)
        assert cfg.socket_path == cfg.run_path  # the sockets are in the state directory
        td = await asyncio.to_thread(domain_factory, persistent=True, disks=[DiskSpec("vda")])
        guest = Guest(td)
        await guest.write("vda", 0, 16 * MiB, 0x5E)
        try:
            # Killed half-way through a backup: scratch, sockets and the staged image stay.
            await asyncio.to_thread(agent.start, extra_env={CRASH_ENV: "copy:half"})
            status, job = await asyncio.to_thread(
                agent.call, "POST", "/v1/jobs", {"kind": "backup", "domain": td.name}
            )
            assert status == 201, job
            assert await asyncio.to_thread(agent.wait_exit, 60) == -signal.SIGKILL, agent.tail()
            during = await asyncio.to_thread(
                _everything_under, open_base / "state", open_base / "repo"
            )
            kinds = {(p.relative_to(open_base).parts[:2], k) for p, k in during.items()}
            assert (("state", "scratch"), "f") in kinds, sorted(during)  # libvirt's scratch
            assert (("state", "run"), "s") in kinds, sorted(during)  # QEMU's NBD export
            assert any(p.suffix == ".qcow2" for p in during if "repo" in p.parts), sorted(during)
            await asyncio.to_thread(_assert_nobody_is_refused, during, canary)
            await asyncio.to_thread(_assert_made_root_only, during, cfg)

            # Then a backup that succeeds (through the CLI: no token configured) and a
            # restore through the API: the repository's images and manifests, the restore.
            await asyncio.to_thread(agent.start)
            done = await asyncio.to_thread(agent_cli, agent.config, "backup", td.name, "--wait")
            assert done.returncode == 0, done.stderr + agent.tail()
            status, backups = await asyncio.to_thread(
                agent.call, "GET", f"/v1/domains/{td.name}/backups"
            )
            [backup] = backups["backups"]
            request = {"kind": "restore", "domain": td.name, "backup": backup["id"]}
            status, job = await asyncio.to_thread(
                agent.call,
                "POST",
                "/v1/jobs",
                {**request, "disk": "vda", "to": "vda.raw", "format": "raw"},
            )
            assert status == 201, job
            ended = await asyncio.to_thread(agent.wait_job, job["id"], {"succeeded", "failed"})
            assert ended["state"] == "succeeded", ended
            restored = cfg.restore_path / "vda.raw"
            assert await asyncio.to_thread(restored.read_bytes) == guest.snapshot()["vda"]
            assert stat.S_IMODE(restored.stat().st_mode) == 0o600
            after = await asyncio.to_thread(
                _everything_under, open_base / "state", open_base / "repo"
            )
            assert any(p.name == "manifest.json" for p in after), sorted(after)
            assert restored in after
            await asyncio.to_thread(_assert_nobody_is_refused, after, canary)
            await asyncio.to_thread(_assert_made_root_only, after, cfg)
        finally:
            await asyncio.to_thread(agent.stop)


def _assert_nobody_is_refused(paths: Mapping[Path, str], canary: Path) -> None:
    seen = _as_nobody({canary: "f", **paths})
    assert seen.pop(str(canary)) == "ok", "nobody cannot read even the canary: the check is void"
    read = {path: result for path, result in seen.items() if result != "EACCES"}
    assert not read, f"nobody got these (not EACCES): {read}"


# QEMU's NBD export of a backup (made by QEMU, not the agent): <backup id>.sock
_QEMU_EXPORT = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}\.sock")


def _assert_made_root_only(paths: Mapping[Path, str], cfg: AgentConfig) -> None:
    """What the agent (and the qemu-img and qemu-nbd it runs) made has no permission for
    group or others (umask 077). libvirt's scratch files and QEMU's export socket are
    libvirt's doing: kept from others by the directories they are in (checked above)."""
    theirs = {p for p in paths if p.parent == cfg.scratch_path or _QEMU_EXPORT.fullmatch(p.name)}
    open_to_others = {
        str(path): f"{stat.S_IMODE(path.lstat().st_mode):04o}"
        for path in paths
        if path.lstat().st_mode & 0o077 and path not in theirs
    }
    assert not open_to_others, open_to_others


async def test_the_unix_socket_is_root_only_and_needs_no_token(
    libvirtd: None, tmp_path: Path, open_base: Path
) -> None:
    path = open_base / "api.sock"
    settings = _settings(open_base, http={"socket": str(path)})
    with agent_process(tmp_path, settings) as agent:
        await asyncio.to_thread(agent.start)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        connector = aiohttp.UnixConnector(path=str(path))
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get("http://localhost/v1/jobs") as response:
                assert response.status == 200, await response.text()  # no token needed
            async with session.post(
                "http://localhost/v1/jobs",
                data=json.dumps(VALID_JOB),
                headers={"Content-Type": "text/plain"},
            ) as response:
                assert response.status == 415
        listed = await asyncio.to_thread(agent_cli, agent.config, "jobs", "--json")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == []
        # Killed -9, the agent leaves its socket file: the next start replaces it.
        await asyncio.to_thread(agent.kill9)
        assert stat.S_ISSOCK(path.lstat().st_mode)
        await asyncio.to_thread(agent.start)
        again = await asyncio.to_thread(agent_cli, agent.config, "jobs", "--json")
        assert again.returncode == 0, again.stderr + agent.tail()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        probe = socket.socket(socket.AF_UNIX)
        with contextlib.closing(probe):
            probe.bind(str(open_base / "canary.sock"))
            probe.listen(1)
            (open_base / "canary.sock").chmod(0o777)
            seen = await asyncio.to_thread(_as_nobody, {open_base / "canary.sock": "s", path: "s"})
        assert seen == {str(open_base / "canary.sock"): "ok", str(path): "EACCES"}, seen


async def test_a_missing_setpriv_stops_the_agent_at_start(
    libvirtd: None, tmp_path: Path, open_base: Path
) -> None:
    missing = str(open_base / "no-setpriv")
    with agent_process(
        tmp_path,
        _settings(open_base, agent={"state_dir": str(open_base / "state"), "setpriv": missing}),
    ) as agent:
        await asyncio.to_thread(functools.partial(agent.start, ready=False))
        status = await asyncio.to_thread(agent.wait_exit, 60)
        assert status != 0
        assert f"[agent] setpriv {missing} is not an executable" in agent.tail()
    # An empty one is the operator's explicit choice: the agent starts, and says so.
    with agent_process(
        tmp_path, _settings(open_base, agent={"state_dir": str(open_base / "state"), "setpriv": ""})
    ) as agent:
        await asyncio.to_thread(agent.start)
        deadline = time.monotonic() + 10
        while "qemu-nbd runs without setpriv" not in agent.tail(200):
            assert time.monotonic() < deadline, agent.tail()
            await asyncio.sleep(0.1)
