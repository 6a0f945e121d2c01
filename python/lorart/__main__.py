"""`python -m lorart` / `lorart`: the command line."""
from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import lorart

    print(lorart.format_build_info(lorart.system_info()))
    return 0


def cmake_dir() -> str | None:
    """The folder holding lorartConfig.cmake in this installed package (for find_package(lorart)
    from C++: -Dlorart_DIR=...), or None when this lorart is not an installed wheel."""
    from pathlib import Path

    d = Path(__file__).resolve().parent / "lib" / "cmake" / "lorart"
    return str(d) if (d / "lorartConfig.cmake").is_file() else None


def build_parser() -> argparse.ArgumentParser:
    from .cli import Parser

    import lorart

    p = Parser(prog="lorart", description="Parameter-efficient fine-tuning on a C++/CUDA core.")
    p.add_argument("--version", action="version", version=f"lorart {lorart.__version__}",
                   help="print lorart's version and exit")
    p.add_argument("--cmake-dir", action="store_true",
                   help="print the folder of lorartConfig.cmake (cmake -Dlorart_DIR=...) and exit")
    sub = p.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    info = sub.add_parser("info", help="version, CUDA kernels compiled and the GPUs', CPU bf16/AMX support, extras "
                                        "installed")
    info.set_defaults(func=_cmd_info)
    from .cli import add_subcommands
    add_subcommands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmake_dir:
        d = cmake_dir()
        if d is None:
            print("lorart: this lorart has no CMake package (not installed from a wheel; "
                  "use `cmake --install` of the repository instead)", file=sys.stderr)
            return 1
        print(d)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if args.func is _cmd_info:
        return int(args.func(args) or 0)
    from .cli import run
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
