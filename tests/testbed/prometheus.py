"""A real Prometheus server for the alert test, on loopback.

:func:`prometheus_server` runs the host's ``prometheus`` (Debian package, installed by
``scripts/host-setup.sh``) on 127.0.0.1 and a free port, with its TSDB in a directory the
test owns, scraping the given targets every second as the job ``backup-agent`` and
evaluating the given rule files every second. It returns once ``/-/ready`` answers and
fails loudly, with the server's output, when it does not; nothing here skips. On the
way out the process is stopped by its own pid (SIGTERM, then SIGKILL) and reaped, also
when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.testbed.nats import free_port

PROMETHEUS = "/usr/bin/prometheus"
JOB = "backup-agent"


@dataclass
class Prometheus:
    url: str
    log: Path

    def get(self, path: str) -> Any:
        """GET an API path; its ``data`` (AssertionError unless status is success)."""
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            body = json.loads(response.read())
        assert body.get("status") == "success", body
        return body["data"]

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts the server holds now (pending and firing)."""
        alerts: list[dict[str, Any]] = self.get("/api/v1/alerts")["alerts"]
        return alerts

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def prometheus_server(
    workdir: Path, targets: Sequence[str], rule_files: Sequence[Path], timeout: float = 60
) -> Iterator[Prometheus]:
    """Prometheus scraping ``targets`` (``host:port``) as job ``backup-agent`` every
    second and evaluating ``rule_files`` every second."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": list(targets)}]}],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(json.dumps(config))  # (YAML is a superset of JSON)
    port = free_port()
    log = workdir / "prometheus.log"
    argv = [
        PROMETHEUS,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with log.open("ab") as output:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
        except FileNotFoundError as exc:
            raise RuntimeError(
                f"{PROMETHEUS} is not installed (run scripts/host-setup.sh)"
            ) from exc
    server = Prometheus(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {proc.returncode}:\n{server.tail()}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(server.url + "/-/ready", timeout=2) as response,
            ):
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready within {timeout:g} s:\n{server.tail()}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
