"""`lorart serve`: load the base model (and adapters), start the engine, serve HTTP with uvicorn until SIGTERM /
Ctrl-C, which drains (no new connections or requests; accepted requests finish, up to --drain-timeout)."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading


def _adapter_arg(s: str):
    name, sep, path = s.partition("=")
    if not sep or not name.strip() or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {s!r}")
    return name.strip(), path


def add_subcommand(sub) -> None:
    p = sub.add_parser("serve", help="serve a base model and many LoRA adapters over an OpenAI-compatible HTTP API "
                                     "(needs the `serve` extra)")
    p.add_argument("--model", default="default", help="HF model folder or .gguf file (default: the embedded model)")
    p.add_argument("--method", choices=["lora", "qlora"], default="lora",
                   help="qlora: hold the base's decoder linear layers in NF4 (bitsandbytes-exact, ~4x less memory); "
                        "default: lora (the base as loaded)")
    p.add_argument("--adapter", action="append", type=_adapter_arg, default=[], metavar="NAME=DIR",
                   help="serve the LoRA adapter in DIR (a PEFT / lorart adapter folder) as model NAME (repeatable; "
                        "default: none, the base alone)")
    p.add_argument("--served-model-name", help="the base model's name in the API (default: the model's file name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on stderr); default: 8000")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto, the GPU when there is one)")
    p.add_argument("--api-key", default=os.environ.get("LORART_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route (default: $LORART_API_KEY)")
    p.add_argument("--allow-adapter-loading", action="store_true",
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--max-adapters", type=int, default=8,
                   help="adapters held in the model at once; others are loaded on demand (LRU eviction); default: 8")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together in one forward (default: 16)")
    p.add_argument("--max-queued", type=int, default=64, help="requests waiting for the batch; beyond: HTTP 429 (default: 64)")
    p.add_argument("--max-step-tokens", type=int, default=512,
                   help="prompt tokens admitted per step (a longer single prompt still runs alone; default: 512)")
    p.add_argument("--max-model-len", type=int, help="context length (prompt + completion) per request "
                                                     "(default: the model's)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for accepted requests before closing them (default: 30)")
    p.add_argument("--threads", type=int, help="CPU threads for the model: torch's intra-op threads and lorart's kernels' "
                                                    "(default: theirs, the number of cores)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (info shows each request; default: warning)")
    p.set_defaults(func=cmd_serve)


def _served_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model in (None, "default"):
        from ..models import default_model_path
        path = default_model_path()
    else:
        path = args.model
    name = os.path.basename(os.path.normpath(path))
    return name[:-5] if name.endswith(".gguf") else name


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except (OSError, UnicodeError) as e:
        raise ValueError(f"argument --host/--port: cannot listen on {host}:{port} ({e})") from None


def build(args):
    """The engine and ASGI app for parsed `lorart serve` arguments (model and adapters loaded; engine not
    started)."""
    from ..models import load_model
    from ..training.setup import default_dtype, resolve_device
    from .api import create_app
    from .engine import Engine

    names = [n for n, _ in args.adapter]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"argument --adapter: the name {dup[0]!r} is given twice")
    base = _served_name(args)
    if base in names:
        raise ValueError(f"argument --adapter: {base!r} is the base model's name (see --served-model-name)")
    dev = resolve_device(args.device)
    # qlora: every decoder linear in NF4 (bitsandbytes-exact, double quantization) as it is read
    # the dtype `lorart generate` uses: float32 on the CPU, bfloat16 on a GPU that computes in it, else float16
    model, tok = load_model(args.model, dtype=default_dtype(dev), device=dev,
                            quantize="nf4" if args.method == "qlora" else None)
    if tok is None:
        raise ValueError(f"{args.model}: the model folder has no tokenizer.json")
    engine = Engine(model, tok, base_name=base, max_batch=args.max_batch, max_queued=args.max_queued,
                    max_step_tokens=args.max_step_tokens, max_adapters=args.max_adapters,
                    max_model_len=args.max_model_len)
    for name, path in args.adapter:
        try:
            engine.registry.add(name, path)
        except (ValueError, KeyError, OSError) as e:
            msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            raise ValueError(f"argument --adapter {name}={path}: {msg.removeprefix('lorart: ')}") from None
    model_path = None if args.model in (None, "default") else os.path.abspath(args.model)
    app = create_app(engine, model_path=model_path, api_key=args.api_key,
                     allow_adapter_loading=args.allow_adapter_loading)
    return engine, app


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as e:
        raise ValueError(f"lorart serve needs the `serve` extra ({e.name} is missing): "
                         "pip install 'lorart[serve]'") from None
    if args.drain_timeout < 0:
        raise ValueError(f"argument --drain-timeout: expected >= 0, got {args.drain_timeout}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"argument --threads: expected >= 1, got {args.threads}")
        import torch

        from .._core import set_num_threads
        torch.set_num_threads(args.threads)
        set_num_threads(args.threads)
    sock = _listen(args.host, args.port)
    try:
        engine, app = build(args)
    except BaseException:
        sock.close()
        raise
    engine.start()

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            """SIGTERM / Ctrl-C drain and return (exit code 0); uvicorn's own version re-raises the signal
            afterwards, which would kill the process before the engine is closed. A second Ctrl-C forces."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        def handle_exit(self, sig, frame):  # refuse new requests, finish the accepted ones
            engine.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.drain_timeout,
                            access_log=args.log_level in ("debug", "info"))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"lorart serve: {engine.base_name} with {len(args.adapter)} adapter(s) on http://{shown}:{port}/v1",
          file=sys.stderr, flush=True)
    try:
        Server(config).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    print("lorart serve: stopped", file=sys.stderr, flush=True)
    return 0
