"""One method of `lorart compare`, run in its own process (so its peak memory is its own):
`python -m lorart.training.compare_worker SPEC.json RESULT.json`."""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from .._atomic import strict_json
from ..models import generate, load_model
from .run import train
from .setup import default_dtype, resolve_device


def _median_ms(fn, reps: int) -> float:
    fn()   # warm-up
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(1000 * (time.perf_counter() - t0))
    return statistics.median(ts)


@torch.no_grad()
def measure_latency(model, vocab: int, device, prefill_len: int = 64, decode_tokens: int = 16, reps: int = 5) -> dict:
    """Median forward time of one `prefill_len`-token sequence, and greedy decode time per token (KV cache)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, prefill_len), generator=g).to(device)
    was = model.training
    model.eval()
    try:
        fwd = _median_ms(lambda: model(ids), 2 * reps)
        short = ids[:, :32]
        t_gen = _median_ms(lambda: generate(model, short, max_new_tokens=decode_tokens), max(1, reps // 2))
        t_one = _median_ms(lambda: generate(model, short, max_new_tokens=1), max(1, reps // 2))
    finally:
        model.train(was)
    return {"forward_ms": fwd, "decode_ms_per_token": max(t_gen - t_one, 0.0) / max(decode_tokens - 1, 1)}


def _exact(samples: list) -> float | None:
    if not samples:
        return None
    return sum(1 for s in samples if s["output"].strip() == s["reference"].strip()) / len(samples)


def run(spec: dict) -> dict:
    dev = resolve_device(spec.get("device", "auto"))
    torch.manual_seed(spec["seed"])
    dtype = default_dtype(dev)
    model, tok = load_model(spec.get("model"), dtype=dtype, device=dev)
    vocab = model.config.vocab_size
    base_lat = measure_latency(model, vocab, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    res = train(model, spec.get("data"), tokenizer=tok, eval_data=spec.get("eval_data"),
                output_dir=spec["output_dir"], device=str(dev), general_data=spec.get("general", True),
                progress=spec.get("progress", False), method=spec["method"],
                method_options=spec.get("method_options") or None, lr=spec["lr"], max_steps=spec["max_steps"],
                batch_size=spec["batch_size"], max_seq_len=spec["max_seq_len"], seed=spec["seed"],
                warmup=spec.get("warmup", 2), eval_every=spec["max_steps"], save_every=spec["max_steps"],
                num_samples=spec["num_samples"], sample_max_new_tokens=spec.get("sample_max_new_tokens", 24),
                keep_checkpoints=1, eval_before=spec.get("eval_before", True), overwrite=True,
                report_to=spec.get("report_to") or "none")
    meth = res.method
    rep = meth.report()
    merged = bool(meth.merge())
    lat = measure_latency(res.model, vocab, dev)
    steps = max(res.steps, 1)
    return {
        "method": spec["method"], "lr": spec["lr"], "method_options": spec.get("method_options") or {},
        "config": meth.config_dict(), "trainable_params": rep["trainable_params"], "base_params": rep["base_params"],
        "trainable_percent": rep["trainable_percent"], "added_biases": rep.get("added_biases"),
        "peak_rss_mb": res.memory.get("peak_rss_mb"), "peak_gpu_allocated_mb": res.memory.get("peak_gpu_allocated_mb"),
        "step_time_s": res.train_time_s / steps, "tokens_per_s": res.tokens_per_s, "steps": res.steps,
        "artifact_bytes": meth.storage_bytes(res.adapter_dir), "artifact_dir": res.adapter_dir,
        "merged_for_latency": merged, "base_forward_ms": base_lat["forward_ms"], "forward_ms": lat["forward_ms"],
        "base_decode_ms_per_token": base_lat["decode_ms_per_token"], "decode_ms_per_token": lat["decode_ms_per_token"],
        "before": res.before, "after": res.after, "exact_before": _exact(res.samples_before),
        "exact_after": _exact(res.samples_after), "num_samples": len(res.samples_after),
        "train_loss": res.train_loss, "device": str(dev), "samples_after": res.samples_after[:4],
    }


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    out = run(spec)
    with open(out_path, "w") as f:
        f.write(strict_json(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
