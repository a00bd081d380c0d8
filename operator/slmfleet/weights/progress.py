"""A byte counter that redraws one status line on stderr, and only when stderr is a terminal."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

REDRAW_SECONDS = 0.25


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def human_rate(n_bytes: float, seconds: float) -> str:
    return f"{human_bytes(n_bytes / seconds if seconds > 0 else 0.0)}/s"


class Progress:
    """Thread-safe; `add` is cheap (a lock and an addition), the line is redrawn at most 4 times a second."""

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.label, self.total = label, total
        self.done = 0
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._drawn = 0.0
        self._width = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            if not self.enabled:
                return
            now = time.monotonic()
            if now - self._drawn >= REDRAW_SECONDS:
                self._drawn = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        line = (f"{self.label}: {human_bytes(self.done)} of {human_bytes(self.total)}{pct}, "
                f"{human_rate(self.done, now - self._start)}")
        pad = " " * max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write(f"\r{line}{pad}")
        self.stream.flush()

    def close(self) -> None:
        """Clear the status line, so the next log line starts on a clean row."""
        with self._lock:
            if self.enabled and self._width:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()
                self._width = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
