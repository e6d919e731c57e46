"""The progress bar of the long verbs: ``restore``, ``backup --local``, ``backup --wait``.

One bar (:mod:`rich.progress`) on stderr, and only when stderr is a terminal: piped or
redirected, the commands print their results and nothing else, so scripts (and the
tests) read what they always read. The bar appears with the first report of a known
total and shows the label, 40 columns of bar and the percentage done; with ``mib``
also the MiB done of the total. It ends on a line of its own when the ``with`` block it
belongs to ends, however the block ends. It never touches stdout.
"""

from __future__ import annotations

import json
import sys
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text


class ProgressBar:
    """``with ProgressBar(label) as bar:``, then :meth:`update` or :meth:`fraction`."""

    def __init__(self, label: str, *, mib: bool = False) -> None:
        self._label = label
        self._mib = mib
        self._enabled = sys.stderr.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()  # the last state drawn, and a new line

    def update(self, done: float, total: float) -> None:
        """``done`` of ``total`` (bytes, or any unit); nothing shows while total is 0."""
        if not self._enabled or not total:
            return
        if self._progress is None or self._task is None:
            self._progress = Progress(
                *self._columns(),
                console=Console(stderr=True),
                redirect_stdout=False,  # results on a piped stdout must stay there
                redirect_stderr=False,
            )
            self._task = self._progress.add_task(self._label, total=total)
            self._progress.start()
        self._progress.update(self._task, completed=min(done, total), total=total)

    def fraction(self, done: float) -> None:
        """The fraction done, from 0 to 1."""
        self.update(done, 1.0)

    def _columns(self) -> list[ProgressColumn]:
        columns: list[ProgressColumn] = [
            TextColumn("{task.description}"),
            BarColumn(bar_width=40),
            TextColumn("{task.percentage:>5.1f}%"),
        ]
        if self._mib:
            columns.append(_MiBColumn())
        return columns


class _MiBColumn(ProgressColumn):
    """``done/total MiB``, whole MiB rounded down."""

    def render(self, task: Task) -> Text:
        return Text(f"{int(task.completed) >> 20}/{int(task.total or 0) >> 20} MiB")


class JsonProgress:
    """ProgressBar's interface for scripts: one JSON line on stderr per whole percent,
    ``{"progress": LABEL, "fraction": 0.42}``, and the last at 1.0."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._shown = -1

    def __enter__(self) -> JsonProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    def update(self, done: float, total: float) -> None:
        if total:
            self.fraction(done / total)

    def fraction(self, done: float) -> None:
        percent = int(min(max(done, 0.0), 1.0) * 100)
        if percent > self._shown:
            self._shown = percent
            line = json.dumps({"progress": self._label, "fraction": round(percent / 100, 2)})
            print(line, file=sys.stderr, flush=True)


def progress_display(label: str, *, as_json: bool = False) -> ProgressBar | JsonProgress:
    """A bar on a terminal, or with ``as_json`` JSON lines for scripts."""
    return JsonProgress(label) if as_json else ProgressBar(label)
