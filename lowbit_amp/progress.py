"""A dependency-free progress bar for the CLI (no tqdm: the package depends on torch and pyyaml only).

On a terminal it redraws one line in place (``\\r``) at most ``refresh_s`` apart. When the stream is not a terminal
(CI logs, pipes, tests) redrawing would spam the log, so it prints a plain line at every quarter instead.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar", "format_duration"]


def format_duration(seconds: float) -> str:
    """``"42s"``, ``"3m05s"`` or ``"1h02m"``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


class ProgressBar:
    """``label [#########.........]  120/300  loss 2.41  38.2 ms/step  ETA 7s``.

    Args:
        total: number of steps.
        label: what is running (e.g. the opt level).
        stream: where to draw (default ``sys.stderr``, so ``--json -`` on stdout stays clean).
        width: bar width in characters.
        interactive: redraw in place; default: whether ``stream`` is a terminal.
        refresh_s: the shortest time between two redraws on a terminal.
        enabled: False draws nothing (``--quiet``).
    """

    def __init__(
        self,
        total: int,
        label: str = "",
        stream: TextIO | None = None,
        width: int = 24,
        interactive: bool | None = None,
        refresh_s: float = 0.1,
        enabled: bool = True,
    ) -> None:
        if total < 1:
            raise ValueError(f"ProgressBar needs total >= 1, got {total}.")
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.refresh_s = refresh_s
        self.enabled = enabled
        self.count = 0
        self._start = time.perf_counter()
        self._last_draw = float("-inf")
        self._next_milestone = 1  # quarters reported so far + 1 (non-interactive mode)

    def render(self, extra: str = "") -> str:
        """The bar's text for the current count (no line ending)."""
        filled = self.width * self.count // self.total
        elapsed = time.perf_counter() - self._start
        eta = elapsed / self.count * (self.total - self.count) if self.count else 0.0
        digits = len(str(self.total))
        text = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{self.count:>{digits}}/{self.total}")
        if extra:
            text += f"  {extra}"
        timing = f"ETA {format_duration(eta)}" if self.count < self.total else f"done in {format_duration(elapsed)}"
        return f"{text}  {timing}"

    def update(self, steps: int = 1, extra: str = "") -> None:
        """Advance by ``steps`` and redraw if due; ``extra`` is shown after the counts (e.g. the loss)."""
        self.count = min(self.total, self.count + steps)
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.interactive:
            if now - self._last_draw >= self.refresh_s or self.count == self.total:
                self.stream.write("\r" + self.render(extra) + "\x1b[K")
                self.stream.flush()
                self._last_draw = now
            return
        quarter = self.count * 4 // self.total
        if quarter >= self._next_milestone:  # one line per quarter crossed, however many steps jumped
            self._next_milestone = quarter + 1
            self.stream.write(self.render(extra) + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the line on a terminal."""
        if self.enabled and self.interactive:
            self.stream.write("\n")
            self.stream.flush()
