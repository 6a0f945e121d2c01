"""Training progress: a tqdm.auto bar in terminals and notebooks (a widget in Jupyter when ipywidgets is installed,
else a bar redrawn in place), one plain line per log interval when the output is a file or a pipe.

Both show the same thing: step / total, loss, learning rate, tokens per second, elapsed time and ETA."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def fmt_time(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def in_notebook() -> bool:
    """True inside a Jupyter / IPython kernel (where stderr is not a TTY but renders a redrawn bar)."""
    ip = sys.modules.get("IPython")
    if ip is None:
        return False
    try:
        shell = ip.get_ipython()
    except Exception:  # noqa: BLE001 - any failure means "not a notebook"
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class Progress:
    def __init__(self, total: int, start_step: int = 0, stream: Optional[TextIO] = None, log_every: int = 1,
                 enabled: bool = True, width: int = 24):
        self.total, self.start_step = total, start_step
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every, self.enabled, self.width = log_every, enabled, width
        self.t0 = time.perf_counter()
        self.bar = None  # the tqdm bar, made at the first update (total and start_step are known by then)
        self.live = self.tty or (self.stream in (sys.stderr, sys.stdout) and in_notebook())

    def line(self, step: int, loss: float, lr: float, tok_s: float) -> str:
        done = step - self.start_step
        el = time.perf_counter() - self.t0
        eta = el / done * (self.total - step) if done > 0 else 0.0
        frac = step / self.total if self.total else 1.0
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        return (f"[{bar}] {step}/{self.total} loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s "
                f"{fmt_time(el)} elapsed, ETA {fmt_time(eta)}")

    def _make_bar(self):
        from tqdm.auto import tqdm
        bar = tqdm(total=self.total, initial=self.start_step, file=self.stream, unit="step", dynamic_ncols=True,
                   leave=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
        bar.start_t = time.time() - (time.perf_counter() - self.t0)  # tqdm clocks time.time(); from the start
        return bar

    def update(self, step: int, loss: float, lr: float, tok_s: float) -> None:
        if not self.enabled:
            return
        if self.live:
            if self.bar is None:
                self.bar = self._make_bar()
            self.bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        if step % self.log_every == 0 or step == self.total:
            self.stream.write(self.line(step, loss, lr, tok_s) + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (evaluations, notes), printed above the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
            return
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
