"""A small text progress bar (count, percent, rate, ETA) on stderr; no dependencies."""
from __future__ import annotations

import sys
import time


def format_seconds(s: float) -> str:
    if s != s or s == float("inf"):
        return "--:--"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """``with Progress(total, "prepare") as bar: bar.update(k)``.

    Redraws at most every ``interval`` seconds (and at the end) with carriage returns on
    a terminal, or one line per redraw otherwise. ``message(text)`` prints a line above
    the bar without garbling it. ``enabled=False`` makes every call a no-op."""

    def __init__(self, total: int, desc: str = "", unit: str = "img", stream=None,
                 interval: float = 0.25, enabled: bool = True):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval, self.enabled = interval, enabled
        self.n = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if not self._tty:
            self.interval = max(self.interval, 5.0)

    def line(self) -> str:
        el = time.monotonic() - self.start
        rate = self.n / el if el > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        width = 24
        fill = int(width * self.n / self.total) if self.total else width
        bar = "#" * fill + "." * (width - fill)
        return (f"{self.desc} [{bar}] {self.n}/{self.total} {pct:5.1f}% "
                f"{rate:.1f} {self.unit}/s ETA {format_seconds(left)} "
                f"elapsed {format_seconds(el)}")

    def _draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        end = "\n" if (final or not self._tty) else ""
        prefix = "\r" if self._tty else ""
        self.stream.write(prefix + self.line() + end)
        self.stream.flush()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._draw()

    def message(self, text: str) -> None:
        """Print a line (always, even when the bar is disabled) above the bar."""
        if self.enabled and self._tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
        if self.enabled and self._tty:
            self._draw()

    def close(self) -> None:
        self._draw(final=True)
        self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
