#!/usr/bin/env bash
# The prepared check for a lent GPU machine (H100/H200, no internet): build pytrain with its CUDA
# kernels, run the test suite (the CUDA tests run there) and the benchmarks. Results go to $OUT
# (./gpu-out when unset): nvidia-smi.txt, env.txt, build.txt, tests.txt, bench.txt, bench.json.
# Budget: well under 10 minutes; each step has its own timeout. A failing test step does not stop
# the benchmarks (device time is scarce); the script still exits non-zero at the end.
#
#   bash bench/gpu/run.sh                 # from the repository root
#   BENCH_ARGS="-k cuda" bash bench/gpu/run.sh   # extra pytest arguments for the bench step
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
status=0

nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
{
  python -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0))"
  nvcc --version | tail -n 2
  nproc
} 2>&1 | tee "$OUT/env.txt"

# sm_90 only (H100/H200) unless told otherwise: halves the CUDA compile time.
export PYTRAIN_CUDA=1 PYTRAIN_CUDA_ARCHS="${PYTRAIN_CUDA_ARCHS:-90}"
timeout 300 python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tee "$OUT/build.txt"
python -c "import pytrain._C, pytrain._C_cuda as c; print('pytrain._C_cuda sees', c.device_count(), 'GPU(s)')" 2>&1 | tee -a "$OUT/build.txt"

timeout 240 python -m pytest tests -x -q -rs 2>&1 | tee "$OUT/tests.txt" || status=$?
echo "tests exit status: $status" | tee -a "$OUT/tests.txt"

bench_status=0
# shellcheck disable=SC2086  # BENCH_ARGS is a list of pytest arguments
timeout 300 python -m pytest bench -q --benchmark-json="$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt" || bench_status=$?
echo "bench exit status: $bench_status" | tee -a "$OUT/bench.txt"

[ "$status" -eq 0 ] && status=$bench_status
exit "$status"
