"""Data-parallel scaling of `lorart train` under torchrun: the same global batch on 1 and N processes (gloo on CPUs,
NCCL on GPUs), in interleaved rounds, and the bytes the training steps' collectives move, measured by the run
(summary.json's `distributed`), against what they should cost:
- DDP: the gradients all-reduced per step, against the trainable parameters alone (their count x 4 bytes: fp32);
- FSDP2 (--fsdp): per micro-batch every decoder layer's parameters are all-gathered twice (forward, and backward:
  they are resharded after forward) and the root's (embeddings, final norm, head) once (FSDP2 keeps the root
  unsharded from forward to backward), and the trainable gradients reduce-scattered once; all buffers padded to a
  multiple of N rows (the run's `fsdp_layout`). A ring moves (N-1)/N of each buffer per rank (all-reduce: twice).

    python bench/distributed.py --quick                      # tiny random Llama, CPU, 1 vs 2 processes
    python bench/distributed.py --model ./SmolLM2 --device cuda --nproc 8 --method qlora --steps 20 [--fsdp]

Scaling efficiency = tokens/s on N processes / (N x tokens/s on 1); on CPUs each process runs one thread, so N
processes use N cores. A tiny model on gloo measures the fixed costs (Python, collectives) more than the math;
the number that matters is on GPUs with a real model.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, args, out: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(_port()), "-m", "lorart", "train", "--model", args.model, "--data", args.data, "--output-dir", out,
           "--overwrite", "--method", args.method, "--max-steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--max-seq-len", str(args.max_seq_len), "--warmup", "0", "--eval-every",
           str(args.steps), "--save-every", str(args.steps), "--num-samples", "0", "--no-general", "--quiet",
           "--device", args.device] + (["--fsdp"] if args.fsdp else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"),
                                                        os.environ.get("PYTHONPATH", "")]))
    if args.device == "cpu":   # one core per process: N processes use N cores, as N GPUs would
        env["OMP_NUM_THREADS"] = "1"
    subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL if args.quiet_runs else None)
    return json.load(open(os.path.join(out, "summary.json")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="HF folder (default with --quick: a tiny random Llama)")
    ap.add_argument("--data", help="training data (default: the bundled set)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--quiet-runs", action="store_true", help="hide the runs' own output")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="lorart-bench-dist-")
    if args.data is None:
        import lorart
        args.data = lorart.data.default_dataset_paths()["train"]
    if args.model is None:
        if not args.quick:
            ap.error("--model is required without --quick")
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from train_helpers import tiny_folder
        args.model = tiny_folder(os.path.join(tmp, "model"))
    rows = {1: [], args.nproc: []}
    for r in range(args.rounds):   # interleaved: the machine's load hits both alike
        for n in rows:
            rows[n].append(run(n, args, os.path.join(tmp, f"n{n}-r{r}")))
    best = {n: max(s["tokens_per_s"] for s in rs) for n, rs in rows.items()}
    s = rows[args.nproc][-1]
    trainable = s["method"]["trainable_params"]
    steps = s["steps"]
    print(f"lorart train {args.method} on {args.device}, {steps} steps of batch {args.batch_size}, "
          f"{'FSDP2' if args.fsdp else 'DDP'}, torch {torch.__version__}")
    for n, tps in best.items():
        print(f"  {n} process(es): {tps:,.0f} tokens/s (best of {args.rounds})")
    print(f"  scaling efficiency at {args.nproc}: {best[args.nproc] / (args.nproc * best[1]):.2f}")
    d, n = s["distributed"], args.nproc
    per = max(d["counted_steps"], 1)
    ring = (n - 1) / n
    if not args.fsdp:
        got = d["allreduce_bytes"] / per
        print(f"  all-reduced per step and rank: {got / 1e6:.3f} MB of buffers, {2 * ring * got / 1e6:.3f} MB on the "
              "wire; DDP over "
              f"the {trainable:,} trainable parameters should cost {trainable * 4 / 1e6:.3f} MB "
              f"(ratio {got / max(trainable * 4, 1):.3f})")
        return
    lay, micro = d["fsdp_layout"], s["options"]["grad_accum"]
    want_ag = micro * (2 * lay["layer_param_bytes"] + lay["root_param_bytes"])
    want_rs = micro * lay["grad_bytes"]
    for what, key, want in (("all-gathered", "allgather_bytes", want_ag),
                            ("reduce-scattered", "reduce_scatter_bytes", want_rs)):
        got = d[key] / per
        print(f"  {what} per step and rank: {got / 1e6:.3f} MB of buffers, {ring * got / 1e6:.3f} MB on the wire; "
              f"expected {want / 1e6:.3f} MB (ratio {got / max(want, 1):.4f})")
    print(f"  expected: {micro} micro-batch(es) x (2 x {lay['layer_param_bytes'] / 1e6:.3f} MB of decoder layers + "
          f"{lay['root_param_bytes'] / 1e6:.3f} MB of root parameters) all-gathered, {micro} x "
          f"{lay['grad_bytes'] / 1e6:.3f} MB of gradients ({trainable:,} trainable parameters, padded) "
          "reduce-scattered")

if __name__ == "__main__":
    main()
