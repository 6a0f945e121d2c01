"""The recipe's step loop (recipe.py): the micro-batches of each optimizer step, the gradient accumulated over them,
its norm and clipping, the update, the learning-rate schedule, and the non-finite rule (a non-finite loss, gradient
norm or weight is never applied nor written: the step is skipped within `skip_nonfinite`, else the run stops).

`TrainingSteps` is a part of Recipe (one of its bases): it uses what Recipe.setup builds (model, train_model,
params, optimizer, scheduler, scaler, data, pad, total, eval_every, save_every) and the recipe's other parts
(evaluate_step: recipe_eval.py; save_checkpoint: recipe_checkpoints.py).
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Callable

import torch

from ..data import batch_indices, collate
from . import sharding
from .checkpoint import latest_checkpoint
from .evaluate import autocast_ctx, batch_nll_sum, target_tokens
from .folder import TrainingError
from .options import TrainOptions


class NonFiniteError(TrainingError):
    """A non-finite loss, gradient norm or weight stopped the run; nothing non-finite was written."""


def lr_lambda(opts: TrainOptions, total: int, warmup: int) -> Callable[[int], float]:
    floor = opts.min_lr_ratio

    def f(step: int) -> float:  # `step` optimizer steps done; the factor applies to the next one
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if opts.schedule == "constant" or total <= warmup:
            return 1.0
        prog = min(1.0, (step - warmup) / max(1, total - warmup))
        if opts.schedule == "linear":
            return floor + (1 - floor) * (1 - prog)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog))
    return f


class TrainingSteps:
    """Recipe's training: `train()` runs `step()` after `step()`; evaluations and checkpoints on their schedule."""

    def train(self) -> None:
        """Steps until max_steps / the epochs, early stopping or the callback; evaluations and checkpoints on
        their schedule; metrics.jsonl gets each record as it comes."""
        st, pg = self.state, self.progress
        pg.total, pg.start_step, pg.t0 = self.total, st.step, time.perf_counter()
        self.model.train()
        try:
            with self.dist.guard(lambda: f"at step {st.step + 1} (newest checkpoint kept: "
                                         f"{latest_checkpoint(self.folder.path) or 'none'})"):
                self._train_loop()
        finally:
            pg.close()

    def _train_loop(self) -> None:
        st, pg = self.state, self.progress
        while st.step < self.total and not st.stopped_early:
            rec = self.step()
            pg.update(st.step, rec["loss"], rec["lr"], st.tokens / st.train_time_s)
            records = [rec]
            if st.step % self.eval_every == 0 or st.step == self.total:
                records += self.evaluate_step()
            st.history.extend(records)
            if self.dist.is_main:
                self.folder.append_metrics(records)
            self.reporter.log_records(records, st, self.scaler, self.device)   # trackers: rank 0's only
            if st.step % self.save_every == 0 or st.step == self.total or st.stopped_early:
                self.save_checkpoint()
            # a callback on any rank stops them all
            if self.dist.any(self.callback is not None and bool(self.callback(rec))):
                pg.message(f"stopped by the callback at step {st.step}")
                break

    def next_batches(self) -> tuple:
        """The micro-batches of the next optimizer step (collated) and their example indices."""
        st, o = self.state, self.opts
        if st.epoch not in self._order:
            self._order = {st.epoch: batch_indices([len(e) for e in self.data.train], o.batch_size, shuffle=True,
                                                   seed=o.seed, epoch=st.epoch)}
        order = self._order[st.epoch]
        idx = order[st.pos:st.pos + o.grad_accum]
        st.pos += len(idx)
        if st.pos >= len(order):
            st.epoch, st.pos = st.epoch + 1, 0
        return [collate([self.data.train[i] for i in b], self.pad) for b in idx], idx

    def forward_backward(self, batches: list) -> tuple:
        """Accumulate the gradient of the mean next-token loss over all target tokens of `batches` (one optimizer
        step's micro-batches): each micro-batch's summed loss is divided by the step's total target count, so
        grad_accum=k of batch b equals one batch of k*b. With several ranks each runs its rows of every micro-batch
        (`dist.rows`) and the gradients are summed over the ranks: the same gradient. Returns (summed loss of this
        rank's rows, target tokens of the whole step)."""
        ntgt = sum(target_tokens(b["labels"]) for b in batches)
        total = 0.0
        if self.dist.fsdp:   # an evaluation's forward leaves the root unsharded: each step gathers what it uses
            sharding.reshard(self.model)
        with self.dist.counting_step():   # its collectives' bytes (summary.json's `distributed`)
            for k, b in enumerate(batches):
                part, weight = self.dist.rows(b)
                with self.dist.no_sync(self.train_model, last=k == len(batches) - 1):
                    with autocast_ctx(self.device, self.dtype):
                        nll, _ = batch_nll_sum(self.model, part, self.device, self.train_model)
                    self.scaler.backward(nll * weight / max(ntgt, 1))   # float16: times the loss scale
                total += float(nll.detach()) * weight
                del nll
        return total, ntgt

    def grad_norm(self) -> float:
        """The gradients' total L2 norm, clipped to max_grad_norm when it is set."""
        params = [p for p in self.params.values() if p.grad is not None]
        if not params:
            return 0.0
        norm = sharding.full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params]))  # FSDP: over ranks
        if self.opts.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.opts.max_grad_norm, norm)
        return float(norm)

    def step(self) -> dict:
        """One optimizer step; its metrics record. A non-finite loss or gradient norm is never applied: with
        float16, an overflow of the loss scale skips the step and lowers the scale (precision.py); otherwise the
        step is skipped (within `skip_nonfinite`) or the run stops with NonFiniteError."""
        st = self.state
        t0 = time.perf_counter()
        batches, idx = self.next_batches()
        self.meter.start()
        loss_sum, ntgt = self.forward_backward(batches)
        loss_sum = self.dist.sum([loss_sum])[0]
        self.scaler.unscale()
        loss, gnorm = loss_sum / max(ntgt, 1), self.grad_norm()
        lr = self.optimizer.param_groups[0]["lr"]
        scale = self.scaler.scale
        outcome = self.scaler.outcome(loss, gnorm)
        self.scaler.step(outcome)   # the update when "ok"; the loss scale adjusted
        with warnings.catch_warnings():   # a skipped first step is meant: torch would warn the order is wrong
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning)
            self.scheduler.step()   # a skipped step still advances the schedule: lr stays a function of the step
        self.optimizer.zero_grad(set_to_none=True)
        self.meter.stop()
        st.step += 1
        dt = time.perf_counter() - t0
        ntok = sum(len(self.data.train[i]) for b in idx for i in b)
        st.tokens += ntok
        st.train_time_s += dt
        rec = {"step": st.step, "epoch": round(st.epoch + st.pos / self.batches_per_epoch, 4), "loss": loss,
               "grad_norm": gnorm, "lr": lr, "tokens": ntok, "tokens_per_s": ntok / dt,
               "elapsed_s": round(st.train_time_s, 3)}
        if self.scaler.enabled:
            rec["loss_scale"] = scale
        if outcome == "overflow":
            rec["overflow"] = True
            st.overflow_steps.append(st.step)
            self.progress.message(f"step {st.step}: float16 gradients overflowed at loss scale {scale:g}: step "
                                  f"skipped, scale lowered to {self.scaler.scale:g} ({len(st.overflow_steps)} "
                                  "overflow steps so far)")
        elif outcome == "nonfinite":
            self._non_finite(rec)
        return rec

    def _non_finite(self, rec: dict) -> None:
        st, o = self.state, self.opts
        what = f"the loss is {rec['loss']}" if not math.isfinite(rec["loss"]) else \
            f"the gradient norm is {rec['grad_norm']}" + (
                f" even at the smallest float16 loss scale ({rec['loss_scale']:g})" if "loss_scale" in rec else "")
        st.skipped.append(st.step)
        rec["skipped"] = True
        if len(st.skipped) <= o.skip_nonfinite:
            self.progress.message(f"step {st.step}: {what}: step skipped, no update "
                                  f"({len(st.skipped)} of {o.skip_nonfinite} allowed skips used)")
            return
        st.history.append(rec)
        if self.dist.is_main:
            self.folder.append_metrics([rec])
        self.reporter.log_records([rec], self.state, self.scaler, self.device)   # trackers: rank 0's only
        raise self.dist.agreed(NonFiniteError(
            f"lorart.train: step {st.step}: {what} (not finite): training stopped without applying it; no adapter "
            f"was written; newest checkpoint kept: {latest_checkpoint(self.folder.path) or 'none'}. Lower lr or "
            "max_grad_norm and start over, or skip such steps: skip_nonfinite=N (--skip-nonfinite N)"
            + (f" (skipped so far: steps {st.skipped[:-1]})" if len(st.skipped) > 1 else "")))

    def check_finite_weights(self) -> None:
        """Before anything is written (save_checkpoint, finish): NonFiniteError, alike on every rank, when a trainable
        weight holds a non-finite value."""
        bad = self.dist.non_finite(self.params)
        if bad:
            raise self.dist.agreed(NonFiniteError(
                f"lorart.train: step {self.state.step}: {len(bad)} trainable tensors hold non-finite values (first: "
                f"{bad[0]}); nothing was written; newest checkpoint kept: "
                f"{latest_checkpoint(self.folder.path) or 'none'}. Lower lr or max_grad_norm and start over"))
