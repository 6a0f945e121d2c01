"""`python -m lorart` / `lorart`: the command line."""
from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import lorart

    print(lorart.format_build_info())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorart", description="Parameter-efficient fine-tuning on a C++/CUDA core.")
    sub = p.add_subparsers(dest="command")
    info = sub.add_parser("info", help="version, CUDA kernels compiled, GPU usable now")
    info.set_defaults(func=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
