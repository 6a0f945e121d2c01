"""Atomic folder writes: build the whole folder beside the target, then one rename.

A crash never leaves a half-written adapter, method artifact or model folder: either the old folder or
the new one is there.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(directory: str) -> Iterator[str]:
    """Yield a temporary folder beside `directory`; on success it replaces `directory` in one rename."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".lorart-tmp-", dir=parent)
    try:
        yield tmp
        for f in os.listdir(tmp):
            with open(os.path.join(tmp, f), "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if os.path.exists(directory):
            old = tempfile.mkdtemp(prefix=".lorart-old-", dir=parent)
            os.rmdir(old)
            os.rename(directory, old)
        os.rename(tmp, directory)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
