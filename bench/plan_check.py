"""`lorart plan` against `lorart train`: the predicted peak memory and time per step beside the measured ones
(summary.json's `memory` and `step_time`), for every method, with and without gradient checkpointing, each run
in its own process (RSS is per process).

    python bench/plan_check.py                              # SmolLM2-135M (the default), every method, both
    python bench/plan_check.py --tiny --steps 4             # a tiny random Llama (tests' tiny_folder)
    python bench/plan_check.py --methods lora,full --ckpt on --malloc both --json out.json

--malloc both runs each case twice: with LORART_MALLOC=return (a fixed mmap threshold: freed activations go
back to the OS; docs/plan.md) and as glibc is by default (its dynamic threshold), interleaved, so
their step times compare within one run. Data: examples of exactly --max-seq-len tokens (every step is the batch
the plan predicts for; --bundled-data: the bundled answer-format set instead), batch 8 x 160 unless given; no
evaluation before, no samples, no general-text check.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("full", "lora", "qlora", "adapter", "prefix", "prompt", "bitfit")


def one(spec: dict) -> dict:
    import lorart
    out = os.path.join(spec["tmp"], "run")
    data = eval_data = None      # the bundled set: examples of varied lengths (the plan is for the longest)
    if spec["fixed"]:            # every example longer than max_seq_len: each step is the batch the plan is for
        data = [{"text": " ".join(f"word {i} is number {i}" for i in range(600))}] * (4 * spec["batch_size"])
        eval_data = data[:1]
    lorart.train(spec["model"], data, eval_data=eval_data, output_dir=out, overwrite=True, method=spec["method"],
                 max_steps=spec["steps"], batch_size=spec["batch_size"], max_seq_len=spec["max_seq_len"], lr=1e-4,
                 gradient_checkpointing=spec["ckpt"], eval_before=False, num_samples=0, general_data=False,
                 eval_every=10**6, save_every=10**6, progress=False, device="cpu")
    s = json.load(open(os.path.join(out, "summary.json")))
    m, t = s["memory"], s.get("step_time", {})
    return {"method": spec["method"], "ckpt": spec["ckpt"], "malloc": spec["malloc"],
            "predicted_mib": m["predicted_peak_bytes"] / 2**20, "measured_mib": m["measured_peak_bytes"] / 2**20,
            "error": m["prediction_error"], "framework_mib": m.get("framework_bytes", 0) / 2**20,
            "phase": m.get("predicted_phase"), "batch": m.get("predicted_batch"),
            "parts_mib": {k: v / 2**20 for k, v in (m.get("predicted_parts") or {}).items()},
            "predicted_step_s": t.get("predicted_step_s"), "measured_step_s": t.get("measured_step_s"),
            "mean_step_s": t.get("measured_mean_step_s"), "step_ratio": t.get("ratio")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama folder (tests/train_helpers)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ckpt", choices=["off", "on", "both"], default="both")
    ap.add_argument("--malloc", choices=["fixed", "default", "both"], default="fixed")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=160)
    ap.add_argument("--bundled-data", action="store_true",
                    help="the bundled set (varied lengths) instead of examples of exactly --max-seq-len tokens")
    ap.add_argument("--json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(json.loads(a.one))))
        return
    tmp = tempfile.mkdtemp(prefix="plan_check_")
    model = a.model
    if a.tiny:
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from train_helpers import tiny_folder
        model = tiny_folder(os.path.join(tmp, "tiny"))
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[a.ckpt]
    mallocs = {"fixed": ["fixed"], "default": ["default"], "both": ["fixed", "default"]}[a.malloc]
    rows = []
    print(f"{'method':8s} {'ckpt':5s} {'malloc':7s} {'pred MiB':>9s} {'meas MiB':>9s} {'err':>7s} {'fw MiB':>7s} "
          f"{'pred s':>7s} {'median s':>8s} {'mean s':>7s} {'ratio':>6s}", flush=True)
    for method in a.methods.split(","):
        for ckpt in ckpts:
            for mal in mallocs:
                spec = dict(model=model, method=method, ckpt=ckpt, malloc=mal, steps=a.steps, tmp=tmp,
                            batch_size=a.batch_size, max_seq_len=a.max_seq_len, fixed=not a.bundled_data)
                env = dict(os.environ, LORART_MALLOC="return" if mal == "fixed" else "default")
                r = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env,
                                   capture_output=True, text=True)
                line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
                if r.returncode or line is None:
                    print(f"{method} ckpt={ckpt} {mal}: failed\n{r.stderr[-2000:]}", flush=True)
                    continue
                d = json.loads(line[7:])
                rows.append(d)
                f = lambda v, fmt: format(v, fmt) if v is not None else "-"   # noqa: E731
                print(f"{method:8s} {str(ckpt):5s} {mal:7s} {d['predicted_mib']:9,.0f} {d['measured_mib']:9,.0f} "
                      f"{100 * d['error']:+6.1f}% {d['framework_mib']:7,.0f} {f(d['predicted_step_s'], '7.3f')} "
                      f"{f(d['measured_step_s'], '8.3f')} {f(d['mean_step_s'], '7.3f')} {f(d['step_ratio'], '6.2f')}",
                      flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
