"""Progress bars for long work (prepare, pretrain, evaluate), drawn by tqdm.

Where the bar goes decides how it is drawn:

- a terminal: redrawn in place (at most every 0.25 s);
- a Jupyter kernel's stderr: a widget when ipywidgets is installed (the ``notebook``
  extra), else the text bar redrawn in place, which notebooks render as one line;
- anything else (a CI log, redirected stderr, a ``stream=`` buffer): one line per redraw,
  at most every 5 s, and a last line at the end, so that logs stay readable.

``enabled=False`` (``--quiet``) draws nothing; ``message`` still prints its line.
"""
from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm as _tqdm

TTY_INTERVAL = 0.25   # seconds between redraws in place
LINE_INTERVAL = 5.0   # seconds between lines where redraws cannot overwrite


def format_seconds(s: float) -> str:
    """``MM:SS`` or ``H:MM:SS``; ``--:--`` for NaN or infinity."""
    if s != s or s == float("inf"):
        return "--:--"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def _jupyter_stream(stream: Any) -> bool:
    """Is ``stream`` a Jupyter kernel's output stream (which renders carriage returns)?"""
    return type(stream).__module__.startswith("ipykernel.")


def _widgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def _redraws_in_place(stream: Any) -> bool:
    try:
        return bool(stream.isatty()) or _jupyter_stream(stream)
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class _Lines:
    """A text stream for tqdm where a redraw cannot overwrite the last one: every redraw
    (tqdm starts it with a carriage return) becomes a line of its own; blank ones (tqdm
    clearing its bar) are dropped."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, s: str) -> None:
        for part in s.replace("\r", "\n").split("\n"):
            part = part.rstrip()
            if part:
                self.stream.write(part + "\n")

    def flush(self) -> None:
        getattr(self.stream, "flush", lambda: None)()


class _Bar(_tqdm):
    # no monitor thread: every update looks at the clock itself (miniters=1)
    monitor_interval = 0


class Progress:
    """``with Progress(total, "prepare") as bar: bar.update(k)``.

    Args:
        total: the count at completion; ``initial``: the count already done (a resumed
            run: the rate and ETA are this run's).
        desc: the bar's label; ``unit``: what is counted ("img", "step", ...).
        stream: where it goes (default ``sys.stderr``; in Jupyter a widget draws the bars
            of ``sys.stderr``).
        interval: seconds between redraws (default 0.25 in place, 5 one line each).
        enabled: False draws nothing (``message`` still prints).

    ``fields(text)`` shows extra text after the counts (losses, images/s);
    ``message(text)`` prints a line above the bar without garbling it.
    """

    def __init__(self, total: int, desc: str = "", unit: str = "img", stream: Any = None,
                 interval: float | None = None, enabled: bool = True, initial: int = 0):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(enabled)
        self.in_place = _redraws_in_place(self.stream)
        self._bar: _tqdm | None = None
        if not self.enabled:
            return
        if interval is None:
            interval = TTY_INTERVAL if self.in_place else LINE_INTERVAL
        kw = dict(total=self.total, initial=int(initial), desc=desc, unit=unit,
                  mininterval=interval, miniters=1, leave=True, dynamic_ncols=True)
        if self.stream is sys.stderr and _jupyter_stream(self.stream) and _widgets():
            from tqdm.notebook import tqdm as notebook_bar

            self._bar = notebook_bar(**kw)
        else:
            self._fp = self.stream if self.in_place else _Lines(self.stream)
            # in logs: whole "#" blocks only (tqdm's ASCII bar draws fractions as digits)
            self._bar = _Bar(file=self._fp, ascii=None if self.in_place else " #", **kw)

    @property
    def n(self) -> int:
        """The count so far."""
        return self._bar.n if self._bar is not None else 0

    def line(self) -> str:
        """The bar as one line of text ("" when disabled)."""
        return str(self._bar) if self._bar is not None else ""

    def fields(self, text: str) -> None:
        """Text shown after the counts from the next redraw on."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def update(self, k: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(k)

    def message(self, text: str) -> None:
        """Print a line (always, even when the bar is disabled) above the bar."""
        if self._bar is not None and self.in_place:
            self._bar.write(text, file=self._bar.fp)
            return
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state (a last line) and stop; later calls draw nothing."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
