#!/usr/bin/env bash
# The standing GPU check: any session with a lent GPU runs this first, as ONE call:
#   build lorart with CUDA, run the test suite (CUDA cases included), compute-sanitizer
#   memcheck + racecheck over every CUDA op, then the benchmarks. Results go to $OUT
#   (the device tool's folder; ./out elsewhere): RESULTS-gpu.md (paste into bench/RESULTS.md),
#   gpu_check.log, junit.xml and the benchmarks' JSON.
#
# Device tool call (carry .whl for bitsandbytes; see docs/DEVELOPING.md):
#   bash bench/gpu_check.sh            [QUICK=1 for a short run; SKIP_BUILD=1 to reuse a build]
# Budget: under 11 minutes on an H100 (build ~1 min with 16 cores; bench/train.py up to 7).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
RESULTS="$OUT/RESULTS-gpu.md"
status=0
step() { echo; echo "=== $(date -u +%T) $*"; }
fail() { echo "!!! FAILED: $*"; status=1; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)

# Peers that travel as wheels (bitsandbytes is not installed on the GPU image).
if ls .whl/*.whl >/dev/null 2>&1; then
  step "installing carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step "build (CUDAARCHS=${CUDAARCHS:-90})"
  t0=$(date +%s)
  CUDAARCHS=${CUDAARCHS:-90} CMAKE_BUILD_PARALLEL_LEVEL=16 \
    $PY -m pip install --no-build-isolation --no-deps -q . || { fail "build"; exit 1; }
  echo "build took $(( $(date +%s) - t0 )) s"
fi
$PY -m lorart info || fail "lorart info"

step "C++ tests (ctest, CPU build with 16 threads)"
( cmake -S . -B build/gpu-ctest -G Ninja -DLORART_CUDA=OFF -DLORART_TESTS=ON > /dev/null \
  && cmake --build build/gpu-ctest > /dev/null && ctest --test-dir build/gpu-ctest --output-on-failure 2>&1 | tail -5 ) \
  || fail "ctest"

step "tests"
timeout 300 $PY -m pytest -q -p no:cacheprovider -n 6 -m "not slow" --junitxml="$OUT/junit.xml" tests 2>&1 \
  | tail -40 | tee "$OUT/pytest.txt" || true
grep -qE "^[0-9]+ passed|^[0-9]+ passed.*" "$OUT/pytest.txt" && ! grep -qE "[0-9]+ (failed|error)" "$OUT/pytest.txt" || fail "tests"

step "compute-sanitizer (memcheck, racecheck) over every CUDA op"
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 20 \
    $PY bench/sanitize_ops.py > "$OUT/sanitizer-$tool.txt" 2>&1
  rc=$?
  tail -5 "$OUT/sanitizer-$tool.txt"
  [ $rc -eq 0 ] || fail "compute-sanitizer $tool (rc=$rc)"
done

step "benchmarks"
QUICKFLAG=""; [ "${QUICK:-0}" = 1 ] && QUICKFLAG="--quick"
for b in nf4 lora optim fused; do
  [ -f bench/$b.py ] || continue
  echo "--- bench/$b.py"
  timeout 150 $PY bench/$b.py --device cuda $QUICKFLAG --json "$OUT/$b.json" > "$OUT/bench-$b.txt" 2>&1 \
    || fail "bench/$b.py"
  cat "$OUT/bench-$b.txt"
done

step "bench/train.py (whole LoRA/QLoRA steps vs PEFT and bitsandbytes + PEFT; 7B shapes, 4 layers, random weights)"
timeout 420 $PY bench/train.py --device cuda --layers ${TRAIN_LAYERS:-4} --steps 3 --rounds 1 --timeout 180 \
  --workdir /tmp/lorart-bench-train --json "$OUT/train.json" > "$OUT/bench-train.txt" 2>&1 || fail "bench/train.py"
cat "$OUT/bench-train.txt"

step "summary"
{
  echo "## $(date -u +%F) — ${DEVICE:-unknown device} (bench/gpu_check.sh)"
  echo
  echo '```'
  $PY -m lorart info 2>&1
  echo '```'
  echo
  echo "Tests: \`$(grep -E "passed|failed|error" "$OUT/pytest.txt" 2>/dev/null | tail -1 | cut -c1-200)\`"
  for tool in memcheck racecheck; do
    echo "compute-sanitizer $tool: \`$(grep -E 'ERROR SUMMARY' "$OUT/sanitizer-$tool.txt" | tail -1)\`"
  done
  for b in nf4 lora optim fused train; do
    [ -f "$OUT/bench-$b.txt" ] || continue
    echo; echo "### bench/$b.py"; echo; echo '```'; cat "$OUT/bench-$b.txt"; echo '```'
  done
} > "$RESULTS"
# Keep what comes back under 8 files: fold the text logs into the log.
for f in "$OUT"/pytest.txt "$OUT"/sanitizer-*.txt "$OUT"/bench-*.txt; do
  [ -f "$f" ] && { echo "----- $(basename "$f")"; cat "$f"; } >> "$OUT/details.log" && rm -f "$f"
done
echo; echo "gpu_check status: $status"
exit $status
