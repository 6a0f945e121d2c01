"""Data-parallel scaling of `lorart train` under torchrun: the same global batch on 1 and N processes (gloo on CPUs,
NCCL on GPUs), in interleaved rounds, and the gradient bytes all-reduced per step against what DDP over the
trainable parameters alone should cost (their count x 4 bytes: fp32 gradients).

    python bench/distributed.py --quick                      # tiny random Llama, CPU, 1 vs 2 processes
    python bench/distributed.py --model ./SmolLM2 --device cuda --nproc 8 --method qlora --steps 20 [--fsdp]

Scaling efficiency = tokens/s on N processes / (N x tokens/s on 1); on CPUs each process runs one thread, so N
processes use N cores. A tiny model on gloo measures the fixed costs (Python, collectives) more than the math;
the number that matters is on GPUs with a real model.
FSDP2's traffic is not measured here: per step each rank all-gathers every sharded layer twice (forward and
backward: 2 x (N-1)/N x the parameter bytes) and reduce-scatters the trainable gradients once.
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
    if not args.fsdp:
        got = s["distributed"]["allreduce_bytes"] / max(steps, 1)
        print(f"  all-reduced per step and rank: {got / 1e6:.3f} MB; DDP over the {trainable:,} trainable "
              f"parameters should cost {trainable * 4 / 1e6:.3f} MB (ratio {got / max(trainable * 4, 1):.3f})")


if __name__ == "__main__":
    main()
