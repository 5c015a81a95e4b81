"""A batch's progress: rows done, errors, rate and ETA; a bar on a terminal, a line every few seconds in a log.

    p = Progress(total=10_000, done=2_000, label="batch b0123")   # 2,000 done by an earlier run
    p.advance(rows=32, errors=1)      # after each committed unit
    p.close()

`Progress.state()` is what `progress.json` holds for pollers (the API's progress route).
The rate counts only this run's rows (a resumed batch's earlier rows took no time here).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class Progress:
    def __init__(self, total: int, done: int = 0, errors: int = 0, *, label: str = "batch", stream: TextIO | None = None,
                 every_s: float = 5.0, bar: bool | None = None, on_state: Callable[[dict], None] | None = None):
        """:param bar: draw a bar (default: when `stream` is a terminal); else a log line every `every_s`
        :param on_state: called with `state()` at most once a second and on close (e.g. to write progress.json)"""
        self.total, self.done, self.errors, self.label = total, done, errors, label
        self.start_done, self.t0 = done, time.monotonic()
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.on_state = on_state
        self._last_line = self._last_state = 0.0
        self._bar = None
        if bar if bar is not None else _isatty(self.stream):
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                            console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task(label, total=total, completed=done, rate="")
            self._bar.start()
        self._emit(force=True)

    @property
    def rate(self) -> float:
        """Rows per second in this run."""
        dt = time.monotonic() - self.t0
        return (self.done - self.start_done) / dt if dt > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        r = self.rate
        return (self.total - self.done) / r if r > 0 else None

    def state(self, status: str = "running") -> dict:
        return {"state": status, "done": self.done, "total": self.total, "errors": self.errors,
                "rate_per_s": round(self.rate, 3), "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
                "elapsed_s": round(time.monotonic() - self.t0, 1), "updated_at": time.time()}

    def advance(self, rows: int, errors: int = 0) -> None:
        self.done += rows
        self.errors += errors
        self._emit()

    def close(self, status: str = "done") -> None:
        self._emit(force=True, status=status)
        if self._bar is not None:
            self._bar.stop()
        elif status == "done":
            self.stream.write(f"{self.label}: {self.done:,}/{self.total:,} rows, {self.errors:,} errors, "
                              f"{self.rate:.2f} rows/s\n")
            self.stream.flush()

    def _emit(self, force: bool = False, status: str = "running") -> None:
        now = time.monotonic()
        if self.on_state is not None and (force or now - self._last_state >= 1.0):
            self._last_state = now
            self.on_state(self.state(status))
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{self.rate:.1f} rows/s")
        elif status == "running" and (force or now - self._last_line >= self.every_s):
            self._last_line = now
            eta = "?" if self.eta_s is None else f"{self.eta_s:.0f} s"
            pct = 100 * self.done / self.total if self.total else 100.0
            self.stream.write(f"{self.label}: {self.done:,}/{self.total:,} rows ({pct:.0f}%), {self.errors:,} errors, "
                              f"{self.rate:.2f} rows/s, ETA {eta}\n")
            self.stream.flush()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
