#!/usr/bin/env bash
# The prepared check for a lent GPU machine (H100/H200, no internet): build pytrain with its CUDA
# kernels, run the test suite (the CUDA tests run there) and the benchmarks. Results go to $OUT
# (./gpu-out when unset): nvidia-smi.txt, env.txt, build.txt, tests.txt, train-1b.txt (configs/1B.py's step
# lines: one GPU's MFU), bench.txt, bench.json.
# Budget: about 6 minutes, under 10 in all cases (each step has its own timeout). A failing test step does not stop
# the benchmarks (device time is scarce); the script still exits non-zero at the end.
#
#   bash bench/gpu/run.sh                        # from anywhere: it runs in the repository root
#   BENCH_ARGS="-k cuda" bash bench/gpu/run.sh   # extra pytest arguments for the bench step
#   ALLOW_NO_GPU=1 bash bench/gpu/run.sh         # rehearse it on a machine without a GPU
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

{ nvidia-smi || echo "nvidia-smi failed"; } 2>&1 | tee "$OUT/nvidia-smi.txt"
{
  python -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
'gpus', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
  nvcc --version | tail -n 2
  echo "cpus: $(nproc)"
} 2>&1 | tee "$OUT/env.txt" || true
if [ "${ALLOW_NO_GPU:-0}" != 1 ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "torch sees no GPU: stopping here (the CUDA tests would all be skipped)" | tee -a "$OUT/env.txt"
  exit 1
fi

# sm_90 only (H100/H200) unless told otherwise: halves the CUDA compile time.
export PYTRAIN_CUDA=1 PYTRAIN_CUDA_ARCHS="${PYTRAIN_CUDA_ARCHS:-90}"
timeout 300 python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tee "$OUT/build.txt"
python -c "import pytrain._C, pytrain._C_cuda as c; print('pytrain._C_cuda sees', c.device_count(), 'GPU(s)')" \
  2>&1 | tee -a "$OUT/build.txt"

status=0
timeout 180 python -m pytest tests -x -q -rs 2>&1 | tee "$OUT/tests.txt" || status=$?
echo "tests exit status: $status" | tee -a "$OUT/tests.txt"

# One GPU's MFU on the ~1B config (bf16, flash-attention, ZeRO-1 off: one rank), 12 steps.
train_status=0
timeout 120 python -m pytrain.train --config configs/1B.py --set data.total_steps=12 "monitor.run_folder='$OUT/runs'" \
  2>&1 | tee "$OUT/train-1b.txt" || train_status=$?
echo "1B training exit status: $train_status" | tee -a "$OUT/train-1b.txt"

bench_status=0
# The layout benchmarks are CPU (gloo) runs: not here. 0.5 s per bench (GPU ops take microseconds:
# thousands of rounds) keeps the whole step to a few minutes,
# most of it torch.compile of the reference rows.
# shellcheck disable=SC2086  # BENCH_ARGS is a list of pytest arguments
timeout 200 python -m pytest bench -q --ignore=bench/test_parallel_bench.py --benchmark-json="$OUT/bench.json" --benchmark-max-time=0.5 ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/bench.txt" || bench_status=$?
echo "bench exit status: $bench_status" | tee -a "$OUT/bench.txt"

[ "$status" -eq 0 ] && status=$train_status
[ "$status" -eq 0 ] && status=$bench_status
exit "$status"
