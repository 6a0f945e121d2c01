"""Whole training steps, side by side: lorart (its own Llama + lorart.inject) against transformers + PEFT
(LoRA) and transformers + bitsandbytes + PEFT (QLoRA), on the same weights, batch, sequence length,
precision and optimizer (torch AdamW), each configuration in its own process, rounds interleaved.

    python bench/train.py --device cpu                       # SmolLM2-135M (the converted default), 8 x 128
    python bench/train.py --device cuda --layers 8           # 7B-class shapes, random weights (no hub needed)
    python bench/train.py --stacks lorart,peft --precision fp32 --method lora --rounds 3 --json out.json
    python bench/train.py --baseline /tmp/old/python       # also lorart from another tree ("lorart-base"), e.g.
                                                           # a checkout of main, for before/after in one run

Per configuration: s/step (median of the timed steps, best of the rounds), tokens/s, peak memory (CPU: the
process's peak RSS, loading included, and the peak of the training steps alone; CUDA: max_memory_allocated),
and the loss of the first and the last step. All stacks start from identical LoRA weights (A drawn per layer
name from one seed, B = 0) and train on one fixed random batch, so their losses must agree (first step within
`--loss-rtol`, last step within 10x that: dropout masks differ between stacks); where they do not, the
comparison is void and the table says so. Peers that cannot be imported are skipped, and the table says which.
bf16 on the CPU is `torch.autocast("cpu", bfloat16)` over float32 weights; it is skipped by default on CPUs
without native bf16 (torch emulates it there, orders of magnitude slower): `--precision bf16` forces it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = {"lora": "peft", "qlora": "bnb"}
# hf+lorart: transformers' Llama + lorart.inject (LoRA only)
NEEDS = {"lorart": [], "lorart-base": [], "hf+lorart": ["transformers"], "peft": ["transformers", "peft"],
         "bnb": ["transformers", "peft", "bitsandbytes"]}
# the model of the CUDA run: Llama-2-7B shapes (layers set by --layers), random weights
LLAMA7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
           "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "vocab_size": 512}  # --tiny: a smoke run of the whole benchmark in seconds


# ---- one configuration (runs in its own process) ---------------------------------------------------------------

def _rss_peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_rss_peak() -> bool:
    """Resets the kernel's peak-RSS counter of this process (Linux: clear_refs 5), so that the training
    steps' peak can be read apart from the loading's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _lora_key(name: str) -> str | None:
    """'...layers.3.self_attn.q_proj.lora_A.default.weight' -> 'layers.3.self_attn.q_proj' (both stacks)."""
    if ".lora_A." not in name or "layers." not in name:
        return None
    return name[name.index("layers."):name.index(".lora_A.")]


def same_lora_init(model, seed: int) -> int:
    """A of every LoRA layer drawn from a generator seeded by its layer name (kaiming-uniform bound
    1/sqrt(in), PEFT's and lorart's init), B = 0: identical starting adapters in every stack."""
    import torch

    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = _lora_key(name)
            if key is not None:
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
                bound = 1.0 / p.shape[1] ** 0.5
                p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float32) * 2 - 1) * bound)
                n += 1
            elif ".lora_B." in name:
                p.zero_()
    return n


def _build(cfg: dict):
    """(model, forward(ids) -> loss) of one stack."""
    import torch

    dev = torch.device(cfg["device"])
    load_dtype = torch.bfloat16 if cfg["device"] == "cuda" and cfg["precision"] == "bf16" else torch.float32
    targets = cfg["targets"].split(",")
    qlora = cfg["method"] == "qlora"
    if cfg["stack"] in ("lorart", "lorart-base"):
        import lorart
        from lorart.models import load_hf_folder
        from lorart.nn import NF4Linear

        factory = (lambda name, lin: NF4Linear.from_linear(lin, compute_dtype=load_dtype)) if qlora else None
        model, _ = load_hf_folder(cfg["folder"], dtype=load_dtype, device=dev, linear_factory=factory)
        lorart.inject(model, targets=targets, r=cfg["r"], alpha=cfg["alpha"], dropout=cfg["dropout"])

        def loss_of(ids):
            return model(input_ids=ids, labels=ids, return_logits=False).loss
    else:
        import transformers

        kw = {"attn_implementation": "sdpa", "dtype": load_dtype}
        if cfg["stack"] == "bnb":
            kw["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16 if cfg["precision"] == "bf16" else torch.float32)
            kw["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
        model = transformers.LlamaForCausalLM.from_pretrained(cfg["folder"], **kw)
        if cfg["stack"] != "bnb":
            model.to(dev)
        if cfg["stack"] == "hf+lorart":
            import lorart

            lorart.inject(model, targets=targets, r=cfg["r"], alpha=cfg["alpha"], dropout=cfg["dropout"])
        else:
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(
                r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"], target_modules=targets,
                task_type="CAUSAL_LM"))

        def loss_of(ids):
            return model(input_ids=ids, labels=ids).loss
    for p in model.parameters():  # fp32 master LoRA weights in every stack
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    model.train()
    return model, loss_of


def worker(cfg: dict) -> dict:
    import torch

    torch.manual_seed(cfg["seed"])
    if cfg["device"] == "cpu":
        torch.set_num_threads(cfg["threads"])
    t0 = time.perf_counter()
    model, loss_of = _build(cfg)
    if cfg["stack"] in ("lorart", "lorart-base", "hf+lorart"):
        import lorart

        lorart._C.set_num_threads(cfg["threads"])
    n_lora = same_lora_init(model, cfg["seed"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    dev = torch.device(cfg["device"])
    g = torch.Generator().manual_seed(cfg["seed"])
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (cfg["batch"], cfg["seq"]), generator=g).to(dev)
    use_ac = cfg["precision"] == "bf16"
    load_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rss_load = _rss_peak_bytes() if dev.type == "cpu" else None
    reset_ok = dev.type == "cpu" and _reset_rss_peak()
    losses, times = [], []
    for _ in range(cfg["warmup"] + cfg["steps"]):
        sync()
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_ac):
            loss = loss_of(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    out = {"load_s": load_s, "step_s": times, "losses": losses, "lora_layers": n_lora,
           "trainable": sum(p.numel() for p in params)}
    if dev.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        out["peak_bytes"] = _rss_peak_bytes()
        out["load_peak_bytes"] = rss_load
        out["train_peak_bytes"] = _rss_peak_bytes() if reset_ok else None
    return out


# ---- the driver -------------------------------------------------------------------------------------------------

def random_llama_folder(root: str, layers: int, seed: int, tiny: bool = False) -> str:
    """An HF folder with 7B-class shapes (or TINY ones) and random bf16 weights (N(0, 0.02), norms 1),
    written once."""
    import torch
    from safetensors.torch import save_file

    folder = os.path.join(root, f"llama{'-tiny' if tiny else '7b-shapes'}-{layers}l-seed{seed}")
    if os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
        return folder
    tmp = folder + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    c = dict(LLAMA7B, num_hidden_layers=layers, **(TINY if tiny else {}))
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    g = torch.Generator().manual_seed(seed)
    weight_map, shard, nshard = {}, {}, 0

    def flush():
        nonlocal shard, nshard
        if shard:
            name = f"model-{nshard:05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, nshard = {}, nshard + 1

    for k, shp in shapes.items():
        t = torch.ones(shp) if len(shp) == 1 else torch.randn(shp, generator=g) * 0.02
        shard[k] = t.to(torch.bfloat16)
        if sum(x.numel() for x in shard.values()) > 1 << 30:
            flush()
    flush()
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(c, f, indent=1)
    try:
        os.replace(tmp, folder)
    except OSError:  # another run wrote it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def default_folder() -> str:
    """The converted SmolLM2-135M-Instruct folder (converted and cached by lorart on first use)."""
    from lorart.models import hub, load_model

    path = hub.default_model_path()
    import torch

    folder = hub._gguf_cache_folder(path, torch.float32, hub.cache_dir())
    if not os.path.exists(os.path.join(folder, "config.json")):
        load_model(None, dtype=torch.float32)  # converts and caches
    return folder


def run_config(cfg: dict, timeout: int) -> dict:
    import lorart

    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]))
    # the lorart this process uses, or the baseline's folder for the "lorart-base" stack
    where = cfg.get("pythonpath") or os.path.dirname(os.path.dirname(os.path.abspath(lorart.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [where, env.get("PYTHONPATH")] if p)
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    line = next((ln for ln in reversed(r.stdout.splitlines()) if ln.startswith("{")), None)
    if r.returncode != 0 or line is None:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {r.returncode}: " + " | ".join(tail)}
    return json.loads(line)


def summarize(cfg: dict, results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {**cfg, "error": results[-1]["error"]}
    meds = [statistics.median(r["step_s"][cfg["warmup"]:]) for r in ok]
    best = ok[meds.index(min(meds))]
    s = min(meds)
    out = {**cfg, "s_per_step": s, "tok_per_s": cfg["batch"] * cfg["seq"] / s, "rounds": len(ok),
           "round_s": meds, "first_loss": best["losses"][0], "last_loss": best["losses"][-1],
           "peak_bytes": max(r["peak_bytes"] for r in ok), "trainable": best["trainable"]}
    if cfg["device"] == "cpu":
        tp = [r["train_peak_bytes"] for r in ok if r.get("train_peak_bytes")]
        out["train_peak_bytes"] = max(tp) if tp else None
    return out


def check_losses(rows: list[dict], rtol_of: dict) -> None:
    """Marks each row with `loss_ok` against the peer (or the first stack) of its method and precision."""
    groups = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["method"], r["precision"]), []).append(r)
    for (method, prec), rs in groups.items():
        ref = next((r for r in rs if r["stack"] == PEER[method]), rs[0])
        rtol = rtol_of[prec]
        for r in rs:
            d0 = abs(r["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"])
            d1 = abs(r["last_loss"] - ref["last_loss"]) / abs(ref["last_loss"])
            r["loss_ok"] = d0 <= rtol and d1 <= 10 * rtol
            r["loss_ref"] = ref["stack"]
            r["loss_dev"] = (d0, d1)


def print_table(rows: list[dict], skipped: list[str], header: str) -> None:
    print(header)
    print(f"{'method':<6} {'prec':<5} {'stack':<11} {'s/step':>7} {'tok/s':>7} {'peak GB':>8} {'train GB':>8} "
          f"{'loss first':>10} {'last':>8}  {'x time':>6} {'x mem':>6}  note")
    peers = {(r["method"], r["precision"]): r for r in rows if r["stack"] == PEER[r["method"]] and "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<6} {r['precision']:<5} {r['stack']:<11} failed: {r['error'][:150]}")
            continue
        p = peers.get((r["method"], r["precision"]))
        xt = f"{r['s_per_step'] / p['s_per_step']:.2f}" if p and p is not r else "-"
        xm = f"{r['peak_bytes'] / p['peak_bytes']:.2f}" if p and p is not r else "-"
        tp = r.get("train_peak_bytes")
        note = "" if r.get("loss_ok", True) else (
            f"VOID: loss differs from {r['loss_ref']} by {r['loss_dev'][0]:.1e} (first) / {r['loss_dev'][1]:.1e} (last)")
        print(f"{r['method']:<6} {r['precision']:<5} {r['stack']:<11} {r['s_per_step']:>7.3f} {r['tok_per_s']:>7.0f} "
              f"{r['peak_bytes'] / 1e9:>8.2f} {tp / 1e9 if tp else float('nan'):>8.2f} {r['first_loss']:>10.4f} "
              f"{r['last_loss']:>8.4f}  {xt:>6} {xm:>6}  {note}")
    for s in skipped:
        print(f"skipped: {s}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--stacks", default="lorart,peft,bnb", help="of lorart, peft, bnb, hf+lorart")
    ap.add_argument("--baseline", help="a folder on which another lorart is importable (e.g. a checkout's python/ "
                    "with its built _C): adds the stack lorart-base, run like lorart")
    ap.add_argument("--method", default="lora,qlora", help="lora, qlora or both")
    ap.add_argument("--precision", default=None, help="fp32, bf16 or both (default: both where bf16 is native)")
    ap.add_argument("--model", default=None, help="HF folder (default: SmolLM2 on cpu, random 7B shapes on cuda)")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the random 7B-shaped model (cuda)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama (smoke run of the benchmark)")
    ap.add_argument("--batch", type=int, default=None, help="default 8 on cpu, 4 on cuda")
    ap.add_argument("--seq", type=int, default=None, help="default 128 on cpu, 512 on cuda")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (best of them is reported)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch and lorart)")
    ap.add_argument("--loss-rtol", type=float, default=None, help="first-step loss tolerance (default 2e-4 fp32, "
                    "2e-2 bf16); the last step's is 10x")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per process")
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "lorart-bench-train"))
    ap.add_argument("--json", help="write the rows to this path")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sys.path.insert(0, HERE)
    if importlib.util.find_spec("lorart") is None:  # not installed: the source tree (with a build in place)
        sys.path.insert(0, os.path.join(HERE, "..", "python"))
    from _timing import machine_load

    from lorart.sysinfo import cpu_info

    cuda = args.device == "cuda"
    if args.model:
        folder = args.model
    elif args.tiny or cuda:
        folder = random_llama_folder(args.workdir, 2 if args.tiny else args.layers, 0, tiny=args.tiny)
    else:
        folder = default_folder()
    if args.precision:
        precisions = args.precision.split(",")
    else:
        precisions = ["bf16"] if cuda else ["fp32"] + (["bf16"] if cpu_info()["native_bf16"] else [])
    skipped = [] if args.precision or cuda or "bf16" in precisions else [
        "bf16 (this CPU has no native bf16: torch emulates it; --precision bf16 forces it)"]
    stacks = args.stacks.split(",")
    if args.baseline:
        if not os.path.isdir(os.path.join(args.baseline, "lorart")):
            ap.error(f"--baseline {args.baseline}: no lorart package in that folder")
        stacks.insert(stacks.index("lorart") + 1 if "lorart" in stacks else 0, "lorart-base")
    configs = []
    for method in args.method.split(","):
        for prec in precisions:
            for stack in stacks:
                if stack == "bnb" and method != "qlora" or stack in ("peft", "hf+lorart") and method != "lora":
                    continue
                missing = [m for m in NEEDS[stack] if importlib.util.find_spec(m) is None]
                if missing:
                    skipped.append(f"{stack} {method} {prec}: {', '.join(missing)} not installed")
                    continue
                configs.append({"stack": stack, "method": method, "precision": prec, "device": args.device,
                                "folder": folder, "batch": args.batch or (4 if cuda else 8),
                                "seq": args.seq or (512 if cuda else 128), "steps": args.steps,
                                "warmup": args.warmup, "r": args.r, "alpha": args.alpha, "dropout": args.dropout,
                                "targets": args.targets, "lr": args.lr, "threads": args.threads, "seed": 0,
                                **({"pythonpath": os.path.abspath(args.baseline)} if stack == "lorart-base" else {})})
    load0 = machine_load()
    results = {i: [] for i in range(len(configs))}
    for rnd in range(args.rounds):
        for i, cfg in enumerate(configs):
            r = run_config(cfg, args.timeout)
            results[i].append(r)
            tag = r.get("error") or f"{statistics.median(r['step_s'][cfg['warmup']:]):.3f} s/step"
            print(f"# round {rnd + 1}: {cfg['method']} {cfg['precision']} {cfg['stack']}: {tag}", file=sys.stderr)
    rows = [summarize(cfg, results[i]) for i, cfg in enumerate(configs)]
    check_losses(rows, {"fp32": args.loss_rtol or 2e-4, "bf16": args.loss_rtol or 2e-2})
    import torch

    where = torch.cuda.get_device_name() if cuda else f"cpu, {args.threads} threads"
    b, t = (configs[0]["batch"], configs[0]["seq"]) if configs else (0, 0)
    header = (f"# bench/train.py on {where}: {os.path.basename(folder.rstrip('/'))}, batch {b} x {t}, LoRA r {args.r} "
              f"alpha {args.alpha:g} dropout {args.dropout} on {args.targets}, AdamW lr {args.lr}; {args.steps} timed "
              f"steps after {args.warmup}, best of {args.rounds} rounds; {load0} before, {machine_load()} after")
    print_table(rows, skipped, header)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows, "skipped": skipped}, f, indent=1)


if __name__ == "__main__":
    main()
