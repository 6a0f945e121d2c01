"""How lorart writes files: atomically, with the permissions the umask gives, and JSON strictly.

- `atomic_dir(folder)`: the whole folder is built beside the target, then one rename; `atomic_file(path)`: the
  same for one file. A crash leaves either the old or the new one, never half of one. A failed write (disk full,
  read-only folder, permission) raises `lorart.errors.OutputError` naming the target, and the temporary folder
  or file is removed.
- Temporary files and folders (`.tmp-*`, `.lorart-tmp-*`, `.lorart-old-*`) are created 0600/0700 by
  `tempfile`; what is renamed into place gets 0666/0777 minus the umask, as `open()`/`mkdir` would give.
- `strict_json(obj)`: JSON that every parser accepts: never a bare NaN/Infinity (they become null).
- `save_torch(obj, path)`: torch.save whose failed write raises its OSError (torch says "unexpected pos").
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import shutil
import tempfile
from typing import Iterator, Optional

import torch

from .errors import write_error

TMP_PREFIXES = (".tmp-", ".lorart-tmp-", ".lorart-old-")


def umask() -> int:
    """The process umask (read from /proc where it can be, which leaves it untouched for other threads; else
    set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def set_default_mode(path: str) -> None:
    """Give a file 0666 (a folder 0777) minus the umask: what open()/mkdir would have created."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask())


def _fix_modes(root: str, is_dir: bool) -> None:
    set_default_mode(root)
    if is_dir:
        for parent, dirs, files in os.walk(root):
            for n in dirs + files:
                set_default_mode(os.path.join(parent, n))


def _fsync_tree(root: str) -> None:
    for parent, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(parent, f), "rb") as fh:
                os.fsync(fh.fileno())


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mkdir_parent(target: str) -> str:
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise (write_error(target, e) or e) from None
    return parent


@contextlib.contextmanager
def atomic_dir(directory: str) -> Iterator[str]:
    """Yield a temporary folder beside `directory`; on success it replaces `directory` in one rename."""
    directory = os.path.abspath(directory)
    parent = _mkdir_parent(directory)
    try:
        tmp = tempfile.mkdtemp(prefix=".lorart-tmp-", dir=parent)
    except OSError as e:
        raise (write_error(directory, e) or e) from None
    try:
        yield tmp
        _fix_modes(tmp, True)
        _fsync_tree(tmp)
        old = None
        if os.path.exists(directory):
            old = tempfile.mkdtemp(prefix=".lorart-old-", dir=parent)
            os.rmdir(old)
            os.rename(directory, old)
        os.rename(tmp, directory)
        fsync_dir(parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        named = write_error(directory, e) if isinstance(e, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if named is not None and named is not e:
            raise named from None
        raise


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary file path beside `path`; on success it replaces `path` in one rename."""
    path = os.path.abspath(path)
    parent = _mkdir_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".lorart-tmp-", dir=parent)
        os.close(fd)
    except OSError as e:
        raise (write_error(path, e) or e) from None
    try:
        yield tmp
        _fix_modes(tmp, False)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        named = write_error(path, e) if isinstance(e, Exception) else None
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if named is not None and named is not e:
            raise named from None
        raise


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def strict_json(obj, **kw) -> str:
    """json.dumps with every non-finite float written as null (strict JSON: no bare NaN / Infinity)."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, **kw)


def write_json_atomic(path: str, obj, lines: bool = False) -> None:
    """`obj` as strict JSON (indented), or `lines=True`: one strict JSON record per line (JSONL)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        if lines:
            for rec in obj:
                f.write(strict_json(rec) + "\n")
        else:
            f.write(strict_json(obj, indent=2) + "\n")


def remove_stale_temps(folder: str) -> list:
    """Delete the temporary files/folders a killed writer left in `folder` (names starting with one of
    TMP_PREFIXES); returns their names."""
    gone = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return gone
    for n in names:
        if n.startswith(TMP_PREFIXES):
            p = os.path.join(folder, n)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(p)
            gone.append(n)
    return gone


class _Sink(io.RawIOBase):
    """A file torch.save writes through, keeping the OSError (ENOSPC, EIO, ...) that torch turns into a
    RuntimeError ("unexpected pos ...")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise


def save_torch(obj, path: str) -> None:
    """torch.save to `path` (fsynced); a failed write raises its OSError (errno ENOSPC for a full disk)."""
    with open(path, "wb", buffering=0) as f:
        sink = _Sink(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise
        os.fsync(f.fileno())


def os_error_of(exc: BaseException) -> Optional[OSError]:
    """The OSError behind `exc`: itself, or one a library reported as text ("... (os error 28)", safetensors)."""
    if isinstance(exc, OSError):
        return exc
    m = re.search(r"os error (\d+)", str(exc))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    return None


def describe_os_error(e: OSError) -> str:
    """strerror, naming a full disk and a read-only file system as such."""
    what = e.strerror or str(e)
    if e.errno == errno.ENOSPC or e.errno == getattr(errno, "EDQUOT", -1):
        what += " (disk full)"
    elif e.errno == errno.EROFS and "read-only" not in what.lower():
        what += " (read-only file system)"
    return what
