#!/usr/bin/env bash
# The CUDA backend's whole device check, in ONE device call of under 8 minutes:
#   build edgelm there (the cpu backend too: it is the parity reference), run the CUDA tests
#   on the GPU for real, parity against the CPU backend, and the benchmark; JSON and logs go
#   to $OUT (the device tool brings them back).
#
# Prepare here, once (PyPI is reachable here, not there):
#   bash benchmarks/gpu_wheels.sh           # edgelm's dependencies the device image lacks -> .whl/
# Then, through the device tool, with carry [".whl"] and timeout_s 560:
#   bash benchmarks/gpu_check.sh
# Rehearse it here, without a GPU (Triton's interpreter, the tiny test model):
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh --rehearse
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
rehearse=""
[ "${1:-}" = "--rehearse" ] && rehearse="--rehearse"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/summary.log"; }

if [ -z "$rehearse" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
  log "$(tr '\n' ' ' <"$OUT/gpu.txt")"
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >"$OUT/wheels.log" 2>&1 || { log "wheel install failed"; tail -5 "$OUT/wheels.log"; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # the native CPU kernels (the parity reference) for this host's ISA, built in place while
  # the CUDA tests run
  isa=avx2
  grep -q avx512_vnni /proc/cpuinfo && isa=avx512
  ( t0=$SECONDS
    EDGELM_BUILD_ISAS="scalar,$isa" "$py" setup.py build_ext --inplace -j 16 >"$OUT/build.log" 2>&1 \
      && log "built the native kernels ($isa) in $((SECONDS - t0)) s" || log "native build failed (see build.log)"
  ) &
  build=$!
  export TRITON_INTERPRET=0
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"

t0=$SECONDS
# (the sm_90 compile check needs no GPU: CI runs it)
# (the sm_90 compile check needs no GPU: CI runs it; the cpu-backend test needs the build)
timeout 200 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py tests/test_backend_contract.py \
  -k "cuda and not hopper and not cpu_backend_never" >"$OUT/tests.log" 2>&1
log "CUDA tests: rc=$? in $((SECONDS - t0)) s: $(tail -1 "$OUT/tests.log")"
[ -n "${build:-}" ] && wait "$build"

t0=$SECONDS
timeout 100 "$py" benchmarks/cuda_check.py parity --out "$OUT/parity.json" $rehearse >"$OUT/parity.log" 2>&1
log "parity: rc=$? in $((SECONDS - t0)) s"

t0=$SECONDS
timeout 220 "$py" benchmarks/cuda_check.py bench --quick --out "$OUT/bench.json" $rehearse >"$OUT/bench.log" 2>&1
log "bench: rc=$? in $((SECONDS - t0)) s"
grep '^{' "$OUT/bench.log" | cut -c1-400 | tee -a "$OUT/summary.log"
