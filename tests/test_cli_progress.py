"""The CLI's one progress bar: silent unless stderr is a terminal, and ends on its own line.

Run in a real pseudo-terminal (``pty``), since the bar asks the terminal itself.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import textwrap

import pytest

from agent.cli.progress import ProgressBar

DRIVE = textwrap.dedent(
    """
    import sys
    from agent.cli.progress import ProgressBar
    with ProgressBar("restore vda", mib=True) as bar:
        for done in range(0, 9):
            bar.update(done << 20, 8 << 20)
    print("after", file=sys.stderr)
    """
)


def test_nothing_is_written_when_stderr_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with ProgressBar("restore vda", mib=True) as bar:
        bar.update(1 << 20, 4 << 20)
        bar.fraction(1.0)
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")


def test_on_a_terminal_the_bar_reaches_the_end_and_ends_its_line() -> None:
    leader, follower = pty.openpty()
    try:
        env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
        process = subprocess.run(
            [sys.executable, "-c", DRIVE],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=follower,
            env=env,
            timeout=30,
            check=True,
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    # Without the terminal's control sequences (colours, cursor shown again ...).
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert process.stdout == b""
    assert "restore vda" in screen and "100.0%" in screen and "8/8 MiB" in screen
    # The bar's last line is finished before anything else is written.
    before, _, _ = screen.partition("after")
    assert before.rstrip(" ").endswith(("\n", "\r\n"))
