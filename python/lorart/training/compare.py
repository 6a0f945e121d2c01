"""`lorart.compare` / `lorart compare`: train several methods with the same data, steps and seed and tabulate
trainable parameters, memory, speed, artifact size, inference overhead, held-out loss, task accuracy and
forgetting (general-text perplexity before/after). Each method runs in its own process (its peak memory is its
own). Writes comparison.md, comparison.csv, comparison.json and comparison.png (matplotlib) to output_dir."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

from .._atomic import strict_json
from ..methods import METHODS, MethodError
from .compare_report import write_reports
from .options import OptionError, TrainOptions
from .reporting import check_installed

# each method's learning rate in the range the literature uses, scaled for a few dozen steps (Method.default_lr)
DEFAULT_LR = {name: cls.default_lr for name, cls in METHODS.items()}
DEFAULTS = {"max_steps": 20, "batch_size": 4, "max_seq_len": 96, "num_samples": 16, "seed": 0}


def _parse_methods(methods) -> list[str]:
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(methods)
    if not methods:
        raise MethodError("lorart.compare: argument `methods`: expected at least one method")
    for m in methods:
        if m not in METHODS:
            raise MethodError(f"lorart.compare: argument `methods`: {m!r} is not one of {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise MethodError(f"lorart.compare: argument `methods`: {methods} names a method twice")
    return methods


def compare(methods: Sequence[str] | str = tuple(METHODS), model: Optional[str] = None, data: Optional[str] = None,
            eval_data: Optional[str] = None, output_dir: str = "lorart-compare", max_steps: int = 20,
            batch_size: int = 4, max_seq_len: int = 96, seed: int = 0, num_samples: int = 16,
            lr: Optional[dict | float] = None, method_options: Optional[dict] = None, device: str = "auto",
            general: bool = True, progress: bool = True, report_to="none") -> dict:
    """Train each method (same data, steps, batch and seed; each with its own learning rate, DEFAULT_LR unless
    `lr` gives one for all or a {method: lr} dict) and write the comparison. Returns {"rows", "paths"}.
    `report_to` as lorart.train's: each method is a run of the trackers (TensorBoard: OUTPUT_DIR/runs/METHOD/
    tensorboard, so `tensorboard --logdir OUTPUT_DIR/runs` shows them side by side)."""
    methods = _parse_methods(methods)
    try:
        trackers = TrainOptions(report_to=report_to).trackers()
    except OptionError as e:
        raise MethodError(f"lorart.compare: argument `report_to`: {e.detail}") from None
    check_installed(trackers)   # a missing tracker package fails here, not in the first method's process
    for name, v in (("max_steps", max_steps), ("batch_size", batch_size), ("max_seq_len", max_seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MethodError(f"lorart.compare: argument `{name}`: expected an int >= 1, got {v!r}")
    lrs = dict(DEFAULT_LR)
    if isinstance(lr, (int, float)):
        lrs = {m: float(lr) for m in METHODS}
    elif isinstance(lr, dict):
        lrs.update(lr)
    elif lr is not None:
        raise MethodError(f"lorart.compare: argument `lr`: expected a number or a {{method: lr}} dict, got {lr!r}")
    out = os.path.abspath(output_dir)
    os.makedirs(out, exist_ok=True)
    rows = []
    # the evaluation before training is the base model's for methods that start as the base: run it once
    first_identity = next((m for m in methods if METHODS[m].starts_as_base), None)
    for i, m in enumerate(methods):
        spec = {"method": m, "model": model, "data": data, "eval_data": eval_data, "max_steps": max_steps,
                "batch_size": batch_size, "max_seq_len": max_seq_len, "seed": seed, "num_samples": num_samples,
                "lr": lrs[m], "method_options": (method_options or {}).get(m), "device": device,
                "general": general, "output_dir": os.path.join(out, "runs", m), "eval_before": m == first_identity,
                "report_to": list(trackers)}
        if progress:
            print(f"[{i + 1}/{len(methods)}] {m}: training {max_steps} steps (lr {lrs[m]:g}) ...", file=sys.stderr,
                  flush=True)
        t0 = time.perf_counter()
        rows.append(_run_worker(spec, out))
        rows[-1]["wall_s"] = time.perf_counter() - t0
        if progress:
            r = rows[-1]
            loss = r["after"]["eval_loss"]
            loss = "-" if loss is None else f"{loss:.3f}"
            print(f"    held-out loss after {loss}, {r['step_time_s']:.2f} s/step, {r['wall_s']:.0f} s in all",
                  file=sys.stderr, flush=True)
    settings = {"methods": methods, "model": model or "default (SmolLM2-135M-Instruct)", "data": data or "default",
                "max_steps": max_steps, "batch_size": batch_size, "max_seq_len": max_seq_len, "seed": seed,
                "num_samples": num_samples, "lr": {m: lrs[m] for m in methods}}
    paths = write_reports(rows, settings, out)
    return {"rows": rows, "paths": paths, "settings": settings}


def _run_worker(spec: dict, out: str) -> dict:
    work = os.path.join(out, "runs")
    os.makedirs(work, exist_ok=True)
    spec_path = os.path.join(work, f"{spec['method']}.spec.json")
    res_path = os.path.join(work, f"{spec['method']}.result.json")
    with open(spec_path, "w") as f:
        f.write(strict_json(spec, indent=2))
    if os.path.exists(res_path):
        os.remove(res_path)
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-m", "lorart.training.compare_worker", spec_path, res_path], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not os.path.exists(res_path):
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise RuntimeError(f"lorart.compare: method {spec['method']!r} failed (exit {proc.returncode}):\n{tail}")
    with open(os.path.join(work, f"{spec['method']}.log"), "w") as f:
        f.write(proc.stdout)
    with open(res_path) as f:
        return json.load(f)


def add_subcommand(sub) -> None:
    c = sub.add_parser("compare", help="train several methods on the same data and compare them (table + chart)")
    c.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default {','.join(METHODS)})")
    c.add_argument("--model", help="HF model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    c.add_argument("--data", help="training data, as train's --data (default: the bundled answer-format set)")
    c.add_argument("--eval-data", help="held-out data, as train's --eval-data (default: the bundled held-out set with "
                                       "the default data)")
    c.add_argument("--output-dir", default="lorart-compare", help="where the table, chart and runs go (default "
                                                                  "%(default)s)")
    c.add_argument("--max-steps", type=int, default=DEFAULTS["max_steps"],
                   help="optimizer steps per method (default %(default)s)")
    c.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="examples per step (default "
                                                                                   "%(default)s)")
    c.add_argument("--max-seq-len", type=int, default=DEFAULTS["max_seq_len"],
                   help="tokens per example; longer ones are truncated (default %(default)s)")
    c.add_argument("--num-samples", type=int, default=DEFAULTS["num_samples"],
                   help="held-out prompts answered greedily for the task accuracy (default %(default)s)")
    c.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="the same seed for every method (default "
                                                                       "%(default)s)")
    c.add_argument("--lr", type=float, help="one learning rate for every method (default: per method, "
                                            + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    c.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    c.add_argument("--no-general", action="store_true", help="skip the general-text perplexity (forgetting) check")
    c.add_argument("--report-to", default="none", metavar="TRACKERS",
                   help="experiment trackers, as for train: each method is one run (default %(default)s)")
    c.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    res = compare(args.methods, model=args.model, data=args.data, eval_data=args.eval_data,
                  output_dir=args.output_dir, max_steps=args.max_steps, batch_size=args.batch_size,
                  max_seq_len=args.max_seq_len, seed=args.seed, num_samples=args.num_samples, lr=args.lr,
                  device=args.device, general=not args.no_general, report_to=args.report_to)
    with open(res["paths"]["markdown"]) as f:
        print(f.read())
    for k, p in res["paths"].items():
        print(f"{k}: {p}")
    return 0
