#!/usr/bin/env bash
# `make gpu-check`: the one prepared check for a machine with a GPU (see
# csrc/cuda/README.md). Builds the extension with CUDA, then, with the fused
# kernels switched on (SFT_CUDA_FUSED=1):
#   1. the CUDA tests (python_tests/test_cuda_fused.py) and the device-axis
#      tests of test_quantize.py, test_lowrank.py and test_codecs.py;
#   2. compute-sanitizer memcheck and racecheck on bench/cuda_sanitize.py
#      ("sanitizer unavailable" when it is missing or refuses the device);
#   3. bench/kernels.py --device cuda.
# Every step's log goes to one folder, $OUT if set, else build/gpu-check, with
# SUMMARY.txt last. Exit status: non-zero if the build, a test or a sanitizer
# finding failed (an unavailable sanitizer or a failed benchmark does not).
# Sized for under 5 minutes on an H100 with 16 cores.
set -u
cd "$(dirname "$0")/.."
LOG="${OUT:-build/gpu-check}"
mkdir -p "$LOG"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 SFT_CUDA_FUSED=1 MAX_JOBS="${MAX_JOBS:-16}"
SUMMARY="$LOG/SUMMARY.txt"
: >"$SUMMARY"
status=0
note() { echo "$*" | tee -a "$SUMMARY"; }
# step NAME LOGFILE CMD...: runs CMD with a time limit, logs it, records PASS/FAIL.
step() {
  local name=$1 log=$2 limit=$3; shift 3
  local t0=$SECONDS
  timeout "$limit" "$@" >"$LOG/$log" 2>&1
  local rc=$?
  note "$( [ $rc -eq 0 ] && echo PASS || echo "FAIL (rc=$rc)" ) $name [$((SECONDS - t0)) s] -> $log: $(tail -n 1 "$LOG/$log")"
  return $rc
}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  note "gpu-check: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1)); nothing to check"
  exit 2
fi
note "device: $("$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, {p.multi_processor_count} SMs, torch {torch.__version__}, CUDA {torch.version.cuda}")')"
note "nvcc: $(nvcc --version 2>/dev/null | tail -n 1)"

step build build.log 240 "$PY" -m pip install --no-deps --no-build-isolation -e . || { note "RESULT: FAIL (build)"; exit 1; }
grep -q "building CPU + CUDA" "$LOG/build.log" || { note "FAIL build did not compile CUDA"; note "RESULT: FAIL"; exit 1; }

step "CUDA tests" tests.log 150 "$PY" -m pytest -q -x -p no:cacheprovider python_tests/test_cuda_fused.py \
  python_tests/test_quantize.py python_tests/test_lowrank.py python_tests/test_codecs.py -k cuda \
  || status=1

if command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck; do
    timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 99 "$PY" bench/cuda_sanitize.py \
      >"$LOG/sanitizer-$tool.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
      note "PASS compute-sanitizer $tool -> sanitizer-$tool.log: $(grep -m1 'ERROR SUMMARY' "$LOG/sanitizer-$tool.log")"
    elif [ $rc -eq 99 ]; then
      note "FAIL compute-sanitizer $tool found errors -> sanitizer-$tool.log"; status=1
    else
      note "SKIP compute-sanitizer $tool: sanitizer unavailable (rc=$rc) -> sanitizer-$tool.log: $(tail -n 1 "$LOG/sanitizer-$tool.log")"
    fi
  done
else
  note "SKIP compute-sanitizer: sanitizer unavailable (not on PATH)"
fi

step "CUDA benchmark" bench.log 120 "$PY" bench/kernels.py --device cuda --repeat 10 --json "$LOG/kernels_cuda.json" \
  || note "(the benchmark failing does not fail the check)"

note "RESULT: $( [ $status -eq 0 ] && echo PASS || echo FAIL )"
exit $status
