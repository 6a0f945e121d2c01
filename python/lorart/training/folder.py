"""The output folder of a run: who may write into it, what a previous run left there, and how writes fail.

- A folder that holds a previous run (any of RUN_FILES) is refused unless the run resumes it or overwrites it
  (`overwrite=True` removes those files once the new run has loaded its model and data; other files stay).
- One run at a time: an exclusive lock on `.lorart.lock` for the run's lifetime (released by the kernel if the
  process dies).
- Temporary files a killed writer left (`.tmp-*`, `.lorart-tmp-*`, `.lorart-old-*`) are removed at the start.
- Every write goes through `writing(what)`: an OSError (disk full, read-only, permission) becomes one
  TrainingError naming the file, the cause and the newest intact checkpoint.
- metrics.jsonl grows by whole lines only: a failed append is cut back to the last complete record.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, Optional

from .._atomic import (atomic_file, describe_os_error, os_error_of, remove_stale_temps, strict_json,
                       write_json_atomic)
from ..errors import OutputError, write_error
from .checkpoint import checkpoint_root, latest_checkpoint

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

RUN_FILES = ("adapter", "checkpoints", "metrics.jsonl", "summary.json", "samples.md", "loss.png", "config.yaml")
# (the experiment trackers' folders, tensorboard/ wandb/ mlruns/, hold one sub-run per run: never removed)
CONFIG_HEADER = "# lorart train configuration"   # how config.yaml starts when lorart wrote it (config.py)
LOCK = ".lorart.lock"
METRICS = "metrics.jsonl"


class TrainingError(ValueError):
    """A run that cannot go on: a non-finite loss, a failed write, a busy output folder. The message says
    what happened, at which step, and what was kept. (A ValueError, like lorart's other errors about the
    inputs and the environment: the CLI prints it as one line and exits 2.)"""


class RunFolder:
    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        self._lock_fd: Optional[int] = None
        self._metrics_fd: Optional[int] = None

    def join(self, *names) -> str:
        return os.path.join(self.path, *names)

    # -- what is there ----------------------------------------------------------------------------------------
    def previous_run(self) -> list:
        """The RUN_FILES a previous run left here."""
        if not os.path.isdir(self.path):
            return []
        return [f for f in RUN_FILES if os.path.lexists(self.join(f)) and (f != "config.yaml" or self._our_config())]

    def _our_config(self) -> bool:
        try:
            with open(self.join("config.yaml"), "rb") as f:
                return f.read(len(CONFIG_HEADER)) == CONFIG_HEADER.encode()
        except OSError:
            return False

    def check_allowed(self, resume, overwrite: bool) -> None:
        """Refuse a folder holding a previous run unless resuming or overwriting (checked before any loading)."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"lorart.train: argument `output_dir`: {self.path} exists and is not a folder")
        if resume and overwrite:
            raise ValueError("lorart.train: arguments `resume` and `overwrite` exclude each other: resume continues "
                             "the run in output_dir, overwrite replaces it")
        parent = self.path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            st = os.statvfs(parent) if hasattr(os, "statvfs") else None
            why = "read-only file system" if st is not None and st.f_flag & os.ST_RDONLY else "permission denied"
            raise ValueError(f"lorart.train: argument `output_dir`: {self.path} cannot be written ({parent}: {why})")
        if os.path.lexists(self.join("config.yaml")) and not self._our_config():
            raise ValueError(f"lorart.train: argument `output_dir`: {self.join('config.yaml')} was not written by "
                             "lorart, which writes the run's resolved configuration there; move it, or choose "
                             "another output_dir")
        prev = self.previous_run()
        if prev and not resume and not overwrite:
            raise ValueError(f"lorart.train: argument `output_dir`: {self.path} holds a previous run "
                             f"({', '.join(prev)}); pass resume=True (--resume) to continue it, overwrite=True "
                             "(--overwrite) to replace it, or another output_dir")

    # -- the run's hold on the folder -------------------------------------------------------------------------
    def claim(self) -> None:
        """Create the folder, take its lock, check it is writable, remove stale temporary files."""
        with self.writing("the output folder"):
            os.makedirs(self.path, exist_ok=True)
            fd = os.open(self.join(LOCK), os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise TrainingError(f"lorart.train: {self.path} is in use by another lorart run (it holds the lock "
                                    f"{LOCK}); wait for it to finish or use another output_dir") from None
        self._lock_fd = fd
        with self.writing("a test file"):
            tmp_fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.path)
            os.close(tmp_fd)
            os.unlink(tmp)
        for d in (self.path, checkpoint_root(self.path)):
            remove_stale_temps(d)

    def release(self) -> None:
        self.close_metrics()
        if self._lock_fd is not None:
            os.close(self._lock_fd)   # releases the flock
            self._lock_fd = None

    def clear_previous(self) -> list:
        """Remove what a previous run left (RUN_FILES only): renamed aside first, so a crash never leaves half."""
        gone = self.previous_run()
        with self.writing("the previous run's files"):
            for f in gone:
                aside = tempfile.mkdtemp(prefix=".lorart-old-", dir=self.path)
                os.rename(self.join(f), os.path.join(aside, f))
                shutil.rmtree(aside, ignore_errors=True)
        return gone

    # -- writes -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self, what: str, path: Optional[str] = None) -> Iterator[None]:
        """Turn a failed write inside into one TrainingError: what, the file, why, and the checkpoint kept."""
        try:
            yield
        except TrainingError:
            raise
        except Exception as e:
            err = os_error_of(e)
            if err is None:
                raise
            target = err.filename or path or self.path
            named = err if isinstance(err, OutputError) else write_error(target, err)
            why = " ".join(str(named).split()).removeprefix("lorart: ") if named is not None else \
                f"cannot write {target}: {describe_os_error(err)}"
            kept = (latest_checkpoint(self.path) if os.path.isdir(self.path) else None) or "none"
            raise TrainingError(f"lorart.train: {what}: {why}; newest checkpoint kept: {kept}") from e

    def open_metrics(self, history: list) -> None:
        """metrics.jsonl = `history` (a resumed run drops the records past its checkpoint), then appended to."""
        path = self.join(METRICS)
        with self.writing(METRICS, path):
            write_json_atomic(path, history, lines=True)
            self._metrics_fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def append_metrics(self, records: list) -> None:
        if self._metrics_fd is None or not records:
            return
        data = "".join(strict_json(r) + "\n" for r in records).encode("utf-8")
        end = os.lseek(self._metrics_fd, 0, os.SEEK_END)
        with self.writing(METRICS, self.join(METRICS)):
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._metrics_fd, view):]
            except OSError:
                os.ftruncate(self._metrics_fd, end)   # never a half record
                raise

    def close_metrics(self) -> None:
        if self._metrics_fd is not None:
            os.close(self._metrics_fd)
            self._metrics_fd = None

    def write_text(self, name: str, text: str) -> str:
        path = self.join(name)
        with self.writing(name, path):
            with atomic_file(path) as tmp:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)
        return path

    def write_json(self, name: str, obj, lines: bool = False) -> str:
        path = self.join(name)
        with self.writing(name, path):
            write_json_atomic(path, obj, lines=lines)
        return path

