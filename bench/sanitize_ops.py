"""Runs every CUDA test case (pytest -m cuda) in one process, for compute-sanitizer.

    compute-sanitizer --tool memcheck python bench/sanitize_ops.py
    compute-sanitizer --tool racecheck python bench/sanitize_ops.py

The CUDA cases of tests/ use small, odd shapes (partial blocks, odd counts, misaligned
rows), so this exercises every kernel's edge paths; peers' kernels (bitsandbytes) are
left out, and torch's own kernels run but are not ours to fix.
"""
import os
import sys

import pytest

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    tests = os.path.join(here, "..", "tests")
    args = ["-q", "-p", "no:cacheprovider", "-m", "cuda and not slow", "-k", "not bnb and not bitsandbytes",
            tests, *sys.argv[1:]]
    sys.exit(pytest.main(args))
