"""The errors lorart raises for bad input, as opposed to its own bugs.

- `InputError` (a `ValueError`): a bad argument, file or environment. Its message names the argument or the file
  (and key) and what was expected. The CLI prints it as one line `lorart: error: ...` and exits with code 2.
- `FileFormatError`: a file that breaks the rules of its format (lorart's strict loaders raise it).
- `MissingExtraError`: an optional package (an extra of pyproject.toml) is needed but not installed.
- `OutputError`: a file or folder lorart could not write (disk full, read-only, permission): nothing partial is
  left behind.

Anything else that escapes is a bug in lorart: the CLI says so (exit code 1), and `LORART_DEBUG=1` shows the
traceback.
"""
from __future__ import annotations

import errno
import os


class InputError(ValueError):
    """A mistake in the arguments or the input files; the message says which and what was expected."""


class FileFormatError(InputError):
    """A file that breaks its format's rules; the message names the file and the key."""


class MissingExtraError(InputError):
    """An optional package is not installed; the message names the `pip install "lorart[extra]"` to run."""


class OutputError(InputError, OSError):
    """An output could not be written (no space left, read-only file system, permission denied)."""


_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for the file system or the process limit",
}
LOW_SPACE_BYTES = 1 << 20   # a write that fails with less free space than this failed because the disk is full


def free_bytes(path: str) -> int | None:
    """Bytes available to this user on the file system holding `path` (or its nearest existing parent)."""
    p = os.path.abspath(path)
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        st = os.statvfs(p or "/")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def write_error(path: str, exc: BaseException) -> OutputError | None:
    """The `OutputError` that explains why writing `path` failed with `exc`, or None when `exc` is not a write
    failure lorart can name. Call it before cleaning up (a full disk gets its space back when the partial file
    is removed). Libraries that report a failed write without an errno (torch.save says 'unexpected pos ...')
    are recognised by the free space left."""
    if isinstance(exc, OutputError):
        return exc
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and code in _WRITE_ERRNOS:
        target = path or getattr(exc, "filename", None)
        where = f"cannot write {target}" if target else "a write failed"
        extra = f" ({exc.filename})" if exc.filename and exc.filename != target else ""
        return OutputError(f"lorart: {where}: {_WRITE_ERRNOS[code]}{extra}")
    if not path:
        return None
    free = free_bytes(path)
    if free is not None and free < LOW_SPACE_BYTES and isinstance(exc, Exception):
        return OutputError(f"lorart: cannot write {path}: no space left on the device ({free} bytes free; "
                           f"the writer said: {' '.join(str(exc).split())[:200]})")
    return None


__all__ = ["InputError", "FileFormatError", "MissingExtraError", "OutputError", "write_error", "free_bytes"]
