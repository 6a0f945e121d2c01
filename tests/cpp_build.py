"""Builds of the C++ example service against the lorart CMake package, for the tests.

The package comes from the installed wheel (`python -m lorart --cmake-dir`) when this lorart
is one, else from a CPU-only `cmake --install` of this checkout into build/pytest-cpp (kept
between runs; rebuilt incrementally).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kw) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")


def _generator() -> list[str]:
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def require_toolchain() -> None:
    if not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("cmake and a C++ compiler are needed to build the C++ example")


def lorart_cmake_dir() -> str:
    """The folder with lorartConfig.cmake to build consumers against."""
    from lorart.__main__ import cmake_dir

    d = cmake_dir()
    if d is not None:
        return d
    build = ROOT / "build" / "pytest-cpp"
    prefix = build / "prefix"
    _run(["cmake", "-S", str(ROOT), "-B", str(build), *_generator(), "-DLORART_CUDA=OFF", "-DLORART_PYTHON=OFF",
          "-DLORART_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release"])
    _run(["cmake", "--build", str(build), "--parallel", "2"])
    _run(["cmake", "--install", str(build), "--prefix", str(prefix)])
    return str(prefix / "lib" / "cmake" / "lorart")


def build_example(out_dir: Path) -> dict[str, Path]:
    """Configures and builds examples/cpp_service with find_package(lorart) only."""
    require_toolchain()
    cmake_dir = lorart_cmake_dir()
    build = out_dir / "cpp_service"
    _run(["cmake", "-S", str(ROOT / "examples" / "cpp_service"), "-B", str(build), *_generator(),
          f"-Dlorart_DIR={cmake_dir}", "-DCMAKE_BUILD_TYPE=Release"])
    _run(["cmake", "--build", str(build), "--parallel", "2"])
    return {"service": build / "lorart_service", "st_copy": build / "lorart_st_copy", "cmake_dir": Path(cmake_dir)}


if __name__ == "__main__":  # a manual check: python tests/cpp_build.py OUT_DIR
    print(build_example(Path(sys.argv[1] if len(sys.argv) > 1 else os.getcwd())))
