"""Atomic writes: build the whole folder (or file) beside the target, then one rename.

A crash never leaves a half-written adapter, method artifact, model folder or export: either the old one or
the new one is there. A failed write (disk full, read-only folder, permission) raises `lorart.errors.OutputError`
naming the target, and the temporary folder or file is removed. What is written gets the permissions of the
process umask (as a plain `open` would), not the 0600/0700 of `tempfile`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from .errors import write_error


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fix_modes(root: str, is_dir: bool) -> None:
    mask = _umask()
    if not is_dir:
        os.chmod(root, 0o666 & ~mask)
        return
    os.chmod(root, 0o777 & ~mask)
    for parent, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(parent, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(parent, f), 0o666 & ~mask)


def _fsync_tree(root: str) -> None:
    for parent, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(parent, f), "rb") as fh:
                os.fsync(fh.fileno())


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
