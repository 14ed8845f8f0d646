#!/usr/bin/env bash
# GPU check: on a machine with a CUDA GPU and no network, one command that
#   1. builds genext for the visible GPU with all cores (pip, no build isolation, no downloads),
#   2. runs the whole test suite (CUDA tests included),
#   3. runs compute-sanitizer memcheck and racecheck over tools/cuda_smoke.py,
#   4. runs `genext bench` (JSON) and, with GENEXT_PYTEST_BENCH=1, the pytest-benchmark suite (off by
#      default: it repeats genext bench's cases and its torch.compile warm-ups, minutes on a lease),
# and prints a short summary table last. Logs and JSON go to $GENEXT_OUT (else $OUT, else
# ./gpu-check-out): at most 8 files (the device tool brings back 8), build.log (nvidia-smi first),
# info.txt, tests.log, sanitizer.log, bench.txt, bench.json, pytest-bench.log, pytest-bench.json.
# Exit status: non-zero if any step failed.
#
#   bash tools/gpu_check.sh            # everything
#   GENEXT_SKIP_BUILD=1 bash tools/gpu_check.sh   # reuse an existing build
#   GENEXT_CHECK_TESTS="tests/ops/test_flash_attention.py -m cuda" GENEXT_CHECK_OPS=attention \
#     bash tools/gpu_check.sh                      # one op: its tests, smoke cases and bench
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${GENEXT_OUT:-${OUT:-$PWD/gpu-check-out}}
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/{build.log,info.txt,tests.log,sanitizer.log,bench.txt,bench.json,pytest-bench.log,pytest-bench.json}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export GENEXT_TESTS=full  # the slow tests too
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}' + ('a' if c == (9, 0) else ''))")
  export TORCH_CUDA_ARCH_LIST
fi
declare -a SUMMARY=()
status=0
step() {  # step NAME LOGFILE CMD...
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  echo "== $name: $*" >>"$OUT_DIR/$log"
  "$@" >>"$OUT_DIR/$log" 2>&1
  local rc=$?
  tail -n 15 "$OUT_DIR/$log"
  SUMMARY+=("$(printf '%-22s %-5s %4ss  %s' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL)" $((SECONDS - t0)) "$log")")
  [ $rc = 0 ] || status=1
  return $rc
}

GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)
echo "gpu: $GPU" >"$OUT_DIR/build.log"
if [ -z "${GENEXT_SKIP_BUILD:-}" ]; then
  step build build.log env GENEXT_CUDA=ON $PY -m pip install --no-build-isolation --no-deps --no-index -v -e . \
    || { printf '%s\n' "${SUMMARY[@]}"; exit 1; }
fi
step info info.txt $PY -m genext info --json
OPS=${GENEXT_CHECK_OPS:-}
# shellcheck disable=SC2086
step tests tests.log $PY -m pytest ${GENEXT_CHECK_TESTS:-tests} -q -ra
step memcheck sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 1 $PY tools/cuda_smoke.py $OPS
step racecheck sanitizer.log compute-sanitizer --tool racecheck --error-exitcode 1 $PY tools/cuda_smoke.py $OPS
step bench bench.txt $PY -m genext bench ${OPS:+--op $OPS} --json "$OUT_DIR/bench.json"
if [ -n "${GENEXT_PYTEST_BENCH:-}" ]; then
  step pytest-benchmark pytest-bench.log $PY -m pytest benchmarks -q --benchmark-json="$OUT_DIR/pytest-bench.json" \
    --benchmark-columns=median,ops
fi

echo
echo "== genext GPU check: $GPU, arch $TORCH_CUDA_ARCH_LIST, $(date -u '+%Y-%m-%d %H:%M UTC'), logs in $OUT_DIR"
# the bench's tables, printed again from its JSON by each bench's own table layout
[ -f "$OUT_DIR/bench.json" ] && $PY -c "import sys; from genext.bench import print_saved; print_saved(sys.argv[1])" \
  "$OUT_DIR/bench.json" 2>/dev/null || true
printf '%s\n' "${SUMMARY[@]}"
exit $status
