"""The recipe's evaluations (recipe.py): before training, every `eval_every` steps (with early stopping's
bookkeeping: the best eval loss, its step and, with a patience, its weights) and after training. The measures
themselves (held-out loss, perplexity, greedy samples, format accuracy) are evaluate.py's.

`Evaluation` is a part of Recipe (one of its bases): it uses what Recipe.setup builds (model, tokenizer, data,
pad, regex, params) and writes the evaluations into the recipe's `state` (RunState).
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch

from .evaluate import eval_loss, format_accuracy, generate_samples
from .result import format_metrics


class Evaluation:
    """Recipe's evaluations: `evaluate()`, `evaluate_before()`, `evaluate_step()`."""

    def evaluate(self, known_eval: Optional[dict] = None) -> tuple:
        """Held-out loss/ppl, general-text ppl, greedy samples and their format accuracy: (metrics, samples)."""
        o, d, dist = self.opts, self.data, self.dist
        ev = known_eval or eval_loss(self.model, d.eval, self.pad, self.device, self.dtype, o.batch_size, dist)
        gen = eval_loss(self.model, d.general, self.pad, self.device, self.dtype, o.batch_size, dist)
        samples = []
        if o.num_samples and d.eval:
            samples = generate_samples(self.model, self.tokenizer, d.eval, o.num_samples, o.sample_max_new_tokens,
                                       self.device, self.dtype, self.is_lorart, o.batch_size, dist)
        return {"eval_loss": ev and ev["loss"], "eval_ppl": ev and ev["ppl"], "general_ppl": gen and gen["ppl"],
                "format_accuracy": format_accuracy(samples, self.regex)}, samples

    def evaluate_before(self) -> None:
        st = self.state
        if st.before is None:
            if self.opts.eval_before:
                t0 = time.perf_counter()
                st.before, st.samples_before = self.evaluate()
                self.progress.message(f"before training: {format_metrics(st.before)} "
                                      f"({time.perf_counter() - t0:.1f} s)")
                self.reporter.before(st.before)
            else:
                st.before = {"eval_loss": None, "eval_ppl": None, "general_ppl": None, "format_accuracy": None}
            # the dropout stream starts here (one per rank); checkpoints hold its state
            torch.manual_seed(self.opts.seed + self.dist.rank)

    def evaluate_step(self) -> list:
        """The periodic held-out evaluation and the early-stopping bookkeeping: [record] or []."""
        o, st = self.opts, self.state
        ev = eval_loss(self.model, self.data.eval, self.pad, self.device, self.dtype, o.batch_size, self.dist)
        if ev is None:
            return []
        improved = st.best_loss is None or ev["loss"] < st.best_loss - o.early_stopping_min_delta
        if math.isfinite(ev["loss"]) and improved:
            st.best_loss, st.best_step, st.bad_evals = ev["loss"], st.step, 0
            if o.early_stopping_patience:   # whole tensors, on rank 0 only
                st.best_weights = self.dist.full_state(self.params) or None
        else:
            st.bad_evals += 1
        msg = f"step {st.step}: eval loss {ev['loss']:.4f} (ppl {ev['ppl']:.2f})"
        if o.early_stopping_patience and st.bad_evals >= o.early_stopping_patience:
            st.stopped_early = True
            msg += (f"; no improvement in {st.bad_evals} evaluations: early stop (best {st.best_loss:.4f} "
                    f"at step {st.best_step})")
        self.progress.message(msg)
        return [{"step": st.step, "eval_loss": ev["loss"], "eval_ppl": ev["ppl"]}]
