"""Serving benchmark: `lorart serve` (continuous batching across adapters) against the naive way.

N concurrent chat requests (greedy, max_tokens each) sent over HTTP to a `lorart serve` subprocess that holds K
LoRA adapters (r 16 on q/k/v/o, random weights) on the embedded SmolLM2-135M:
- mixed:  request i uses adapter i % K (every step mixes up to K adapters in one forward);
- single: the same requests, all on adapter 0;
- naive:  the same mixed requests one at a time in this process (lorart.models.generate after set_adapter: one
  request per forward, switching adapters between requests); they all arrive at t = 0, so a request's latency
  includes its wait for the ones before it.
- peft:   the peer that runs here: transformers + PEFT on the same weights (the model written as an HF folder, the
  same K adapter folders), all N mixed requests in one left-padded batch, `generate(adapter_names=...)` (PEFT's
  mixed-adapter batch: one sub-batch per adapter in each LoRA layer); static batching, so every request's latency
  is the whole batch's. Skipped with --no-peft or when peft / transformers are missing.
Tokens/s counts generated tokens (usage.completion_tokens) over the wall time of the whole set; p50/p99 are
per-request latencies. Rounds interleave the modes (each round starts with the next one); ratios come from the same run (the median round).

    flock /tmp/lorart-heavy.lock python bench/serve.py [--requests 16] [--adapters 8] [--max-tokens 32]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import lorart
from lorart.data import default_dataset_paths
from lorart.models import generate, load_model


def make_adapters(model_name: str, k: int, out: str) -> list[str]:
    paths = []
    for i in range(k):
        m, _ = load_model(model_name)
        lorart.inject(m, targets=["q_proj", "k_proj", "v_proj", "o_proj"], r=16, alpha=32, dropout=0.0)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        paths.append(lorart.save_adapter(m, os.path.join(out, f"a{i}")))
        del m
    return paths


def prompts(n: int) -> list[str]:
    out = []
    with open(default_dataset_paths()["heldout"], encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["messages"][0]["content"])
    return [out[i % len(out)] for i in range(n)]


def start_server(args, paths) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "lorart", "serve", "--model", args.model, "--port", "0",
           "--max-adapters", str(len(paths)), "--max-batch", str(max(args.requests, 1)),
           "--max-queued", str(4 * args.requests)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    for i, p in enumerate(paths):
        cmd += ["--adapter", f"a{i}={p}"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if " on http://" not in line:
        proc.kill()
        raise SystemExit(f"lorart serve did not start: {line}{proc.stderr.read()}")
    return proc, line.strip().rsplit(" ", 1)[-1]


async def run_http(url: str, jobs: list[tuple[str, str]], max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(jobs) + 4)) as client:
        async def one(model, prompt):
            t = time.perf_counter()
            r = await client.post(url + "/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0})
            r.raise_for_status()
            return time.perf_counter() - t, r.json()["usage"]["completion_tokens"], \
                r.json()["choices"][0]["message"]["content"]

        t0 = time.perf_counter()
        res = await asyncio.gather(*[one(m, p) for m, p in jobs])
        wall = time.perf_counter() - t0
    return summary(wall, [r[0] for r in res], sum(r[1] for r in res), [r[2] for r in res])


def run_naive(model, tok, jobs, max_tokens: int) -> dict:
    lat, tokens, texts = [], 0, []
    t0 = time.perf_counter()
    with torch.no_grad():
        for name, prompt in jobs:
            lorart.set_adapter(model, name)
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=True)
            out = generate(model, [ids], max_new_tokens=max_tokens, eos_token_id=tok.eos_ids or None,
                           pad_token_id=tok.pad_id)
            new = out[0, len(ids):].tolist()
            tokens += len(new)
            texts.append(tok.decode(new, skip_special_tokens=True))
            lat.append(time.perf_counter() - t0)  # every request arrived at t0
    return summary(time.perf_counter() - t0, lat, tokens, texts)


def load_peft(hf_dir: str, paths: list[str]):
    """transformers' Llama on the HF folder with the K adapters loaded as a0..a{K-1}, or None without peft."""
    try:
        import peft
        import transformers
    except ImportError:
        return None
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa",
                                                           dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, paths[0], adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        pm.load_adapter(p, adapter_name=f"a{i}")
    return pm.eval()


def run_peft(pm, tok, jobs, max_tokens: int) -> dict:
    rows = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            for _, p in jobs]
    width, pad = max(map(len, rows)), tok.pad_id if tok.pad_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    eos = list(tok.eos_ids or [])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = pm.generate(input_ids=ids, attention_mask=mask, adapter_names=[m for m, _ in jobs], do_sample=False,
                          max_new_tokens=max_tokens, eos_token_id=eos or None, pad_token_id=pad)
    wall = time.perf_counter() - t0
    tokens, texts = 0, []
    for row in out[:, width:].tolist():
        n = next((i for i, t in enumerate(row) if t in eos), len(row))
        tokens += n
        texts.append(tok.decode(row[:n], skip_special_tokens=True))
    return summary(wall, [wall] * len(jobs), tokens, texts)


def summary(wall, lat, tokens, texts) -> dict:
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "p50_s": statistics.median(lat),
            "p99_s": q[98], "texts": texts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads for the server and the naive loop")
    ap.add_argument("--no-peft", action="store_true", help="skip the transformers + PEFT peer")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        lorart.set_num_threads(args.threads)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(args.model, args.adapters, tmp)
        ps = prompts(args.requests)
        mixed = [(f"a{i % args.adapters}", p) for i, p in enumerate(ps)]
        single = [("a0", p) for p in ps]
        model, tok = load_model(args.model)
        for i, p in enumerate(paths):
            lorart.load_adapter(model, p, name=f"a{i}")
        model.eval()
        pm = None
        if not args.no_peft:
            from lorart.models import save_hf_folder
            hf_dir = os.path.join(tmp, "hf")
            save_hf_folder(load_model(args.model)[0], hf_dir, tok)
            pm = load_peft(hf_dir, paths)
        proc, url = start_server(args, paths)
        try:
            asyncio.run(run_http(url, mixed[:2], 4))  # warm-up
            rounds = []
            for r in range(args.rounds):
                modes = {"mixed": lambda: asyncio.run(run_http(url, mixed, args.max_tokens)),
                         "single": lambda: asyncio.run(run_http(url, single, args.max_tokens)),
                         "naive": lambda: run_naive(model, tok, mixed, args.max_tokens)}
                if pm is not None:
                    modes["peft"] = lambda: run_peft(pm, tok, mixed, args.max_tokens)
                order = list(modes)[r % len(modes):] + list(modes)[:r % len(modes)]  # no mode always first
                res = {k: modes[k]() for k in order}
                res = {k: res[k] for k in modes}
                rounds.append(res)
                print(f"round {r + 1}: " + "  ".join(f"{k} {v['tok_s']:.1f} tok/s" for k, v in res.items()),
                      flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    same = all(r["mixed"]["texts"] == r["naive"]["texts"] for r in rounds)
    ratio_single = statistics.median(r["mixed"]["tok_s"] / r["single"]["tok_s"] for r in rounds)
    ratio_naive = statistics.median(r["mixed"]["tok_s"] / r["naive"]["tok_s"] for r in rounds)
    best = sorted(rounds, key=lambda r: r["mixed"]["tok_s"] / r["naive"]["tok_s"])[len(rounds) // 2]
    load1 = os.getloadavg()
    print(f"\n# lorart serve: {args.requests} concurrent chat requests, {args.adapters} adapters (r 16, q/k/v/o), "
          f"max_tokens {args.max_tokens}, greedy; torch threads {torch.get_num_threads()}; "
          f"load average {load0[0]:.2f} -> {load1[0]:.2f}")
    print(f"{'mode':<8}{'tok/s':>9}{'tokens':>8}{'wall s':>9}{'p50 s':>8}{'p99 s':>8}")
    for k in [k for k in ("mixed", "single", "naive", "peft") if k in best]:
        v = best[k]
        print(f"{k:<8}{v['tok_s']:>9.1f}{v['tokens']:>8d}{v['wall_s']:>9.2f}{v['p50_s']:>8.2f}{v['p99_s']:>8.2f}")
    print(f"mixed / single throughput: {ratio_single:.2f}x (goal >= 0.75x); mixed / naive: {ratio_naive:.2f}x "
          f"(goal >= 3x); median over {len(rounds)} rounds")
    print(f"mixed-batch answers identical to the one-at-a-time loop: {same}")
    ratio_peft = None
    if "peft" in rounds[0]:
        ratio_peft = statistics.median(r["mixed"]["tok_s"] / r["peft"]["tok_s"] for r in rounds)
        agree = sum(a == b for a, b in zip(rounds[0]["mixed"]["texts"], rounds[0]["peft"]["texts"]))
        print(f"mixed / transformers + PEFT mixed batch: {ratio_peft:.2f}x; answers equal to PEFT's: "
              f"{agree}/{len(mixed)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rounds": [{k: {kk: vv for kk, vv in v.items() if kk != "texts"}
                                                      for k, v in r.items()} for r in rounds],
                       "ratio_single": ratio_single, "ratio_naive": ratio_naive, "ratio_peft": ratio_peft,
                       "identical": same,
                       "loadavg": [load0, load1]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
