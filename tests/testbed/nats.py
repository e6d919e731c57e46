"""A real ``nats-server -js`` for the scheduler-message tests.

:class:`NatsServer` runs the host's ``nats-server`` (Debian package, installed by
``scripts/host-setup.sh``) listening on 127.0.0.1 only, on a free port, with its JetStream
store in a directory the test owns. ``start`` returns once the server answers a client
with its ``INFO`` line and fails loudly, with the server's own output, when it does not;
nothing here skips. ``stop`` ends the process by its own pid (SIGTERM, then SIGKILL) and
reaps it. The port and the store survive ``stop``, so a test can take the server away and
bring the same one (same stream, same consumers) back.

Everything here is synchronous; async tests call ``start``/``stop`` through
``asyncio.to_thread`` when something on the loop must keep running meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

NATS_SERVER = "/usr/sbin/nats-server"
_POLL = 0.05


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _server_info(port: int, timeout: float) -> dict[str, object] | None:
    """The server's INFO (a dict) if it accepts a connection on ``port``, else None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            line = sock.makefile("rb").readline(64 * 1024)
    except OSError:
        return None
    if not line.startswith(b"INFO "):
        return None
    try:
        info = json.loads(line[5:])
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


class NatsServer:
    """One ``nats-server -js`` process on ``127.0.0.1:<port>`` with its store under ``workdir``.

    Use it as a context manager (started on entry, stopped on exit, even when the body
    fails) or call :meth:`start`/:meth:`stop` yourself, e.g. to start it late. With
    ``token`` set, clients must authenticate with it.
    """

    def __init__(self, workdir: Path, *, port: int | None = None, token: str | None = None) -> None:
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.token = token  # clients must present it (--auth) when set
        self.store_dir = workdir / "jetstream"
        self.log_path = workdir / "nats-server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs (as started by this object), else None."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it answers; RuntimeError (with its log) if not."""
        if self._proc is not None:
            raise RuntimeError(f"nats-server on port {self.port} was already started")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            NATS_SERVER,
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-sd",
            str(self.store_dir),
        ]
        if self.token is not None:
            argv += ["--auth", self.token]
        # Output goes to a file, not a pipe nobody reads: a chatty server must not block.
        self._log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
            )
        except FileNotFoundError as exc:
            self._close_log()
            raise RuntimeError(
                f"{NATS_SERVER} is not installed (run scripts/host-setup.sh): {exc}"
            ) from exc
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._reap()
                raise RuntimeError(
                    f"{' '.join(argv)} exited {code} before accepting connections; "
                    f"its output:\n{self.log_tail()}"
                )
            info = _server_info(self.port, timeout=1.0)
            if info is not None and info.get("jetstream") is True:
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(
                    f"nats-server did not accept connections with JetStream on port "
                    f"{self.port} within {timeout:g}s; its output:\n{self.log_tail()}"
                )
            time.sleep(_POLL)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM the server (SIGKILL after ``timeout``) and reap it; no-op if not started."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        self._reap()

    def kill(self, timeout: float = 15) -> None:
        """SIGKILL the server (no shutdown at all) and reap it; no-op if not started."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=timeout)
        self._reap()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"<cannot read {self.log_path}: {exc}>"
        return "\n".join(text.splitlines()[-lines:])

    def _reap(self) -> None:
        self._proc = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
