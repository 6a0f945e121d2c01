"""The training progress display: a tqdm bar in terminals and notebooks, plain lines in files and pipes."""
import io
import re
import sys

from lorart.training import progress as progress_mod
from lorart.training.progress import Progress


class _TTY(io.StringIO):
    def isatty(self):
        return True


def _run(pg, steps=5):
    pg.total = steps
    pg.message("before training: loss 2.0")
    for s in range(1, steps + 1):
        pg.update(s, 1.0 / s, 1e-3 * s, 1234.0)
        if s == 3:
            pg.message("eval: loss 0.5")
    pg.close()
    pg.message("after training")


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    _run(Progress(0, stream=out, log_every=2))
    lines = out.getvalue().splitlines()
    assert lines[0] == "before training: loss 2.0" and lines[-1] == "after training"
    steps = [ln for ln in lines if ln.startswith("[")]
    assert [re.search(r"\] (\d+)/5", ln).group(1) for ln in steps] == ["2", "4", "5"]  # every log_every, and the end
    assert "loss 0.2000 lr 5.00e-03 1,234 tok/s" in steps[-1] and "elapsed, ETA" in steps[-1]
    assert "\r" not in out.getvalue()


def test_tqdm_bar_in_a_terminal_with_the_same_information():
    out = _TTY()
    pg = Progress(0, stream=out, log_every=2)
    _run(pg)
    text = out.getvalue()
    assert "\r" in text  # redrawn in place
    assert "5/5" in text and "loss 0.2000, lr 5.00e-03, 1,234 tok/s" in text and "<00:00" in text  # elapsed<ETA
    for msg in ("before training: loss 2.0\n", "eval: loss 0.5\n", "after training\n"):
        assert msg in text  # messages on lines of their own, not overwritten by the bar
    assert pg.bar is None


def test_resumed_run_starts_the_bar_at_its_step():
    out = _TTY()
    pg = Progress(10, start_step=6, stream=out)
    pg.update(7, 0.5, 1e-3, 10.0)
    assert pg.bar.n == 7 and pg.bar.total == 10
    pg.close()


def test_notebook_gets_a_live_bar(monkeypatch, capsys):
    monkeypatch.setattr(progress_mod, "in_notebook", lambda: True)
    pg = Progress(0, stream=sys.stderr)
    assert pg.live
    _run(pg, 3)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss 0.3333" in err and err.count("before training") == 1


def test_disabled_prints_nothing():
    out = _TTY()
    _run(Progress(0, stream=out, enabled=False))
    assert out.getvalue() == ""
    assert not progress_mod.in_notebook()
