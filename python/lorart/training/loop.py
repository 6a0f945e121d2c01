"""`lorart.train`: LoRA / QLoRA fine-tuning with evaluation, early stopping, exact resume and reports."""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..data import batch_indices, collate
from .checkpoint import (check_compatible, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .evaluate import autocast_ctx, batch_nll_sum, eval_loss, format_accuracy, generate_samples
from .options import TrainOptions, option_names
from .outputs import comparison_table, peak_memory, write_json_atomic, write_plot, write_samples
from .progress import Progress
from .setup import format_regex_for, load_and_prepare, load_data, resolve_device, resolve_dtype


@dataclass
class TrainResult:
    output_dir: str
    adapter_dir: str
    metrics_path: str
    summary_path: str
    samples_path: Optional[str]
    plot_path: Optional[str]
    steps: int
    total_steps: int
    epochs: float
    stopped_early: bool
    best_step: Optional[int]
    before: dict          # eval_loss, eval_ppl, general_ppl, format_accuracy before training
    after: dict           # the same after training
    train_loss: Optional[float]   # mean loss of the last min(10, steps) steps
    train_time_s: float
    tokens_per_s: float
    memory: dict          # peak_rss_mb (+ peak_gpu_allocated_mb)
    history: list = field(repr=False, default_factory=list)
    samples_before: list = field(repr=False, default_factory=list)
    samples_after: list = field(repr=False, default_factory=list)
    notes: list = field(default_factory=list)
    model: Any = field(repr=False, default=None)
    tokenizer: Any = field(repr=False, default=None)
    method: Any = field(repr=False, default=None)   # the lorart.methods.Method trained (report(), merge(), ...)


def _lr_lambda(opts: TrainOptions, total: int, warmup: int) -> Callable[[int], float]:
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


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _evaluate_all(model, tok, data, opts, dev, dtype, is_lorart, regex, pad, known_eval=None) -> tuple:
    ev = known_eval or eval_loss(model, data.eval, pad, dev, dtype, opts.batch_size)
    gen = eval_loss(model, data.general, pad, dev, dtype, opts.batch_size)
    samples = []
    if opts.num_samples and data.eval:
        samples = generate_samples(model, tok, data.eval, opts.num_samples, opts.sample_max_new_tokens, dev,
                                   dtype, is_lorart, opts.batch_size)
    m = {"eval_loss": ev and ev["loss"], "eval_ppl": ev and ev["ppl"], "general_ppl": gen and gen["ppl"],
         "format_accuracy": format_accuracy(samples, regex)}
    return m, samples


def train(model=None, data=None, *, tokenizer=None, eval_data=None, output_dir: str = "lorart-output",
          device: str = "auto", resume=False, general_data=True, progress: bool = True, stream=None,
          callback: Optional[Callable[[dict], Optional[bool]]] = None, **options) -> TrainResult:
    """Fine-tune `model` on `data` with a lorart.methods method: "lora" (default), "qlora", "full", "adapter",
    "prefix", "prompt" or "bitfit" (its own options in `method_options=`, e.g. {"bottleneck": 64}).

    model: None / "default" (the embedded SmolLM2-135M-Instruct), an HF folder or .gguf path, or a loaded
        nn.Module (lorart's LlamaForCausalLM or a transformers causal LM) with `tokenizer=`.
    data: a data file (.jsonl/.json/.parquet/.csv), a folder or glob of them, records (any iterable of dicts), or
        None / "default" (the bundled answer-format set; its held-out file is the eval set); formats in
        docs/train.md "Data". eval_data: the same kinds; without it
        `eval_fraction` of data is held out. general_data: True (the bundled general text), a path, or False:
        the perplexity before/after that checks forgetting.
    resume: True (the latest checkpoint in output_dir, if any) or a checkpoint folder; continues to exactly
        the result of an uninterrupted run. callback(record) after each step; returning True stops training.
    options: see lorart.training.TrainOptions (r, alpha, dropout, targets, lr, epochs, max_steps, batch_size,
        grad_accum, max_seq_len, warmup, schedule, weight_decay, eval_every, save_every,
        early_stopping_patience, gradient_checkpointing, packing, seed, eval_fraction, num_samples, ...).
    Writes output_dir/{adapter/, metrics.jsonl, loss.png, samples.md, summary.json, checkpoints/}."""
    unknown = sorted(set(options) - set(option_names()))
    if unknown:
        raise TypeError(f"lorart.train: unknown argument(s) {', '.join(map(repr, unknown))}; expected one of "
                        f"{', '.join(option_names())}")
    opts = TrainOptions(**options).validate()
    out = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"lorart.train: argument `output_dir`: {out} exists and is not a folder")
    dev = resolve_device(device)
    dtype = resolve_dtype(opts, dev)
    ckpt_dir = None
    if resume:
        ckpt_dir = latest_checkpoint(out) if resume is True else os.fspath(resume)
    pg = Progress(0, stream=stream if stream is not None else sys.stderr, log_every=opts.log_every,
                  enabled=progress)
    t_setup = time.perf_counter()
    loaded = load_and_prepare(model, tokenizer, opts, dev, dtype)
    m, tok = loaded.model, loaded.tokenizer
    if opts.packing and not loaded.is_lorart:
        raise ValueError("lorart.train: argument `packing`: packing needs lorart's LlamaForCausalLM (its "
                         "block-diagonal masks); pass packing=False for other models")
    data_ = load_data(data, eval_data, tok, opts, general_data)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    regex = format_regex_for(opts, data_)
    lengths = [len(e) for e in data_.train]
    n_batches = math.ceil(len(lengths) / opts.batch_size)
    steps_per_epoch = math.ceil(n_batches / opts.grad_accum)
    total = opts.max_steps or opts.epochs * steps_per_epoch
    warmup = min(opts.warmup_steps(total), total)
    eval_every = opts.eval_every or max(1, total // 4)
    save_every = opts.save_every or eval_every
    pg.total = total

    params = _trainable(m)
    from ..optim import PagedAdamW
    optim = PagedAdamW(list(params.values()), lr=opts.lr, weight_decay=opts.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(opts, total, warmup))
    st = {"step": 0, "epoch": 0, "pos": 0, "history": [], "best_loss": None, "best_step": None, "bad_evals": 0,
          "best_weights": None, "stopped_early": False, "before": None, "samples_before": [], "tokens": 0,
          "train_time_s": 0.0}
    notes = []
    if ckpt_dir is not None:
        saved = load_checkpoint(ckpt_dir)
        check_compatible(saved["options"], opts.fingerprint(), ckpt_dir)
        missing = set(params) - set(saved["weights"])
        if missing:
            raise ValueError(f"lorart.train: argument `resume`: {ckpt_dir} lacks weights {sorted(missing)[:4]}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved["weights"][n])
        optim.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"], dev)
        st.update(saved["state"])
        pg.message(f"resumed from {ckpt_dir} at step {st['step']}/{total}")
    elif resume:
        pg.message(f"no checkpoint in {out}: starting from the beginning")
    os.makedirs(out, exist_ok=True)
    metrics_path = os.path.join(out, "metrics.jsonl")
    write_json_atomic(metrics_path, st["history"], lines=True)  # a resumed run drops records past its checkpoint
    pg.message(f"lorart train: {opts.method} r={opts.r} on {loaded.model_name or type(m).__name__} ({dev}, "
               f"{str(dtype).replace('torch.', '')}); {len(data_.train)} train / {len(data_.eval)} eval examples; "
               f"{total} steps of {opts.batch_size}x{opts.grad_accum}; setup {time.perf_counter() - t_setup:.1f} s")
    if st["before"] is None and not opts.eval_before:
        st["before"] = {"eval_loss": None, "eval_ppl": None, "general_ppl": None, "format_accuracy": None}
        torch.manual_seed(opts.seed)
    if st["before"] is None:
        t0 = time.perf_counter()
        st["before"], st["samples_before"] = _evaluate_all(m, tok, data_, opts, dev, dtype, loaded.is_lorart, regex,
                                                           pad)
        pg.message(f"before training: {_fmt_metrics(st['before'])} ({time.perf_counter() - t0:.1f} s)")
        torch.manual_seed(opts.seed)  # the dropout stream starts here, resumable from the checkpoints' RNG state

    def checkpoint():
        save_checkpoint(out, st["step"], {
            "options": opts.fingerprint(), "weights": {n: p.detach().cpu().clone() for n, p in params.items()},
            "optimizer": optim.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(dev),
            "state": dict(st)}, keep=opts.keep_checkpoints)

    epoch_cache = {}

    def epoch_batches(e):
        if e not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[e] = batch_indices(lengths, opts.batch_size, shuffle=True, seed=opts.seed, epoch=e)
        return epoch_cache[e]

    pg.start_step = st["step"]
    pg.t0 = time.perf_counter()
    m.train()
    mf = open(metrics_path, "a", encoding="utf-8")
    try:
        while st["step"] < total and not st["stopped_early"]:
            t0 = time.perf_counter()
            bl = epoch_batches(st["epoch"])
            idx = bl[st["pos"]:st["pos"] + opts.grad_accum]
            st["pos"] += len(idx)
            batches = [collate([data_.train[i] for i in b], pad) for b in idx]
            ntgt = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            loss_sum = 0.0
            for b in batches:
                with autocast_ctx(dev, dtype):
                    nll, _ = batch_nll_sum(m, b, dev)
                (nll / max(ntgt, 1)).backward()
                loss_sum += float(nll.detach())
                del nll
            if opts.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(params.values()), opts.max_grad_norm)
            lr = optim.param_groups[0]["lr"]
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            if st["pos"] >= len(bl):
                st["epoch"], st["pos"] = st["epoch"] + 1, 0
            st["step"] += 1
            dt = time.perf_counter() - t0
            ntok = sum(int(b["attention_mask"].sum()) if b["attention_mask"].dim() == 2 else
                       sum(len(data_.train[i]) for i in ib) for b, ib in zip(batches, idx))
            st["tokens"] += ntok
            st["train_time_s"] += dt
            rec = {"step": st["step"], "epoch": round(st["epoch"] + st["pos"] / len(bl), 4),
                   "loss": loss_sum / max(ntgt, 1), "lr": lr, "tokens": ntok, "tokens_per_s": ntok / dt,
                   "elapsed_s": round(st["train_time_s"], 3)}
            records = [rec]
            pg.update(st["step"], rec["loss"], lr, st["tokens"] / st["train_time_s"])
            if st["step"] % eval_every == 0 or st["step"] == total:
                records += _eval_step(m, data_, opts, dev, dtype, pad, st, params, pg)
            st["history"].extend(records)
            for r_ in records:
                mf.write(_json(r_) + "\n")
            mf.flush()
            if st["step"] % save_every == 0 or st["step"] == total or st["stopped_early"]:
                checkpoint()
            if callback is not None and callback(rec):
                pg.message(f"stopped by the callback at step {st['step']}")
                break
    finally:
        mf.close()
        pg.close()
    return _finish(m, tok, loaded, data_, opts, dev, dtype, pad, regex, st, params, out, total, notes, pg)


def _json(rec: dict) -> str:
    import json
    return json.dumps(rec)


def _fmt_metrics(mt: dict) -> str:
    parts = []
    if mt.get("eval_loss") is not None:
        parts.append(f"held-out loss {mt['eval_loss']:.4f} (ppl {mt['eval_ppl']:.2f})")
    if mt.get("format_accuracy") is not None:
        parts.append(f"format accuracy {mt['format_accuracy']:.0%}")
    if mt.get("general_ppl") is not None:
        parts.append(f"general-text ppl {mt['general_ppl']:.2f}")
    return ", ".join(parts) or "no held-out data"


def _eval_step(m, data_, opts, dev, dtype, pad, st, params, pg) -> list:
    ev = eval_loss(m, data_.eval, pad, dev, dtype, opts.batch_size)
    if ev is None:
        return []
    rec = {"step": st["step"], "eval_loss": ev["loss"], "eval_ppl": ev["ppl"]}
    improved = st["best_loss"] is None or ev["loss"] < st["best_loss"] - opts.early_stopping_min_delta
    if improved:
        st["best_loss"], st["best_step"], st["bad_evals"] = ev["loss"], st["step"], 0
        if opts.early_stopping_patience:
            st["best_weights"] = {n: p.detach().cpu().clone() for n, p in params.items()}
    else:
        st["bad_evals"] += 1
    msg = f"step {st['step']}: eval loss {ev['loss']:.4f} (ppl {ev['ppl']:.2f})"
    if opts.early_stopping_patience and st["bad_evals"] >= opts.early_stopping_patience:
        st["stopped_early"] = True
        msg += (f"; no improvement in {st['bad_evals']} evaluations: early stop (best {st['best_loss']:.4f} "
                f"at step {st['best_step']})")
    pg.message(msg)
    return [rec]


def _finish(m, tok, loaded, data_, opts, dev, dtype, pad, regex, st, params, out, total, notes, pg) -> TrainResult:
    if st["best_weights"] is not None and st["best_step"] != st["step"]:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(st["best_weights"][n])
        notes.append(f"restored the adapter of step {st['best_step']} (the best eval loss)")
        pg.message(notes[-1])
    t0 = time.perf_counter()
    last = st["history"][-1] if st["history"] else {}
    known = None  # the evaluation of the final step, when it saw these very weights
    if not notes and last.get("step") == st["step"] and "eval_loss" in last:
        known = {"loss": last["eval_loss"], "ppl": last["eval_ppl"]}
    after, samples_after = _evaluate_all(m, tok, data_, opts, dev, dtype, loaded.is_lorart, regex, pad, known)
    before = st["before"]
    pg.message(f"after training: {_fmt_metrics(after)} ({time.perf_counter() - t0:.1f} s)")
    adapter_dir = loaded.method.save(os.path.join(out, "adapter"))
    metrics_path = os.path.join(out, "metrics.jsonl")
    write_json_atomic(metrics_path, st["history"], lines=True)
    plot_path = os.path.join(out, "loss.png")
    note = write_plot(plot_path, st["history"])
    if note:
        notes.append(note)
        plot_path = None
    samples_path = None
    if st["samples_before"] or samples_after:
        samples_path = os.path.join(out, "samples.md")
        write_samples(samples_path, st["samples_before"], samples_after, before.get("format_accuracy"),
                      after.get("format_accuracy"))
    losses = [h["loss"] for h in st["history"] if "loss" in h]
    mem = peak_memory(dev)
    tps = st["tokens"] / st["train_time_s"] if st["train_time_s"] else 0.0
    res = TrainResult(
        output_dir=out, adapter_dir=adapter_dir, metrics_path=metrics_path,
        summary_path=os.path.join(out, "summary.json"), samples_path=samples_path, plot_path=plot_path,
        steps=st["step"], total_steps=total,
        epochs=next((h["epoch"] for h in reversed(st["history"]) if "epoch" in h), 0.0), stopped_early=st["stopped_early"],
        best_step=st["best_step"], before=before, after=after,
        train_loss=sum(losses[-10:]) / len(losses[-10:]) if losses else None, train_time_s=st["train_time_s"],
        tokens_per_s=tps, memory=mem, history=st["history"], samples_before=st["samples_before"],
        samples_after=samples_after, notes=notes, model=m, tokenizer=tok, method=loaded.method)
    summary = {k: getattr(res, k) for k in ("output_dir", "adapter_dir", "metrics_path", "samples_path", "plot_path",
                                            "steps", "total_steps", "stopped_early", "best_step", "before", "after",
                                            "train_loss", "train_time_s", "tokens_per_s", "memory", "notes")}
    summary.update({"method": loaded.method.report(), "artifact_bytes": loaded.method.storage_bytes(adapter_dir),
                    "model": loaded.model_name, "device": str(dev), "dtype": str(dtype).replace("torch.", ""),
                    "train_data": data_.train_path, "eval_data": data_.eval_path, "data_files": data_.files,
                    "train_examples": len(data_.train), "eval_examples": len(data_.eval),
                    "options": opts.to_dict()})
    write_json_atomic(res.summary_path, summary)
    pg.message(comparison_table(before, after))
    mem_txt = ", ".join(f"{k} {v:,.0f}" for k, v in mem.items())
    pg.message(f"{st['step']} steps in {st['train_time_s']:.1f} s ({tps:,.0f} tok/s); {mem_txt}; outputs in {out}")
    for n in notes[1 if notes and notes[0].startswith("restored") else 0:]:
        pg.message("note: " + n)
    return res
