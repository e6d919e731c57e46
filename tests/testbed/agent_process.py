"""The agent as a real process (``python -m agent run``), for kill -9, SIGTERM and
restart tests, with a small synchronous client for its API.

:func:`agent_process` writes a configuration file, starts the agent with its own log
file, waits until ``/readyz`` answers 200 and stops the process by its own pid at the
end, even when the test fails (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import tomli_w

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http(
    method: str,
    url: str,
    body: object | None = None,
    *,
    token: str | None = None,
    raw: bytes | None = None,
    timeout: float = 10,
) -> tuple[int, Any]:
    """One request; ``(status, decoded JSON or text)``. Never raises for 4xx/5xx."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")


class AgentProcess:
    def __init__(self, config: Path, log: Path, url: str, env: Mapping[str, str]) -> None:
        self.config = config
        self.log = log
        self.url = url
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, extra_env: Mapping[str, str] | None = None, ready: bool = True) -> None:
        env = {**os.environ, **self._env, **(extra_env or {})}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(OSError):
                status, _ = http("GET", self.url + "/readyz", timeout=2)
                if status == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"the agent was not ready within {timeout} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 120) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    @property
    def token(self) -> str:
        """The API token: ``[http] token_file``, else the one the agent made on its first
        start in ``<state_dir>/api-token``."""
        data = tomllib.loads(self.config.read_text(encoding="utf-8"))
        path = data.get("http", {}).get("token_file") or str(
            Path(data["agent"]["state_dir"]) / "api-token"
        )
        return Path(path).read_text(encoding="utf-8").strip()

    def call(
        self, method: str, path: str, body: object | None = None, *, token: bool = True
    ) -> tuple[int, Any]:
        """One request to the API, with the token (unless ``token`` is False)."""
        return http(method, self.url + path, body, token=self.token if token else None)

    def wait_job(self, job_id: str, states: set[str], timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: Any = None
        while time.monotonic() < deadline:
            status, job = self.call("GET", f"/v1/jobs/{job_id}")
            if status == 200 and job["state"] in states:
                return dict(job)
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not in {states} within {timeout} s: {job}")


@contextlib.contextmanager
def agent_process(
    tmp_path: Path, settings: Mapping[str, Any], *, env: Mapping[str, str] | None = None
) -> Iterator[AgentProcess]:
    """An agent process (not started yet) with ``settings`` merged into a test
    configuration: state under ``tmp_path/state``, a free loopback port."""
    port = free_port()
    data: dict[str, Any] = {
        "agent": {"state_dir": str(tmp_path / "state"), "host_id": "test-host"},
        "libvirt": {"reconnect_initial_delay": 0.2, "reconnect_max_delay": 2.0},
        "repository": {"path": str(tmp_path / "repo")},
        "logging": {"format": "json"},
        "http": {"listen": "127.0.0.1", "port": port},
    }
    for section, values in settings.items():
        if isinstance(values, dict):
            data[section] = {**data.get(section, {}), **values}
        else:
            data[section] = values
    config = tmp_path / "agent.toml"
    config.write_text(tomli_w.dumps(data))
    port = data["http"]["port"]
    process = AgentProcess(config, tmp_path / "agent.log", f"http://127.0.0.1:{port}", env or {})
    try:
        yield process
    finally:
        process.stop()
