"""Training checkpoints. `checkpoints/step-NNNNNNN/` holds

- `state.pt`: trainable weights, optimizer and scheduler states, RNG states and the run's state (step, data
  position, history, early stopping, ...); read with `torch.load(weights_only=True)` (no pickled code runs);
- `adapter/`: the method's artifact at that step (PEFT format for lora, qlora, prompt, prefix), usable on its own;
- `checkpoint.json`: format version, step, the run's fingerprint (model, data, options) and the size and
  SHA-256 of every file above, checked before a resume.

The folder is built beside its final name, fsynced and renamed (`lorart._atomic.atomic_dir`); `checkpoints/latest`
then names it (replaced atomically). A crash at any moment leaves complete checkpoints only, and a checkpoint
damaged later (truncated, bit flips, deleted files) is detected by its manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from typing import Callable, Optional

import torch

from .._atomic import atomic_dir, atomic_file, save_torch, strict_json

STATE_NAME = "state.pt"
MANIFEST = "checkpoint.json"
ADAPTER = "adapter"
LATEST = "latest"
FORMAT_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, or of another format."""


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def step_of(name: str) -> Optional[int]:
    if not name.startswith("step-"):
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


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


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: str) -> dict:
    out = {}
    for root, _, names in os.walk(folder):
        for n in sorted(names):
            p = os.path.join(root, n)
            rel = os.path.relpath(p, folder).replace(os.sep, "/")
            if rel != MANIFEST:
                out[rel] = {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
    return out


def list_checkpoints(output_dir: str) -> list:
    """Checkpoint folders, newest step first (whatever their state)."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    steps = [(step_of(d), d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))]
    return [os.path.join(root, d) for s, d in sorted((s, d) for s, d in steps if s is not None)[::-1]]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The folder `checkpoints/latest` names if it holds a manifest, else the newest folder that does, or None
    (not verified: see verify_checkpoint)."""
    root = checkpoint_root(output_dir)
    try:
        with open(os.path.join(root, LATEST)) as f:
            name = f.read().strip()
        if step_of(name) is not None and os.path.isfile(os.path.join(root, name, MANIFEST)):
            return os.path.join(root, name)
    except OSError:
        pass
    return next((c for c in list_checkpoints(output_dir) if os.path.isfile(os.path.join(c, MANIFEST))), None)


def save_checkpoint(output_dir: str, step: int, state: dict, *, run: Optional[dict] = None,
                    write_adapter: Optional[Callable[[str], object]] = None, keep: int = 2) -> str:
    """Write checkpoint `step` atomically (state.pt, `write_adapter(folder)`'s artifact, the manifest with `run`,
    the run's fingerprint), point `latest` at it, keep the newest `keep` checkpoints."""
    root = checkpoint_root(output_dir)
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:07d}"
    final = os.path.join(root, name)
    with atomic_dir(final) as tmp:
        save_torch({"format_version": FORMAT_VERSION, **state}, os.path.join(tmp, STATE_NAME))
        if write_adapter is not None:
            write_adapter(os.path.join(tmp, ADAPTER))
        manifest = {"format_version": FORMAT_VERSION, "step": step, "run": run, "files": _files(tmp)}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            f.write(strict_json(manifest, indent=2) + "\n")
    with atomic_file(os.path.join(root, LATEST)) as tmp, open(tmp, "w") as f:
        f.write(name + "\n")
    if keep > 0:
        for old in list_checkpoints(output_dir)[keep:]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(folder: str) -> dict:
    """The manifest of a checkpoint whose files are all there with their recorded size and SHA-256."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            man = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST} (not a lorart checkpoint of format {FORMAT_VERSION}: "
                              "older lorart versions wrote none)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(man, dict) or man.get("format_version") != FORMAT_VERSION or not isinstance(
            man.get("files"), dict):
        raise CheckpointError(f"{path}: not a lorart checkpoint manifest of format {FORMAT_VERSION}")
    for rel, want in man["files"].items():
        p = os.path.join(folder, rel)
        if not os.path.isfile(p):
            raise CheckpointError(f"{folder}: {rel} is missing")
        if os.path.getsize(p) != want.get("bytes"):
            raise CheckpointError(f"{folder}: {rel} has {os.path.getsize(p)} bytes, the manifest says "
                                  f"{want.get('bytes')} (truncated or replaced)")
        if _sha256(p) != want.get("sha256"):
            raise CheckpointError(f"{folder}: {rel} does not match its SHA-256 in {MANIFEST} (corrupt)")
    if STATE_NAME not in man["files"]:
        raise CheckpointError(f"{path}: lists no {STATE_NAME}")
    return man


def load_checkpoint(folder: str) -> tuple:
    """(manifest, state) of a verified checkpoint; CheckpointError says what is wrong with a bad one."""
    man = verify_checkpoint(folder)
    path = os.path.join(folder, STATE_NAME)
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign file with a matching manifest
        raise CheckpointError(f"{path}: not a readable lorart checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(st, dict) or st.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a lorart checkpoint of format {FORMAT_VERSION}")
    return man, st


def remove_checkpoints_after(output_dir: str, step: int) -> list:
    """Delete checkpoints of steps after `step` (a resume from `step` rewrites that future); their names."""
    gone = []
    for c in list_checkpoints(output_dir):
        if step_of(os.path.basename(c)) > step:
            shutil.rmtree(c, ignore_errors=True)
            gone.append(os.path.basename(c))
    return gone
