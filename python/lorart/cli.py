"""The `lorart` subcommands train / generate / chat / eval (`info` lives in __main__).

User mistakes (missing files, bad options, bad data) end with one line `lorart: error: ...` and exit code 2
(LORART_DEBUG=1 shows the traceback instead).
"""
from __future__ import annotations

import argparse
import os
import sys

from .training.options import TrainOptions

# `lorart train` with neither --model nor --data: the embedded model on the bundled data, a few minutes on CPU
QUICK_DEFAULTS = {"max_steps": 30, "batch_size": 8, "max_seq_len": 160, "lr": 1e-3, "eval_every": 10,
                  "warmup": 3, "num_samples": 8, "sample_max_new_tokens": 24}


class UserError(Exception):
    """A mistake in the command line or the inputs: printed as one line, exit code 2."""


def _int_or_none(s):
    return None if s.lower() in ("none", "0") else int(s)


def _warmup(s):
    v = float(s)
    return int(v) if v >= 1 and v.is_integer() else v


def _targets(s):
    if s == "all-linear" or any(c in s for c in "^$*+?[]()\\|"):
        return s
    return tuple(t.strip() for t in s.split(",") if t.strip())


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


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainOptions()
    p.add_argument("--model", help="HF model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="training JSONL (instruction / chat / text records; default: the bundled set)")
    p.add_argument("--eval-data", help="held-out JSONL (default: --eval-fraction of --data)")
    p.add_argument("--output-dir", default="lorart-output", help="where the adapter and reports go")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--no-general", action="store_true", help="skip the general-text perplexity (forgetting) check")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    g = p.add_argument_group("training options (lorart.train keywords; None = library default)")
    g.add_argument("--method", choices=list(_method_names()),
                   help="full | lora | qlora | adapter | prefix | prompt | bitfit (default lora)")
    g.add_argument("--method-option", dest="method_options", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="an option of the method (repeatable), e.g. bottleneck=64, num_virtual_tokens=20, "
                        "projection=true, init_text='Answer briefly'")
    g.add_argument("--r", type=int)
    g.add_argument("--alpha", type=float)
    g.add_argument("--dropout", type=float)
    g.add_argument("--targets", type=_targets, help=f"comma-separated module names, a regex or all-linear "
                                                    f"(default {','.join(d.targets)})")
    g.add_argument("--rslora", action="store_true", default=None)
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr:g})")
    g.add_argument("--epochs", type=int)
    g.add_argument("--max-steps", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--grad-accum", type=int)
    g.add_argument("--max-seq-len", type=int)
    g.add_argument("--warmup", type=_warmup, help="steps (>= 1) or a fraction of the steps (< 1)")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"])
    g.add_argument("--min-lr-ratio", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--max-grad-norm", type=float)
    g.add_argument("--eval-every", type=int)
    g.add_argument("--save-every", type=int)
    g.add_argument("--early-stopping-patience", type=int)
    g.add_argument("--early-stopping-min-delta", type=float)
    g.add_argument("--gradient-checkpointing", action="store_true", default=None)
    g.add_argument("--packing", action="store_true", default=None)
    g.add_argument("--seed", type=int)
    g.add_argument("--eval-fraction", type=float)
    g.add_argument("--num-samples", type=int, help="held-out prompts generated before/after (samples.md)")
    g.add_argument("--sample-max-new-tokens", type=int)
    g.add_argument("--format-regex", help="regex a generated answer must fully match (format_accuracy)")
    g.add_argument("--log-every", type=int)
    g.add_argument("--keep-checkpoints", type=int)
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])


def cmd_train(args: argparse.Namespace) -> int:
    from .training import train
    from .training.options import option_names
    opts = {k: getattr(args, k) for k in option_names() if getattr(args, k, None) is not None}
    if "method_options" in opts:
        opts["method_options"] = dict(opts["method_options"])
    if args.model is None and args.data is None:
        for k, v in QUICK_DEFAULTS.items():
            opts.setdefault(k, v)
    train(args.model, args.data, eval_data=args.eval_data, output_dir=args.output_dir, device=args.device,
          resume=bool(args.resume), general_data=not args.no_general, progress=not args.quiet, **opts)
    return 0


def _load_for_inference(args):
    import torch

    from .models import load_model
    from .training.setup import resolve_device
    dev = resolve_device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
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
    import json

    from .training.evaluate import eval_loss, format_accuracy, generate_samples
    from .training.options import DEFAULT_FORMAT_REGEX
    from .training.setup import _load
    model, tok, dev, dtype = _load_for_inference(args)
    data = args.data
    regex = args.format_regex
    if data is None or data == "default":
        from .data import default_dataset_paths
        data = default_dataset_paths()["heldout"]
        regex = regex or DEFAULT_FORMAT_REGEX
    examples = _load(data, tok, args.max_seq_len, "data")
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    ev = eval_loss(model, examples, pad, dev, dtype, args.batch_size)
    res = {"data": data, "examples": len(examples), "tokens": ev["tokens"], "loss": ev["loss"], "ppl": ev["ppl"]}
    if regex and args.num_samples:
        samples = generate_samples(model, tok, examples, args.num_samples, args.max_new_tokens, dev, dtype, True,
                                   args.batch_size)
        res["format_accuracy"] = format_accuracy(samples, regex)
        res["format_prompts"] = len(samples)
    print(json.dumps(res, indent=2))
    return 0


def add_subcommands(sub) -> None:
    t = sub.add_parser("train", help="fine-tune with any lorart method, LoRA by default (no arguments: a quick run of the embedded "
                                     "model on the bundled data)")
    add_train_args(t)
    t.set_defaults(func=cmd_train)
    from .methods.compare import add_subcommand as add_compare
    add_compare(sub)
    from .serving.cli import add_subcommand as add_serve
    add_serve(sub)
    for name, fn, hlp in (("generate", cmd_generate, "answer one prompt"),
                          ("chat", cmd_chat, "interactive chat (EOF exits)"),
                          ("eval", cmd_eval, "held-out loss / perplexity (and format accuracy) of a model")):
        c = sub.add_parser(name, help=hlp)
        c.add_argument("--model", help="HF model folder or .gguf file (default: the embedded model)")
        c.add_argument("--adapter", help="a trained method folder (e.g. lorart-output/adapter): any lorart method, or "
                                         "a PEFT LoRA / prompt / prefix folder")
        c.add_argument("--device", default="auto")
        c.add_argument("--max-new-tokens", type=int, default=128 if name != "eval" else 32)
        if name == "eval":
            c.add_argument("--data", help="JSONL to evaluate on (default: the bundled held-out set)")
            c.add_argument("--max-seq-len", type=int, default=512)
            c.add_argument("--batch-size", type=int, default=8)
            c.add_argument("--num-samples", type=int, default=8,
                           help="prompts generated for format_accuracy (with --format-regex or the default data)")
            c.add_argument("--format-regex")
        else:
            c.add_argument("--temperature", type=float, default=0.0)
            c.add_argument("--top-p", type=float, default=1.0)
            c.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
        if name == "generate":
            c.add_argument("prompt", nargs="+")
        c.set_defaults(func=fn)


def run(func, args) -> int:
    """Call a subcommand; user mistakes become one line on stderr and exit code 2."""
    from .adapters import AdapterFileError
    from .data import DataError
    try:
        return int(func(args) or 0)
    except (UserError, DataError, AdapterFileError, FileNotFoundError, IsADirectoryError, PermissionError,
            ValueError, TypeError, KeyError) as e:
        if os.environ.get("LORART_DEBUG"):
            raise
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        msg = " ".join(msg.split())
        for prefix in ("lorart: ",):
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
        print(f"lorart: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlorart: interrupted (a run with checkpoints continues with `lorart train --resume`)",
              file=sys.stderr)
        return 130
