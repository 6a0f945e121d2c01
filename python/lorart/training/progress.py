"""A plain-text progress bar: redrawn in place on a TTY, one line per log interval otherwise."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def fmt_time(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    def __init__(self, total: int, start_step: int = 0, stream: Optional[TextIO] = None, log_every: int = 1,
                 enabled: bool = True, width: int = 24):
        self.total, self.start_step = total, start_step
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every, self.enabled, self.width = log_every, enabled, width
        self.t0 = time.perf_counter()
        self._open = False

    def line(self, step: int, loss: float, lr: float, tok_s: float) -> str:
        done = step - self.start_step
        el = time.perf_counter() - self.t0
        eta = el / done * (self.total - step) if done > 0 else 0.0
        frac = step / self.total if self.total else 1.0
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        return (f"[{bar}] {step}/{self.total} loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s "
                f"{fmt_time(el)} elapsed, ETA {fmt_time(eta)}")

    def update(self, step: int, loss: float, lr: float, tok_s: float) -> None:
        if not self.enabled:
            return
        text = self.line(step, loss, lr, tok_s)
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self._open = True
        elif step % self.log_every == 0 or step == self.total:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (evaluations, notes), not overwritten by the bar."""
        if not self.enabled:
            return
        if self._open:
            self.stream.write("\n")
            self._open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open and self.enabled:
            self.stream.write("\n")
            self.stream.flush()
        self._open = False
