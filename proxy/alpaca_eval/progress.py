"""A one-line text progress bar on stderr: items done, failures, money spent, rate and ETA.

On a terminal the line is redrawn in place (at most `min_interval_s` apart); elsewhere (a log
file, CI) a full line is printed every `log_interval_s` so logs stay readable. The rate and ETA
count only items finished by this process: items resumed from a checkpoint took no time now.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressBar:
    def __init__(self, total: int, *, done: int = 0, cost_usd: float = 0.0, label: str = "alpaca-eval",
                 stream: TextIO | None = None, tty: bool | None = None, width: int = 24,
                 min_interval_s: float = 0.1, log_interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.done = done
        """Items with an answer (resumed ones included)."""
        self.failed = 0
        """Items whose attempt in this run failed."""
        self.cost_usd = cost_usd
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.width = width
        self.min_interval_s = min_interval_s if self.tty else log_interval_s
        self.clock = clock
        self.started = clock()
        self.finished_here = 0
        self._last_draw: float | None = None

    def update(self, *, ok: bool, spent_usd: float | None = None) -> None:
        """One item finished (ok or failed); `spent_usd` is the money spent so far, if known."""
        self.finished_here += 1
        if ok:
            self.done += 1
        else:
            self.failed += 1
        if spent_usd is not None:
            self.cost_usd = spent_usd
        self.draw()

    def eta_s(self) -> float | None:
        left = self.total - self.done - self.failed
        elapsed = self.clock() - self.started
        if left <= 0:
            return 0.0
        if self.finished_here == 0 or elapsed <= 0:
            return None
        return left * elapsed / self.finished_here

    def line(self) -> str:
        frac = 1.0 if self.total == 0 else min(1.0, self.done / self.total)
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = self.clock() - self.started
        rate = self.finished_here / elapsed if elapsed > 0 else 0.0
        return (f"{self.label} [{bar}] {self.done}/{self.total} {frac * 100:3.0f}% | failed {self.failed} | "
                f"${self.cost_usd:.4f} | {rate:.2f} it/s | elapsed {format_duration(elapsed)} | "
                f"ETA {format_duration(self.eta_s())}")

    def draw(self, *, force: bool = False) -> None:
        now = self.clock()
        if not force and self._last_draw is not None and now - self._last_draw < self.min_interval_s:
            return
        self._last_draw = now
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.draw(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
