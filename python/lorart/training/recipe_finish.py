"""Finishing a run (recipe.py): the best weights restored (early stopping), the final evaluation, then adapter/,
metrics.jsonl, loss.png, samples.md and summary.json written by rank 0, and the TrainResult every rank returns.

`Finishing` is a part of Recipe (one of its bases): it uses what Recipe.setup builds and the recipe's other parts
(evaluate: recipe_eval.py; whole_weights: recipe_checkpoints.py; check_finite_weights: recipe_steps.py; the
plan's checks memory_check and time_check: recipe.py).
"""
from __future__ import annotations

import time
from typing import Optional

from .outputs import comparison_table, peak_memory, write_plot, write_samples
from .result import TrainResult, format_metrics


class Finishing:
    """Recipe's end: `finish()` -> TrainResult; `summary()`, the content of summary.json."""

    def finish(self) -> TrainResult:
        """Restore the best weights (early stopping), evaluate, write adapter/, metrics, plot, samples, summary
        (rank 0; every rank returns the same TrainResult)."""
        with self.dist.guard(lambda: "while finishing the run"):
            return self._finish()

    def _finish(self) -> TrainResult:
        st, pg, out, dist = self.state, self.progress, self.folder, self.dist
        restore = bool(self.opts.early_stopping_patience) and st.best_step is not None and st.best_step != st.step
        if restore:   # decided alike on every rank: the whole best weights live on rank 0
            dist.load_full(self.params, st.best_weights)
            self.notes.insert(0, f"restored the adapter of step {st.best_step} (the best eval loss)")
            pg.message(self.notes[0])
        t0 = time.perf_counter()
        last = st.history[-1] if st.history else {}
        known = None  # the evaluation of the final step, when it saw these very weights
        if not restore and last.get("step") == st.step and "eval_loss" in last:
            known = {"loss": last["eval_loss"], "ppl": last["eval_ppl"]}
        after, samples_after = self.evaluate(known)
        pg.message(f"after training: {format_metrics(after)} ({time.perf_counter() - t0:.1f} s)")
        self.check_finite_weights()
        with self.whole_weights():
            files = dist.broadcast(dist.on_main(lambda: self._write_outputs(samples_after, after)))
        if files["note"]:
            self.notes.append(files["note"])
        losses = [h["loss"] for h in st.history if "loss" in h and not h.get("skipped")]
        mem = {**peak_memory(self.device), **self.memory_check()}
        tps = st.tokens / st.train_time_s if st.train_time_s else 0.0
        res = TrainResult(
            output_dir=out.path, adapter_dir=files["adapter_dir"], metrics_path=files["metrics_path"],
            summary_path=out.join("summary.json"), samples_path=files["samples_path"], plot_path=files["plot_path"],
            steps=st.step, total_steps=self.total,
            epochs=next((h["epoch"] for h in reversed(st.history) if "epoch" in h), 0.0),
            stopped_early=st.stopped_early, best_step=st.best_step, before=st.before, after=after,
            train_loss=sum(losses[-10:]) / len(losses[-10:]) if losses else None, train_time_s=st.train_time_s,
            tokens_per_s=tps, memory=mem, history=st.history, samples_before=st.samples_before,
            samples_after=samples_after, notes=self.notes, model=self.model, tokenizer=self.tokenizer,
            method=self.method, skipped_steps=list(st.skipped), overflow_steps=list(st.overflow_steps))
        mem_ranks = dist.gather(mem)

        def write_summary():
            summary = self.summary(res, mem_ranks)
            out.write_json("summary.json", summary)
            self.reporter.finish(st.before, after, st.step, summary)
        dist.on_main(write_summary)
        pg.message(comparison_table(st.before, after))
        mem_txt = ", ".join(f"{k} {v:,.0f}" for k, v in mem.items() if k.endswith("_mb"))
        fp16 = f"; {len(st.overflow_steps)} float16 overflow steps skipped" if self.scaler.enabled else ""
        pg.message(f"{st.step} steps in {st.train_time_s:.1f} s ({tps:,.0f} tok/s); {mem_txt}{fp16}; outputs in "
                   f"{out.path}")
        if mem.get("predicted_peak_bytes") and mem.get("measured_peak_bytes"):
            pg.message(f"memory of a step: predicted {mem['predicted_peak_bytes'] / 2**20:,.0f} MiB (lorart plan), "
                       f"measured {mem['measured_peak_bytes'] / 2**20:,.0f} MiB ({mem['measured_what']}; "
                       f"{100 * mem['prediction_error']:+.1f}%)")
        for n in self.notes[1 if self.notes and self.notes[0].startswith("restored") else 0:]:
            pg.message("note: " + n)
        self._finished = True
        return res

    def _write_outputs(self, samples_after: list, after: dict) -> dict:
        """Rank 0: adapter/, metrics.jsonl, loss.png, samples.md; their paths (and a note if the plot is skipped)."""
        st, out = self.state, self.folder
        with out.writing("the adapter"):
            adapter_dir = self.method.save(out.join("adapter"))
        metrics_path = out.write_json("metrics.jsonl", st.history, lines=True)
        plot_path = out.join("loss.png")
        with out.writing("loss.png"):
            note = write_plot(plot_path, st.history)
        samples_path = None
        if st.samples_before or samples_after:
            samples_path = out.join("samples.md")
            with out.writing("samples.md"):
                write_samples(samples_path, st.samples_before, samples_after, st.before.get("format_accuracy"),
                              after.get("format_accuracy"))
        return {"adapter_dir": adapter_dir, "metrics_path": metrics_path, "plot_path": None if note else plot_path,
                "samples_path": samples_path, "note": note}

    def summary(self, res: TrainResult, memory_per_rank: Optional[list] = None) -> dict:
        """summary.json: the result's numbers, the method's report, the run's settings and fingerprint, the ranks
        (`distributed`: world_size, backend, fsdp; each rank's peak memory)."""
        d = self.data
        out = {k: getattr(res, k) for k in ("output_dir", "adapter_dir", "metrics_path", "samples_path", "plot_path",
                                            "steps", "total_steps", "stopped_early", "best_step", "before", "after",
                                            "train_loss", "train_time_s", "tokens_per_s", "memory", "skipped_steps",
                                            "overflow_steps", "notes")}
        out["step_time"] = self.time_check()   # lorart plan's estimate beside the measured step times
        out.update({"method": self.method.report(), "artifact_bytes": self.method.storage_bytes(res.adapter_dir),
                    "model": self.model_name, "device": str(self.device),
                    "dtype": str(self.dtype).replace("torch.", ""), "train_data": d.train_path,
                    "eval_data": d.eval_path, "data_files": d.files, "train_examples": len(d.train),
                    "eval_examples": len(d.eval),
                    "options": self.opts.to_dict(), "fingerprint": self.fingerprint,
                    "distributed": {**self.dist.describe(), "memory_per_rank": memory_per_rank or [res.memory]}})
        return out
