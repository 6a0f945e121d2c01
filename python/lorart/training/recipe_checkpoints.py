"""The recipe's checkpoints (recipe.py): find the one to resume (the newest intact one of the output folder, or a
given folder; refused when it belongs to another run), restore it on every rank, and save one (whole tensors,
gathered from every rank, written by rank 0). The format on disk is checkpoint.py's.

`Checkpointing` is a part of Recipe (one of its bases): it uses what Recipe.setup builds (folder, fingerprint,
params, optimizer, scheduler, scaler, method, total) and restores the recipe's `state` (RunState).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .._atomic import strict_json
from ..dtensor import local_of
from . import sharding
from .checkpoint import (CheckpointError, list_checkpoints, load_checkpoint, remove_checkpoints_after, rng_state,
                         save_checkpoint, set_rng_state)
from .fingerprint import describe_differences
from .run_state import RunState


class Checkpointing:
    """Recipe's checkpoints: `find_checkpoint()` and `restore()` to resume, `save_checkpoint()`, `whole_weights()`."""

    def find_checkpoint(self, checkpoint=True) -> Optional[tuple]:
        """(folder, state) of the newest intact checkpoint of the output folder (`checkpoint=True`; damaged ones
        are skipped and reported) or of the given checkpoint folder. Refuses a checkpoint of another run. None:
        no checkpoint. Checkpoints past it are deleted (that future is recomputed)."""
        explicit = checkpoint is not True
        candidates = [os.path.abspath(os.fspath(checkpoint))] if explicit else list_checkpoints(self.folder.path)
        damaged = []
        for folder in candidates:
            try:
                manifest, saved = load_checkpoint(folder)
            except CheckpointError as e:
                if explicit:
                    raise ValueError(f"lorart.train: argument `resume`: {e}") from None
                damaged.append(str(e))
                continue
            diff = describe_differences(manifest.get("run") or {}, json.loads(strict_json(self.fingerprint)))
            if diff:
                raise ValueError(f"lorart.train: argument `resume`: the checkpoint {folder} belongs to another run: "
                                 f"{'; '.join(diff)}. Resume with the same model, data and options, or pass "
                                 "overwrite=True (--overwrite) to start over")
            missing = set(self.params) - set(saved["weights"])
            if missing:
                raise ValueError(f"lorart.train: argument `resume`: {folder} lacks weights {sorted(missing)[:4]}")
            if damaged:
                self.notes.append(f"skipped damaged checkpoints ({'; '.join(damaged)}); resumed from "
                                  f"{os.path.basename(folder)}, the newest intact one")
                self.progress.message("resume: " + self.notes[-1])
            step = saved["state"]["step"]
            remove_checkpoints_after(self.folder.path, step)
            ranks = saved.get("world_size", 1)
            self.progress.message(f"resumed from {folder} at step {step}/{self.total}" + (
                f" (saved by {ranks} processes, resumed by {self.dist.world_size})"
                if ranks != self.dist.world_size else ""))
            return folder, saved
        if damaged:
            raise ValueError(f"lorart.train: argument `resume`: no intact checkpoint in {self.folder.path} "
                             f"({'; '.join(damaged)}); pass overwrite=True (--overwrite) to start over")
        return None

    def restore(self, saved: Optional[dict]) -> None:
        """Every rank restores rank 0's checkpoint `saved` (found by find_checkpoint; None on the other ranks):
        weights, optimizer, scheduler, loss scale, RNG and the run's state."""
        self._restore(self._shared(saved))

    def _shared(self, saved: Optional[dict]) -> dict:
        """Rank 0's checkpoint on every rank, weights and optimizer states as each rank's part (distributed.py);
        the early-stopping weights stay whole on rank 0."""
        if self.dist.single:
            return saved
        best = saved["state"].pop("best_weights", None) if saved is not None else None
        order = [p for g in self.optimizer.param_groups for p in g["params"]]

        def like(path):
            if len(path) == 2 and path[0] == "weights":
                return self.params.get(path[1])
            if len(path) == 4 and path[:2] == ("optimizer", "state") and path[3] in ("exp_avg", "exp_avg_sq"):
                return order[path[2]]
            return None
        out = self.dist.share_checkpoint(saved, like)
        out["state"]["best_weights"] = best
        return out

    def _restore(self, saved: dict) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                local_of(p).copy_(saved["weights"][n])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved.get("scaler") or {})
        ranks = saved.get("rng_ranks") or [saved["rng"]]
        if len(ranks) == self.dist.world_size:   # the same world size: each rank's own dropout stream
            set_rng_state(ranks[self.dist.rank], self.device)
        elif self.dist.is_main:
            set_rng_state(saved["rng"], self.device)
        else:   # another world size: ranks > 0 start new dropout streams
            torch.manual_seed(self.opts.seed + self.dist.rank + 1_000_003 * saved["state"]["step"])
        if len(ranks) != self.dist.world_size and self.opts.dropout > 0:
            self.notes.append(f"resumed by {self.dist.world_size} processes from a checkpoint of {len(ranks)}: "
                              "the ranks' dropout masks differ from an uninterrupted run's")
        self.state = RunState.from_dict(saved["state"])

    def save_checkpoint(self) -> Optional[str]:
        """checkpoints/step-N/: state.pt, the method's artifact in adapter/, the manifest (checkpoint.py). Whole
        tensors, gathered from every rank, written by rank 0 (whose path is returned; None on the others)."""
        self.check_finite_weights()
        st, dist = self.state, self.dist
        state = {"weights": dist.full_state(self.params),
                 "optimizer": dist.full_optimizer_state(self.optimizer.state_dict()),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "rng": rng_state(self.device), "state": st.to_dict()}
        if not dist.single:
            state.update(world_size=dist.world_size, rng_ranks=dist.gather(rng_state(self.device)))

        def write():
            with self.folder.writing(f"checkpoint step-{st.step:07d}"):
                return save_checkpoint(self.folder.path, st.step, state, run=self.fingerprint,
                                       write_adapter=self.method.save, keep=self.opts.keep_checkpoints)
        with self.whole_weights(state["weights"]):
            return dist.on_main(write)

    def whole_weights(self, have: Optional[dict] = None):
        """While inside, rank 0's model holds whole weights where FSDP shards them (the trainable ones, or all for
        a method whose artifact is the whole model), for the method's own `save`. `have`: the trainable weights
        already gathered (full_state: whole on rank 0, {} elsewhere)."""
        if have is not None and not self.dist.is_main:
            have = dict.fromkeys(self.params)   # the same names on every rank: the same gathers
        return sharding.full_params_on_main(self.model, self.dist.is_main, not self.method.saves_whole_model, have)
