"""Mutation check: small, real bugs that the test suite must catch.

    python bench/mutants.py                 # every mutant: copy the tree, build, mutate, test, report
    python bench/mutants.py --list          # the mutants and the tests that must kill them
    python bench/mutants.py --only nf4-tie-upper,rmsnorm-eps-twice [--keep] [--json out.json]
    python bench/mutants.py --rev main --skip-missing-tests   # an older tree, with the tests it has
    python bench/mutants.py --tests tests/test_norm_exact.py --only rmsnorm-eps-twice   # does this file kill it?
    python bench/mutants.py --tree /tmp/mut --build-only && flock LOCK python bench/mutants.py --tree /tmp/mut

Each mutant is one small text change in one file (a tie sent the wrong way, a constant off by a little, a
dtype ignored): the kind of bug that gives slightly wrong numbers and no crash. The check copies the working
tree (tracked and untracked, not ignored) into a temporary folder, builds lorart._C there once (CPU only, in
place), runs every mutant's tests on the unmutated copy (they must pass), then for each mutant applies the
change, rebuilds when it touched C++ (incremental: only what includes the file), runs its tests and puts the
file back. A mutant is *killed* when a test fails, *survived* when they all pass. Exit status 0 when every
mutant was killed, 1 when one survived, 2 when the check itself could not run.

CUDA-only code cannot be mutated on a machine without a GPU: mutants in shared headers (lorart/detail/*_math.h)
change the CPU and the CUDA kernels alike, and their tests run on both devices where a GPU exists.
tests/test_mutants.py checks that every mutant still applies to the tree, so this stays runnable as the code
moves. Results: docs/DEVELOPING.md, "Mutants".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str          # file, relative to the repository root
    old: str           # exact text, found `count` times
    new: str
    tests: tuple       # pytest arguments (files, -k expressions) that must fail
    why: str
    count: int = 1

    @property
    def cpp(self) -> bool:
        return not self.path.endswith(".py")


NF4_TESTS = ("tests/test_nf4.py", "tests/test_nf4_bnb.py", "tests/test_nf4_exact.py")
LORA_OPS = ("tests/test_lora_ops.py", "tests/test_lora_exact.py")

MUTANTS = (
    # ---- NF4 -----------------------------------------------------------------------------------------------
    Mutant("nf4-tie-upper", "cpp/include/lorart/detail/nf4_math.h", "(x > kNF4Mid", "(x >= kNF4Mid", NF4_TESTS,
           "a value exactly on a midpoint between two codes goes to the upper code (bitsandbytes: the lower)",
           count=15),
    Mutant("nf4-divide", "cpp/src/nf4/nf4_cpu.cpp", "detail::nf4_encode(buf[i] * inv)",
           "detail::nf4_encode(amax > 0.f ? buf[i] / amax : 0.f)", NF4_TESTS,
           "quantize divides by absmax instead of multiplying by its float32 reciprocal (as bitsandbytes)"),
    Mutant("nf4-nested-offset", "cpp/include/lorart/detail/nf4_math.h",
           "return add_rn(mul_rn(code_value, nested_absmax), offset);", "return mul_rn(code_value, nested_absmax);",
           NF4_TESTS, "double quant: the block scale forgets the offset (mean of absmax)"),
    Mutant("nf4-nested-block", "cpp/include/lorart/detail/nf4_math.h", "nested_absmax[b / 256]",
           "nested_absmax[b / 255]", NF4_TESTS, "double quant: block b reads the nested scale of the wrong group "
           "(only for weights of more than 255 blocks)"),
    Mutant("nf4linear-compute-dtype", "python/lorart/nn/nf4_linear.py", "cdt = self.compute_dtype or ",
           "cdt = None or ", ("tests/test_nf4_linear.py", "tests/test_nf4_exact.py"),
           "NF4Linear ignores its compute_dtype (runs in the weight's dtype)"),
    # ---- RMSNorm, SwiGLU -------------------------------------------------------------------------------------
    Mutant("rmsnorm-eps-twice", "cpp/include/lorart/detail/norm_math.h", "sum_sq / F(n) + eps)",
           "sum_sq / F(n) + eps + eps)", ("tests/test_norm.py", "tests/test_norm_exact.py"),
           "RMSNorm adds eps twice"),
    Mutant("rmsnorm-backward-c", "cpp/include/lorart/detail/norm_math.h", "return rstd * (g - n * c);",
           "return rstd * (g - n * c * F(0.999));", ("tests/test_norm.py", "tests/test_norm_exact.py"),
           "RMSNorm backward: the projection term 0.1% short"),
    Mutant("swiglu-exp-coef", "cpp/include/lorart/detail/act_math.h", "p = fmaf(p, r, 5.0000001201e-1f);",
           "p = fmaf(p, r, 5.0001e-1f);", ("tests/test_act.py",),
           "SwiGLU's exp polynomial: one coefficient off in the 5th digit"),
    # ---- LoRA ------------------------------------------------------------------------------------------------
    Mutant("lora-rows-scale", "python/lorart/ops/lora.py", "y.addmm_(xa, B.t(), alpha=scale)",
           "y.addmm_(xa, B.t(), alpha=scale * 0.999)", LORA_OPS,
           "the unfused LoRA forward (torch matmuls: every CPU call by default, CUDA above 16 rows) scales the "
           "LoRA term by 0.999"),
    Mutant("lora-dB-scale", "python/lorart/ops/lora.py", "dB = torch.addmm(B, gy2.t(), xa, beta=0, alpha=s)",
           "dB = torch.addmm(B, gy2.t(), xa, beta=0, alpha=s * 0.999)", LORA_OPS,
           "the gradient of B 0.1% short"),
    Mutant("rslora-scale", "python/lorart/ops/lora.py", "alpha / math.sqrt(r) if rslora", "alpha / r if rslora",
           ("tests/test_lora_layers.py", "tests/test_lora_exact.py"), "rsLoRA scaled as plain LoRA"),
    Mutant("dropout-hash", "cpp/include/lorart/detail/lora_math.h", "x *= 0x846ca68bu;", "x *= 0x846ca68du;",
           LORA_OPS, "the dropout mask hash with another (still well-mixing) multiplier: a mask that is random "
           "but not the documented one"),
    Mutant("dropout-seed-high", "cpp/include/lorart/detail/lora_math.h", "(seed >> 32) + 0x9E3779B9u",
           "(seed >> 33) + 0x9E3779B9u", LORA_OPS, "the dropout key drops one bit of the seed's high half"),
    Mutant("grouped-scale", "cpp/src/lora/lora_cpu.cpp", "xa + m * RM, static_cast<A>(sc[a]),",
           "xa + m * RM, static_cast<A>(sc[0]),", ("tests/test_lora_layers.py", "tests/test_lora_ops.py"),
           "mixed-adapter batches scale every row by the first adapter's scaling"),
    Mutant("merge-scale-f32", "cpp/src/lora/lora_cpu.cpp", "static_cast<A>(scale) * d[k]",
           "static_cast<A>(static_cast<float>(scale)) * d[k]", ("tests/test_lora_ops.py", "tests/test_lora_exact.py"),
           "merge rounds the scale to float32 (float64 merges lose precision)"),
    Mutant("pattern-last-match", "python/lorart/adapters.py", "for key, v in patterns.items():",
           "for key, v in reversed(list(patterns.items())):",
           ("tests/test_lora_adapters.py", "tests/test_lora_exact.py"),
           "rank_pattern / alpha_pattern: the last matching key wins (PEFT: the first)"),
)


def tree_files(root: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root, check=True,
                         capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and os.path.isfile(os.path.join(root, f))]


def copy_tree(root: str, dest: str, rev: str | None = None) -> None:
    """The working tree (tracked and untracked files, not ignored ones), or the commit `rev`."""
    if rev is not None:
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=root, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
        return
    for f in tree_files(root):
        os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(root, f), os.path.join(dest, f))


def check_applies(m: Mutant, root: str = ROOT) -> str | None:
    """None when `m` applies to the tree at `root` (its file holds the text, its test files exist), else why
    not."""
    p = os.path.join(root, m.path)
    if not os.path.isfile(p):
        return f"{m.path}: no such file"
    n = open(p, encoding="utf-8").read().count(m.old)
    if n != m.count:
        return f"{m.path}: {m.old!r} occurs {n} times, expected {m.count}"
    for t in m.tests:
        if t.endswith(".py") and not os.path.isfile(os.path.join(root, t.split("::")[0])):
            return f"test file {t} does not exist"
    return None


COPIED = ".lorart-mutants-copy"   # marks a finished copy in a --tree folder


class Tree:
    """A copy of the working tree with lorart._C built in place (CPU only)."""

    def __init__(self, dest: str, log):
        self.dest, self.log = dest, log
        self.build_dir = os.path.join(dest, "build", "mutants")

    def configure(self) -> None:
        pyb = subprocess.run([sys.executable, "-m", "pybind11", "--cmakedir"], check=True, capture_output=True,
                             text=True).stdout.strip()
        self._run(["cmake", "-S", self.dest, "-B", self.build_dir, "-G", "Ninja", "-DLORART_PYTHON=ON",
                   "-DLORART_DEV_INPLACE=ON", "-DLORART_CUDA=OFF", f"-Dpybind11_DIR={pyb}",
                   f"-DPython_EXECUTABLE={sys.executable}"], "configure")

    def build(self) -> bool:
        return self._run(["cmake", "--build", self.build_dir], "build", fail=False)

    def _run(self, cmd, what, fail=True) -> bool:
        r = subprocess.run(cmd, cwd=self.dest, capture_output=True, text=True)
        self.log.write(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}\n")
        if r.returncode and fail:
            raise RuntimeError(f"{what} failed (see the log): {r.stderr[-2000:]}")
        return r.returncode == 0

    def pytest(self, args, timeout: float) -> tuple[int, str]:
        env = dict(os.environ, PYTHONPATH=os.path.join(self.dest, "python"), PYTHONDONTWRITEBYTECODE="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "--no-header", "-p", "no:cacheprovider", *args]
        try:
            r = subprocess.run(cmd, cwd=self.dest, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return 124, "timed out"
        self.log.write(f"$ {' '.join(cmd)}\n{r.stdout[-6000:]}{r.stderr[-3000:]}\n")
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("FAILED") or ln.startswith("ERROR")]
        tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr.strip()[-200:]
        return r.returncode, (lines[0] if lines else tail)


def existing_tests(m: Mutant, root: str) -> Mutant:
    """`m` with only the test files that exist under `root` (to measure an older tree)."""
    keep = tuple(t for t in m.tests if not t.endswith(".py") or os.path.isfile(os.path.join(root, t)))
    return dataclasses.replace(m, tests=keep)


def run(mutants, keep: bool, timeout: float, log_path: str | None, rev: str | None = None,
        skip_missing_tests: bool = False, tree_dir: str | None = None, build_only: bool = False) -> list[dict]:
    reuse = tree_dir is not None and os.path.isfile(os.path.join(tree_dir, COPIED))
    dest = tree_dir or tempfile.mkdtemp(prefix="lorart-mutants-")
    keep = keep or tree_dir is not None
    os.makedirs(dest, exist_ok=True)
    log = open(log_path or os.path.join(dest, "mutants.log"), "a" if reuse else "w")
    print(f"tree copy: {dest}{' (reused)' if reuse else ''} (log: {log.name})", flush=True)
    results = []
    try:
        if not reuse:
            copy_tree(ROOT, dest, rev)
            open(os.path.join(dest, COPIED), "w").close()
        if skip_missing_tests:
            mutants = [existing_tests(m, dest) for m in mutants]
        tree = Tree(dest, log)
        t0 = time.time()
        tree.configure()
        if not tree.build():
            raise RuntimeError("the unmutated tree does not build (see the log)")
        print(f"built in {time.time() - t0:.0f} s", flush=True)
        if build_only:
            return results
        tests = sorted({t for m in mutants for t in m.tests})
        rc, what = tree.pytest(tests, timeout * 2)
        if rc != 0:
            raise RuntimeError(f"the tests fail without any mutant: {what}")
        print(f"baseline: {len(tests)} test files pass", flush=True)
        for m in mutants:
            why = check_applies(m, dest)
            if why:
                results.append({"name": m.name, "result": "not applied", "detail": why})
                print(f"{m.name:26s} NOT APPLIED: {why}", flush=True)
                continue
            path = os.path.join(dest, m.path)
            original = open(path, encoding="utf-8").read()
            t0 = time.time()
            try:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(original.replace(m.old, m.new))
                if m.cpp and not tree.build():
                    res, detail = "invalid", "does not compile"
                else:
                    rc, detail = tree.pytest(list(m.tests), timeout)
                    res = {0: "SURVIVED", 1: "killed"}.get(rc, f"error (pytest exit {rc})")
            finally:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(original)
                if m.cpp:
                    tree.build()
            results.append({"name": m.name, "path": m.path, "result": res, "detail": detail,
                            "seconds": round(time.time() - t0, 1), "why": m.why})
            print(f"{m.name:26s} {res:10s} {time.time() - t0:6.0f} s  {detail}", flush=True)
    finally:
        log.close()
        if not keep:
            shutil.rmtree(dest, ignore_errors=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--only", default=None, help="comma-separated mutant names (run in this order)")
    ap.add_argument("--keep", action="store_true", help="keep the tree copy (and its log)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per mutant's test run")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--log", default=None, help="write the build/test log here")
    ap.add_argument("--rev", default=None, help="check this commit instead of the working tree")
    ap.add_argument("--tests", default=None,
                    help="comma-separated test files to run for every mutant instead of its own (does this test "
                         "kill these mutants?)")
    ap.add_argument("--tree", default=None,
                    help="keep the copy and its build in this folder and reuse them on the next run (the copy is "
                         "made once: delete the folder after changing the code)")
    ap.add_argument("--build-only", action="store_true",
                    help="copy and build, run nothing (with --tree: build outside a lock, test later)")
    ap.add_argument("--skip-missing-tests", action="store_true",
                    help="drop test files the tree does not have (to measure an older tree)")
    a = ap.parse_args(argv)
    mutants = list(MUTANTS)
    if a.only:
        want = a.only.split(",")
        unknown = sorted(set(want) - {m.name for m in MUTANTS})
        if unknown:
            ap.error(f"--only: unknown mutants {unknown}")
        by_name = {m.name: m for m in MUTANTS}
        mutants = [by_name[n] for n in dict.fromkeys(want)]   # in the order given
    if a.tests:
        mutants = [dataclasses.replace(m, tests=tuple(a.tests.split(","))) for m in mutants]
    if a.list:
        for m in mutants:
            print(f"{m.name:26s} {m.path}\n    {m.why}\n    tests: {' '.join(m.tests)}")
        return 0
    try:
        results = run(mutants, a.keep, a.timeout, a.log, a.rev, a.skip_missing_tests, a.tree, a.build_only)
        if a.build_only:
            return 0
    except RuntimeError as e:
        print(f"mutants: error: {e}", file=sys.stderr)
        return 2
    killed = sum(r["result"] == "killed" for r in results)
    print(f"\n{killed} of {len(results)} mutants killed")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
