"""`lorart plan`: the command line of lorart.plan / lorart.plan_methods."""
from __future__ import annotations

import argparse
import json


def _key_value(s: str):
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except ValueError:
        return k.strip(), v


def _targets(s: str):
    if s == "all-linear" or any(c in s for c in "^$*+?[]()\\|"):
        return s
    return tuple(t.strip() for t in s.split(",") if t.strip())


def add_subcommand(sub) -> None:
    from . import METHOD_NAMES, bundled_configs
    c = sub.add_parser("plan", help="predict memory (by part), trainable parameters, artifact size and time per step "
                                    "of a run before running it, from a config alone; --memory: does it fit")
    c.add_argument("--model", help=f"bundled config ({', '.join(bundled_configs())}), a config.json, an HF folder, a "
                                   ".gguf, or default (the embedded SmolLM2-135M)")
    c.add_argument("--method", help=f"one of {', '.join(METHOD_NAMES)} (default: every method, one line each)")
    c.add_argument("--method-option", dest="method_options", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="a method's own option, as lorart train's (repeatable; needs --method; default: none)")
    c.add_argument("--batch-size", type=int, help="micro-batch size (default: lorart train's, 8)")
    c.add_argument("--max-seq-len", type=int, help="tokens per example, the activations' length (default: 512)")
    c.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: 1)")
    c.add_argument("--r", type=int, help="adapter rank (default: 16)")
    c.add_argument("--alpha", type=float, help="LoRA alpha (default: 32)")
    c.add_argument("--targets", type=_targets, help="comma-separated module names, a regex or all-linear "
                                                    "(default: lorart train's q/k/v/o projections)")
    c.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute each decoder layer's activations in backward (default: off)")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights and compute dtype (default: bfloat16 on cuda, float32 on cpu, as lorart train)")
    c.add_argument("--device", default="auto", help="auto (this machine) | cpu | cuda: the device the plan is for (default: auto)")
    c.add_argument("--optimizer-state-bits", type=int, choices=[32, 8], default=32,
                   help="AdamW states: 32-bit (lorart train) or 8-bit (lorart.optim.PagedAdamW(state_bits=8)); "
                        "default: 32")
    c.add_argument("--paged", action="store_true", help="optimizer states paged to pinned host memory (CUDA)")
    c.add_argument("--fsdp", type=int, default=1, help="ranks to shard over, as `lorart train --fsdp` under torchrun "
                                                       "(FSDP2, full sharding): textbook arithmetic, labelled so "
                                                       "(default: 1, no sharding)")
    c.add_argument("--memory", help="memory of the device, e.g. 24GB (GB = GiB, as GPUs are labelled): fit advice "
                                  "(default: none, no fit advice)")
    c.add_argument("--gemm-tflops", type=float, help="GEMM rate to assume instead of measuring this device "
                                                                 "(default: measured)")
    c.add_argument("--json", action="store_true", help="print the plan(s) as JSON")
    c.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from . import METHOD_NAMES, plan, summary_table
    from .spec import PlanError
    keys = ("batch_size", "max_seq_len", "grad_accum", "r", "alpha", "targets", "gradient_checkpointing", "dtype")
    opts = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.method_options:
        opts["method_options"] = dict(args.method_options)
    opts.update(device=args.device, optimizer_state_bits=args.optimizer_state_bits, paged=args.paged,
                fsdp=args.fsdp, memory=args.memory, gemm_tflops=args.gemm_tflops)
    if args.method is not None and args.method not in METHOD_NAMES:
        raise PlanError(f"lorart.plan: argument `--method`: expected one of {', '.join(METHOD_NAMES)}, got "
                        f"{args.method!r}")
    if args.method_options and args.method is None:
        raise PlanError("lorart.plan: argument `--method-option`: needs --method (the options are one method's)")
    methods = [args.method] if args.method else list(METHOD_NAMES)
    plans = [plan(args.model, m, **opts) for m in methods]
    if args.json:
        print(json.dumps([p.to_dict() for p in plans] if len(plans) > 1 else plans[0].to_dict(), indent=2,
                         default=str))
    elif len(plans) == 1:
        print(plans[0].table())
    else:
        print(summary_table(plans))
        for p in plans:
            if p.fit and not p.fit["fits"]:
                print(f"  {p.method}: " + p.fit["advice"][-1])
        t = plans[0].time
        print(f"  step s: a GEMM-bound lower bound ({t['source']})" if t.get("step_s") is not None
              else f"  step s: {t['source']}")
        print("  details of one method: lorart plan --method NAME ...")
    return 0
