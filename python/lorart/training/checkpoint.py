"""Training checkpoints: trainable weights, optimizer, scheduler, step, data position, RNG states, history.

Each checkpoint is a folder `checkpoints/step-NNNNNNN/state.pt` written into a temporary folder beside it,
fsynced, then renamed into place; `checkpoints/latest` (a one-line file naming the folder) is replaced
atomically afterwards. A crash at any moment leaves either the previous or the new checkpoint, never a
partial one. Loaded with `torch.load(weights_only=True)` (no pickled code runs).
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from typing import Optional

import torch

from ..errors import write_error

STATE_NAME = "state.pt"
LATEST = "latest"
FORMAT_VERSION = 1


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def rng_state(device: torch.device) -> dict:
    st = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    ver, _, gauss = random.getstate()
    random.setstate((ver, tuple(int(x) for x in st["python"]), gauss))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_atomic_text(path: str, text: str) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(output_dir: str, step: int, state: dict, keep: int = 2) -> str:
    """Write `state` as checkpoint `step` atomically; keep the newest `keep` checkpoints."""
    root = checkpoint_root(output_dir)
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:07d}"
    final = os.path.join(root, name)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + name + "-", dir=root)
    try:
        path = os.path.join(tmp, STATE_NAME)
        torch.save({"format_version": FORMAT_VERSION, **state}, path)
        _fsync_file(path)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException as e:
        named = write_error(final, e) if isinstance(e, Exception) else None   # before the space comes back
        shutil.rmtree(tmp, ignore_errors=True)
        if named is not None and named is not e:
            raise named from None
        raise
    _write_atomic_text(os.path.join(root, LATEST), name + "\n")
    done = sorted(d for d in os.listdir(root) if d.startswith("step-") and os.path.isdir(os.path.join(root, d)))
    for old in done[:-keep] if keep > 0 else []:
        if old != name:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The folder named by `checkpoints/latest` (else the highest complete step folder), or None."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return None
    p = os.path.join(root, LATEST)
    if os.path.isfile(p):
        with open(p) as f:
            name = f.read().strip()
        if name and os.path.isfile(os.path.join(root, name, STATE_NAME)):
            return os.path.join(root, name)
    done = sorted(d for d in os.listdir(root)
                  if d.startswith("step-") and os.path.isfile(os.path.join(root, d, STATE_NAME)))
    return os.path.join(root, done[-1]) if done else None


def load_checkpoint(folder: str) -> dict:
    path = os.path.join(folder, STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lorart.train: argument `resume`: {folder} holds no {STATE_NAME}")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise ValueError(f"lorart.train: argument `resume`: {path} is not a readable lorart checkpoint "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(st, dict) or st.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"lorart.train: argument `resume`: {path} is not a lorart checkpoint of format "
                         f"{FORMAT_VERSION}")
    return st


def check_compatible(saved: dict, current: dict, folder: str) -> None:
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        items = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"lorart.train: argument `resume`: the checkpoint {folder} was written with other "
                         f"training options ({items}); use the same options or a new output_dir")
