"""The `lorart` subcommands train / generate / chat / eval / export (`info` lives in __main__).

Every failure ends as one line on stderr:
- `lorart: error: ...` and exit code 2 for bad input or environment: options, missing or lying files, bad data,
  a full disk, a read-only or forbidden output folder, out of memory;
- `lorart: error: internal error: ...` and exit code 1 for a bug in lorart (report it).
`LORART_DEBUG=1` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

from .errors import InputError, write_error
from .training.distributed import DistributedError
from .training.options import OptionError, TrainOptions, parse_targets

# `lorart train` with neither --model nor --data: the embedded model on the bundled data, a few minutes on CPU
QUICK_DEFAULTS = {"max_steps": 30, "batch_size": 8, "max_seq_len": 160, "lr": 1e-3, "eval_every": 10,
                  "warmup": 3, "num_samples": 8, "sample_max_new_tokens": 24}


class UserError(InputError):
    """A mistake in the command line or the inputs: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with lorart's error style: one line `lorart: error: ...`, exit code 2."""

    def error(self, message: str):
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else None
        where = f"{sub}: " if sub else ""
        print(f"lorart: error: {where}{message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def int_at_least(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v
    parse.__name__ = f"int >= {lo}"
    return parse


def finite_float(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number: {s!r}") from None
        low_ok = lo is None or (v > lo if lo_open else v >= lo)
        if not math.isfinite(v) or not low_ok or (hi is not None and v > hi):
            rng = "" if lo is None and hi is None else (
                f" in {'(' if lo_open else '['}{lo:g}, {hi:g}]" if hi is not None else f" {'>' if lo_open else '>='} {lo:g}")
            raise argparse.ArgumentTypeError(f"expected a finite number{rng}, got {s!r}")
        return v
    parse.__name__ = "number"
    return parse


def regex(s: str) -> str:
    try:
        re.compile(s)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"invalid regular expression {s!r}: {e}") from None
    return s


def _warmup(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step count or a fraction of the steps, got {s!r}") from None
    return int(v) if v >= 1 and v.is_integer() else v


def _trackers(s: str) -> tuple:
    try:
        return TrainOptions(report_to=s).trackers()
    except OptionError as e:
        raise argparse.ArgumentTypeError(e.detail) from None


def _method_names():
    from .methods import METHODS
    return METHODS


def _key_value(s):
    """KEY=VALUE with VALUE parsed as JSON when it can be (numbers, true/false, lists), else a string."""
    import json
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    try:
        val = json.loads(v)
    except ValueError:
        val = v
    return k.strip(), val


# what a None default of a TrainOptions field means, for the help text
_AUTO = {"max_steps": "from --epochs", "eval_every": "a quarter of the steps", "save_every": "at every evaluation",
         "early_stopping_patience": "off", "dtype": "bfloat16 on CUDA (float16 on GPUs without bfloat16, e.g. T4), float32 on CPU",
         "format_regex": "the bundled data's answer format, for that data only", "method_options": "none",
         "max_grad_norm": "no clipping"}


def _default_text(name: str) -> str:
    v = getattr(TrainOptions(), name)
    if v is None:
        text = _AUTO[name]
    elif isinstance(v, bool):
        text = "on" if v else "off"
    elif isinstance(v, (tuple, list)):
        text = ",".join(v)
    elif isinstance(v, float):
        text = f"{v:g}"
    else:
        text = str(v)
    quick = QUICK_DEFAULTS.get(name)
    return f"default {text}" + (f"; {quick:g} in the quick run" if quick is not None and quick != v else "")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="a YAML or JSON file of any of the keys model, data, eval_data, general_data, output_dir, "
                        "device and the options below (as `max_steps: 30`; method_options a mapping); flags given "
                        "here override it. Every run writes its resolved configuration to OUTPUT_DIR/config.yaml, "
                        "which repeats the run (default: none)")
    p.add_argument("--model", metavar="PATH", help="HF model folder (dense or bitsandbytes 4-bit NF4) or .gguf file "
                                                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", metavar="PATH", help="training data: a .jsonl/.json/.parquet/.csv file, a folder or a glob "
                                                  "of them (instruction, prompt/completion, chat, ShareGPT or text "
                                                  "records; default: the bundled set)")
    p.add_argument("--eval-data", metavar="PATH", help="held-out data, as --data (default: --eval-fraction of --data)")
    p.add_argument("--output-dir", metavar="DIR", help="where the adapter and reports go (default lorart-output)")
    p.add_argument("--device", metavar="DEVICE", help="auto | cpu | cuda[:N] (default auto: the GPU when lorart's "
                                                      "kernels can use it)")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true", help="replace the previous run in --output-dir")
    p.add_argument("--no-general", action="store_true", help="skip the general-text perplexity (forgetting) check")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    quick = ", ".join(f"{k} {v:g}" for k, v in QUICK_DEFAULTS.items() if getattr(TrainOptions(), k) != v)
    g = p.add_argument_group("training options (lorart.train keywords and config keys)",
                             f"With neither --model nor --data (the quick run) these defaults change: {quick}.")

    def opt(flag, hlp, *aliases, **kw):
        name = kw.get("dest") or flag[2:].replace("-", "_")
        if "metavar" not in kw and "choices" not in kw and kw.get("action") is None:
            kw["metavar"] = "N" if kw.get("type") in (int, int_at_least) else "X" if kw.get("type") else "VALUE"
        g.add_argument(flag, *aliases, help=f"{hlp} ({_default_text(name)})", **kw)

    flag = argparse.BooleanOptionalAction
    opt("--method", "full | lora | qlora | adapter | prefix | prompt | bitfit (docs/methods.md)",
        choices=list(_method_names()))
    opt("--method-option", "an option of the method (repeatable), e.g. bottleneck=64, num_virtual_tokens=20, "
        "projection=true, init_text='Answer briefly'", dest="method_options", action="append", type=_key_value,
        metavar="KEY=VALUE")
    opt("--r", "LoRA rank (--lora-r: the same, for torchrun, whose parser refuses `--r` as ambiguous)",
        "--lora-r", type=int)
    opt("--alpha", "LoRA alpha: the update is scaled by alpha / r", type=finite_float())
    opt("--dropout", "LoRA dropout on the adapter's input", type=finite_float(0, 1))
    opt("--targets", "comma-separated module names, a regex or all-linear", type=parse_targets, metavar="MODULES")
    opt("--rslora", "rank-stabilised scaling alpha / sqrt(r)", action=flag)
    opt("--lr", "peak learning rate", type=finite_float(0, lo_open=True))
    opt("--epochs", "passes over the training data (unless --max-steps)", type=int)
    opt("--max-steps", "optimizer steps", type=int)
    opt("--batch-size", "examples per micro-batch", type=int)
    opt("--grad-accum", "micro-batches per optimizer step", type=int)
    opt("--max-seq-len", "tokens per example; longer ones are truncated", type=int)
    opt("--warmup", "warmup steps (>= 1) or a fraction of the steps (< 1)", type=_warmup)
    opt("--schedule", "the learning rate after warmup", choices=["cosine", "linear", "constant"])
    opt("--min-lr-ratio", "the lr the schedule ends at, as a fraction of --lr", type=finite_float(0, 1))
    opt("--weight-decay", "AdamW weight decay", type=finite_float(0))
    opt("--max-grad-norm", "clip the gradient's L2 norm to this", type=finite_float())
    opt("--skip-nonfinite", "skip up to N steps whose loss or gradient norm is not finite instead of stopping at the "
        "first (float16 loss-scale overflows are skipped apart, without counting here)", type=int_at_least(0),
        metavar="N")
    opt("--eval-every", "steps between held-out evaluations", type=int)
    opt("--save-every", "steps between checkpoints", type=int)
    opt("--early-stopping-patience", "stop after N evaluations without improvement", type=int)
    opt("--early-stopping-min-delta", "the smallest eval-loss decrease that counts as an improvement",
        type=finite_float(0))
    opt("--gradient-checkpointing", "recompute activations in backward: less memory, more time", action=flag)
    opt("--packing", "pack several examples per row (block-diagonal attention)", action=flag)
    opt("--seed", "seed of the data order, the initialisation and dropout", type=int)
    opt("--eval-fraction", "the share of --data held out when there is no --eval-data", type=finite_float(0, 1))
    opt("--num-samples", "held-out prompts generated before/after (samples.md)", type=int)
    opt("--sample-max-new-tokens", "tokens generated per sample", type=int)
    opt("--format-regex", "regex a generated answer must fully match (format_accuracy)", type=regex, metavar="REGEX")
    opt("--log-every", "steps between progress lines when the output is not a terminal", type=int)
    opt("--keep-checkpoints", "the newest checkpoints kept", type=int)
    opt("--dtype", "compute dtype (float16 trains with dynamic loss scaling)",
        choices=["float32", "bfloat16", "float16"])
    opt("--report-to", "experiment trackers: none, tensorboard, wandb, mlflow or a comma-separated list "
        "(each an extra: pip install \"lorart[tensorboard]\"); logs go under --output-dir", metavar="TRACKERS",
        type=_trackers)
    g = p.add_argument_group("several processes (launch with torchrun; docs/distributed.md)")
    opt("--fsdp", "shard the model, gradients and optimizer states over the processes (FSDP2) instead of "
        "replicating them (DDP)", action=flag)
    opt("--dist-timeout", "seconds a process waits for the others before it stops with an error",
        type=finite_float(1), metavar="SECONDS")


def cmd_train(args: argparse.Namespace) -> int:
    from .training import train
    from .training.config import RUN_KEYS, merge_config, read_config
    from .training.options import option_names
    given = {k: getattr(args, k) for k in option_names() if getattr(args, k, None) is not None}
    if "method_options" in given:
        given["method_options"] = dict(given["method_options"])
    given.update({k: getattr(args, k) for k in ("model", "data", "eval_data", "output_dir", "device")
                  if getattr(args, k) is not None})
    if args.no_general:
        given["general_data"] = False
    values = merge_config(read_config(args.config) if args.config else None, given, args.config)
    run = {k: values.pop(k) for k in list(values) if k in RUN_KEYS}
    if run.get("model") is None and run.get("data") is None:
        for k, v in QUICK_DEFAULTS.items():
            values.setdefault(k, v)
    gen = run.get("general_data", True)
    try:
        train(run.get("model"), run.get("data"), eval_data=run.get("eval_data"),
              output_dir=run.get("output_dir", "lorart-output"), device=run.get("device", "auto"),
              resume=bool(args.resume), overwrite=bool(args.overwrite), general_data=True if gen is None else gen,
              progress=not args.quiet, **values)
    except OptionError as e:   # name the flag or the config file's key the value came from
        if e.name in given:
            raise UserError(f"train: argument --{e.name.replace('_', '-')}: {e.detail} (see `lorart train --help`)") \
                from None
        if args.config:
            raise UserError(f"{args.config}: key `{e.name}`: {e.detail}") from None
        raise
    return 0


def _load_for_inference(args):
    from .models import load_model
    from .training.setup import default_dtype, resolve_device
    try:
        dev = resolve_device(args.device)
    except ValueError as e:
        raise UserError(str(e).replace("lorart.train: argument `device`", "argument --device")) from None
    dtype = default_dtype(dev)
    model, tok = load_model(args.model, dtype=dtype, device=dev)
    if tok is None:
        raise UserError(f"{args.model}: the model folder has no tokenizer.json")
    if args.adapter:
        from .methods import load
        load(model, args.adapter)
    return model.eval(), tok, dev, dtype


def _reply(model, tok, prompt_or_msgs, args, dev, dtype) -> str:
    from .models import chat
    from .training.evaluate import autocast_ctx
    with autocast_ctx(dev, dtype):
        if tok.chat_template is not None and not args.raw:
            return chat(model, tok, prompt_or_msgs, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p)[0]
        from .models import generate
        text = prompt_or_msgs if isinstance(prompt_or_msgs, str) else prompt_or_msgs[-1]["content"]
        ids = tok.encode(text)
        out = generate(model, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, eos_token_id=tok.eos_ids or None, pad_token_id=tok.pad_id)
        return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).strip()


def cmd_generate(args: argparse.Namespace) -> int:
    model, tok, dev, dtype = _load_for_inference(args)
    print(_reply(model, tok, " ".join(args.prompt), args, dev, dtype))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model, tok, dev, dtype = _load_for_inference(args)
    history = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("lorart chat: type a message; /reset clears the history; Ctrl-D exits", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        answer = _reply(model, tok, list(history), args, dev, dtype)
        history.append({"role": "assistant", "content": answer})
        print(answer, flush=True)


def cmd_eval(args: argparse.Namespace) -> int:
    from ._atomic import strict_json
    from .training.evaluate import eval_loss, format_accuracy, generate_samples
    from .training.options import DEFAULT_FORMAT_REGEX
    from .data import load_examples
    model, tok, dev, dtype = _load_for_inference(args)
    data = args.data
    regex = args.format_regex
    if data is None or data == "default":
        from .data import default_dataset_paths
        data = default_dataset_paths()["heldout"]
        regex = regex or DEFAULT_FORMAT_REGEX
    examples = load_examples(data, tok, args.max_seq_len).examples
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    ev = eval_loss(model, examples, pad, dev, dtype, args.batch_size)
    res = {"data": data, "examples": len(examples), "tokens": ev["tokens"], "loss": ev["loss"], "ppl": ev["ppl"]}
    if regex and args.num_samples:
        samples = generate_samples(model, tok, examples, args.num_samples, args.max_new_tokens, dev, dtype, True,
                                   args.batch_size)
        res["format_accuracy"] = format_accuracy(samples, regex)
        res["format_prompts"] = len(samples)
    print(strict_json(res, indent=2))
    return 0


def add_subcommands(sub) -> None:
    t = sub.add_parser("train", help="fine-tune with any lorart method, LoRA by default (no arguments: a quick run of the embedded "
                                     "model on the bundled data)")
    add_train_args(t)
    t.set_defaults(func=cmd_train)
    from .training.compare import add_subcommand as add_compare
    add_compare(sub)
    from .export import add_subcommand as add_export
    add_export(sub)
    from .planner.cli import add_subcommand as add_plan
    add_plan(sub)
    from .spectrum import add_subcommand as add_inspect
    add_inspect(sub)
    from .serving.cli import add_subcommand as add_serve
    add_serve(sub)
    for name, fn, hlp in (("generate", cmd_generate, "answer one prompt"),
                          ("chat", cmd_chat, "interactive chat (EOF exits)"),
                          ("eval", cmd_eval, "held-out loss / perplexity (and format accuracy) of a model")):
        c = sub.add_parser(name, help=hlp)
        c.add_argument("--model", help="HF model folder or .gguf file (default: the embedded model)")
        c.add_argument("--adapter", help="a trained method folder (e.g. lorart-output/adapter): any lorart method, or "
                                         "a PEFT LoRA / prompt / prefix folder (default: none, the base model)")
        c.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
        c.add_argument("--max-new-tokens", type=int_at_least(0), default=128 if name != "eval" else 32,
                       help="tokens generated per answer (default %(default)s)")
        if name == "eval":
            c.add_argument("--data", help="data to evaluate on, as train's --data (default: the bundled held-out set)")
            c.add_argument("--max-seq-len", type=int_at_least(2), default=512,
                           help="tokens per example; longer ones are truncated (default %(default)s)")
            c.add_argument("--batch-size", type=int_at_least(1), default=8, help="examples per batch (default "
                                                                                "%(default)s)")
            c.add_argument("--num-samples", type=int_at_least(0), default=8,
                           help="prompts generated for format_accuracy (with --format-regex or the default data; "
                                "default %(default)s)")
            c.add_argument("--format-regex", type=regex, help="regex a generated answer must fully match (default: "
                                                              "the bundled data's answer format, for that data only)")
        else:
            c.add_argument("--temperature", type=finite_float(0), default=0.0,
                           help="sampling temperature; 0 is greedy (default %(default)s)")
            c.add_argument("--top-p", type=finite_float(0, 1, lo_open=True), default=1.0,
                           help="nucleus sampling: the smallest set of tokens holding this probability (default "
                                "%(default)s)")
            c.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
        if name == "generate":
            c.add_argument("prompt", nargs="+", help="the prompt (several words are joined with spaces)")
        c.set_defaults(func=fn)


def _oserror_message(e: OSError) -> str:
    named = write_error(e.filename or "", e)
    if named is not None:
        return str(named)
    what = e.strerror or str(e)
    return f"{e.filename}: {what.lower()}" if e.filename else what


def describe_error(e: BaseException, command: str | None = None) -> tuple[str, int]:
    """(the one line after `lorart: error: `, exit code) for an exception that ended `lorart COMMAND`."""
    import torch

    missing = e.name if isinstance(e, ModuleNotFoundError) and e.name else None
    if missing and missing.split(".")[0] != "lorart":   # an optional package: name the extra to install
        from .sysinfo import missing_module_message
        msg, code = missing_module_message(missing, f"lorart {command}" if command else "this command"), 2
    elif isinstance(e, OSError) and not isinstance(e, InputError):
        msg, code = _oserror_message(e), 2
    elif isinstance(e, ValueError):   # InputError and lorart's other argument checks; UnicodeDecodeError
        msg, code = str(e.args[0]) if len(e.args) == 1 and isinstance(e.args[0], str) else str(e), 2
    elif isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))):
        msg, code = f"out of memory ({type(e).__name__}: {e}); try a smaller batch, sequence length or model", 2
    else:
        where = ""
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"
        msg = (f"internal error: {type(e).__name__}: {e}{where}. This is a bug in lorart: please report it with "
               f"the command and the traceback that `LORART_DEBUG=1 lorart ...` prints")
        code = 1
    msg = " ".join(str(msg).split())
    if msg.startswith("lorart: "):
        msg = msg[len("lorart: "):]
    return msg, code


def run(func, args) -> int:
    """Call a subcommand; every failure becomes one line on stderr (see the module docstring)."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("\nlorart: interrupted (a run with checkpoints continues with `lorart train --resume`)",
              file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("LORART_DEBUG"):
            raise
        msg, code = describe_error(e, getattr(args, "command", None))
        # under torchrun an error every rank raised alike is printed once, by the rank that reported it
        reporter = getattr(e, "reported_by", None)
        if reporter is None or str(reporter) == os.environ.get("RANK", "0"):
            print(f"lorart: error: {msg}", file=sys.stderr)
        if isinstance(e, DistributedError):
            # this rank lost its peers: leave at once. torch's teardown of a process group whose peer is dead or
            # being killed can abort the process (SIGABRT, seen under load) instead of exiting with the code
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
