#!/usr/bin/env bash
# The prepared check for a lent GPU machine (H100/H200, no internet), at most 8 minutes in all: build pytrain with
# its CUDA kernels, run the GPU tests (CUDA extension and Triton: -m "cuda or triton"), one GPU's 1B training run
# and its step breakdown, and pytrain's CUDA benchmark rows (with SDPA flash for attention), then print a one-screen summary. Every step
# has its own timeout (the T_* budget below sums to 480 s with the grace periods); a failing step never stops the
# later ones, and the script exits non-zero at the end if any failed. Without a GPU (no NVIDIA device file and no
# device in nvidia-smi) it stops at once with "no GPU"; torch's own look at the GPU runs beside the build.
#
# $OUT (./gpu-out when unset) receives few, flat files: env.txt, build.txt (the build's last lines), tests.txt,
# train-1b.txt (the step lines only), step-profile.txt (the 1B step's breakdown), bench.txt, bench.json, summary.txt.
# The 1B run's folder, the full build and training logs and the JUnit file live in $RUN_DIR (outside $OUT).
#
#   bash bench/gpu/run.sh               # from anywhere: it runs in the repository root
set -uo pipefail
cd "$(dirname "$0")/../.."

# The budget, seconds. Steps stopped by SIGINT (pytest still writes its JUnit/benchmark JSON) get GRACE more
# before SIGKILL. Sum: T_SMI + T_BUILD + T_TESTS + T_TRAIN + T_PROFILE + T_BENCH + T_SUMMARY + 4 * GRACE = 480;
# T_PROBE (at most T_BUILD) runs beside the build, so it adds nothing.
T_SMI=15
T_PROBE=90
T_BUILD=120
T_TESTS=120
T_TRAIN=75
T_PROFILE=30
T_BENCH=70
T_SUMMARY=10
GRACE=10

OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RUN_DIR="${RUN_DIR:-${TMPDIR:-/tmp}/pytrain-gpu-run}"
mkdir -p "$RUN_DIR"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
case "$RUN_DIR/" in "$OUT"/*) echo "RUN_DIR ($RUN_DIR) must lie outside OUT ($OUT)" >&2; exit 2 ;; esac
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTRAIN_CUDA_ARCHS="${PYTRAIN_CUDA_ARCHS:-90}"  # H100/H200 only: halves the CUDA compile time

no_gpu() {
  echo "no GPU: $1 -- this script needs an NVIDIA GPU (run it on the lent GPU machine)" | tee -a "$OUT/env.txt" >&2
  exit 3
}

# Fail fast: a GPU shows as /dev/nvidia0.. and in nvidia-smi, which answers in well under a second where there is one.
: >"$OUT/env.txt"
device_files=$(ls /dev/nvidia[0-9]* 2>/dev/null)
if command -v nvidia-smi >/dev/null; then
  timeout "$T_SMI" nvidia-smi >>"$OUT/env.txt" 2>&1 || [ -n "$device_files" ] || no_gpu "nvidia-smi found no device"
elif [ -z "$device_files" ]; then
  no_gpu "no /dev/nvidia* device file and no nvidia-smi"
fi

# torch's view: a cold `import torch, triton` plus CUDA's initialisation can take a minute on a fresh machine, so it
# runs beside the build (which needs neither) with its own T_PROBE, and is awaited after it. Running out of time
# there is a slow start, not a missing GPU: the run goes on; torch positively seeing no CUDA device stops it.
timeout "$T_PROBE" python3 - >"$RUN_DIR/probe.txt" 2>&1 <<'EOF' &
import sys, torch, triton
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
if not torch.cuda.is_available():
    sys.exit(1)
print("gpus:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
EOF
probe=$!
{ nvcc --version | tail -n 1; echo "cpus: $(nproc)"; } >>"$OUT/env.txt" 2>&1

failed=()
step() {  # step NAME STATUS: records a failed step
  [ "$2" -eq 0 ] || failed+=("$1 (exit $2)")
}

# PYTRAIN_CUDA unset: a failing CUDA compile is skipped with a warning, so pytrain._C and pytrain.triton still
# install and the Triton tests and the 1B run go ahead (the CUDA tests then fail, naming the missing module).
timeout "$T_BUILD" python3 -m pip install --no-build-isolation --no-deps -e . >"$RUN_DIR/build.log" 2>&1
step build $?
python3 -c "import pytrain._C_cuda as c; print('pytrain._C_cuda built, sees', c.device_count(), 'GPU(s)')" \
  >>"$RUN_DIR/build.log" 2>&1 || { echo "pytrain._C_cuda is missing: the CUDA build failed" >>"$RUN_DIR/build.log"; step cuda-extension 1; }
tail -n 40 "$RUN_DIR/build.log" >"$OUT/build.txt"

wait "$probe"
probe_status=$?
cat "$RUN_DIR/probe.txt" >>"$OUT/env.txt"
case "$probe_status" in
  0) ;;
  124) echo "torch's CUDA probe did not finish in $T_PROBE s: a slow start, not a missing GPU; going on" >>"$OUT/env.txt" ;;
  *) no_gpu "torch sees no CUDA device (probe exit $probe_status)" ;;
esac

timeout -s INT -k "$GRACE" "$T_TESTS" python3 -m pytest tests -m "cuda or triton" -q -rfE -p no:cacheprovider \
  --junitxml="$RUN_DIR/tests.xml" >"$OUT/tests.txt" 2>&1
step tests $?

# One GPU's tokens/s and MFU on the ~1B config (bf16, flash-attention, one rank), 12 steps.
timeout -s INT -k "$GRACE" "$T_TRAIN" python3 -m pytrain.train --config configs/1B.py --set data.total_steps=12 \
  "monitor.run_folder='$RUN_DIR/runs'" >"$RUN_DIR/train-1b.log" 2>&1
train_status=$?
step train-1b "$train_status"
grep -E '^step [0-9]+/' "$RUN_DIR/train-1b.log" >"$OUT/train-1b.txt"
[ "$train_status" -eq 0 ] || { echo "--- exit $train_status; the log's last lines:"; tail -n 15 "$RUN_DIR/train-1b.log"; } >>"$OUT/train-1b.txt"

# Where the 1B step's GPU time goes (GEMMs, attention, norms/rotary/activations, loss, copies, optimizer) and its MFU.
timeout -s INT -k "$GRACE" "$T_PROFILE" python3 -m pytest bench/test_step_profile.py -k "1b_cuda" -q -s \
  -p no:cacheprovider >"$OUT/step-profile.txt" 2>&1
step step-profile $?

# The CUDA rows of pytrain's kernels and of SDPA's flash backend (the summary's numbers; the CPU rows, the eager
# and torch.compile references and the gloo layout benchmarks are left out: they would not fit), cheapest files
# first. SIGINT at the limit: pytest-benchmark still writes the JSON of the rows it finished. AdamW's rows put
# pytrain's fused update beside torch.optim.AdamW(fused=True) (torch_fused).
# The MoE file comes last (its Triton GEMM autotunes on first use): its rows time grouped_mm's implementations
# (pytrain_torch = torch._grouped_mm, pytrain_triton, pytrain_loop) and the layer against the per-expert moe_loop.
# The isp / msp step rows (test_sequence_parallel_bench) need 2 GPUs or more and are skipped on one.
timeout -s INT -k "$GRACE" "$T_BENCH" python3 -m pytest bench/test_rms_norm_bench.py bench/test_swiglu_bench.py \
  bench/test_adamw_bench.py bench/test_rotary_bench.py bench/test_flash_attn_bench.py \
  bench/test_cross_entropy_bench.py bench/test_ring_attention_bench.py bench/test_moe_kernels_bench.py \
  bench/test_sequence_parallel_bench.py \
  -k "cuda and (pytrain or sdpa_flash or moe_loop or torch_fused or tensor_mode_step)" -q \
  -p no:cacheprovider --benchmark-json="$OUT/bench.json" --benchmark-max-time=0.2 >"$OUT/bench.txt" 2>&1
step bench $?

timeout "$T_SUMMARY" python3 bench/gpu/summary.py --junit "$RUN_DIR/tests.xml" --bench "$OUT/bench.json" \
  --train "$OUT/train-1b.txt" --env "$OUT/env.txt" >"$OUT/summary.txt" 2>&1
step summary $?
cat "$OUT/summary.txt"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed steps: ${failed[*]}" | tee -a "$OUT/summary.txt"
  exit 1
fi
echo "all steps passed" | tee -a "$OUT/summary.txt"
