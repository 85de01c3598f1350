"""A one-line progress display for terminals (silent when stderr is not a TTY)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressLine:
    """Rewrites one line of ``stream`` in place; prints nothing unless it is a terminal.

    ``force=True`` prints even to a pipe (one line per update), for logs.
    """

    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None,
                 force: bool = False) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = force or bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, done: int, detail: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        if self.total:
            width = 24
            filled = int(width * min(done, self.total) / self.total)
            bar = "#" * filled + "-" * (width - filled)
            text = f"{self.label} [{bar}] {done}/{self.total} {elapsed:6.1f}s {detail}"
        else:
            text = f"{self.label} {done} {elapsed:6.1f}s {detail}"
        if self._tty:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()
