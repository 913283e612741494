// Fused AdamW on NVIDIA GPUs: the list's elements, all tensors end to end, in chunks of kChunk; a grid-stride
// loop over chunks, each thread finding the chunk's first tensor (a binary search in the small, cached table)
// and walking the chunk with coalesced loads, stepping to the next tensor at its end. One read and one
// write of param and both moments (and the model copy) per element; fp32 math.
#include "adamw.h"
#include "cuda/cuda_types.cuh"

namespace pytrain::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = kThreads * 16;
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

__device__ __forceinline__ int64_t tensor_holding(const int64_t* start, int64_t tensors, int64_t element) {
  int64_t lo = 0, hi = tensors - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (start[mid] <= element) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// One tensor's columns of the table, loaded once per tensor a thread enters (not once per element).
struct Tensor {
  float* param;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  void* model;
  int model_dtype;
  int64_t start, end;
};

__device__ __forceinline__ Tensor load_tensor(const int64_t* row, int64_t n, int64_t t) {
  Tensor x;
  x.param = reinterpret_cast<float*>(row[kAdamWParam * n + t]);
  x.grad = reinterpret_cast<const float*>(row[kAdamWGrad * n + t]);
  x.exp_avg = reinterpret_cast<float*>(row[kAdamWExpAvg * n + t]);
  x.exp_avg_sq = reinterpret_cast<float*>(row[kAdamWExpAvgSq * n + t]);
  x.model = reinterpret_cast<void*>(row[kAdamWModel * n + t]);
  x.model_dtype = static_cast<int>(row[kAdamWModelDtype * n + t]);
  x.start = row[kAdamWStart * n + t];
  x.end = x.start + row[kAdamWNumel * n + t];
  return x;
}

__device__ __forceinline__ void update(const AdamWArgs& a, const Tensor& x, int64_t i) {
  const float grad = x.grad[i] * a.grad_scale;
  const float decayed = x.param[i] * a.param_scale;
  const float m = x.exp_avg[i], v = x.exp_avg_sq[i];
  const float avg = m + a.one_minus_beta1 * (grad - m);
  const float avg_sq = v * a.beta2 + a.one_minus_beta2 * grad * grad;
  const float denom = sqrtf(avg_sq) / a.bias_correction2_sqrt + a.eps;
  const float updated = decayed + a.neg_step_size * avg / denom;
  x.exp_avg[i] = avg;
  x.exp_avg_sq[i] = avg_sq;
  x.param[i] = updated;
  if (!x.model) return;
  switch (x.model_dtype) {  // checked by the caller (Python)
    case kFloat32: static_cast<float*>(x.model)[i] = updated; break;
    case kBFloat16: static_cast<__nv_bfloat16*>(x.model)[i] = from_float<__nv_bfloat16>(updated); break;
    case kFloat16: static_cast<__half*>(x.model)[i] = from_float<__half>(updated); break;
  }
}

__global__ void adamw_kernel(AdamWArgs a) {
  const int64_t n = a.tensors;
  for (int64_t chunk = blockIdx.x * kChunk; chunk < a.total; chunk += gridDim.x * kChunk) {
    const int64_t chunk_end = chunk + kChunk < a.total ? chunk + kChunk : a.total;
    int64_t t = tensor_holding(a.table + kAdamWStart * n, n, chunk);
    Tensor x = load_tensor(a.table, n, t);
    for (int64_t element = chunk + threadIdx.x; element < chunk_end; element += blockDim.x) {
      while (element >= x.end) x = load_tensor(a.table, n, ++t);
      update(a, x, element - x.start);
    }
  }
}

}  // namespace

void adamw_step(const AdamWArgs& a) {
  if (a.tensors == 0 || a.total == 0) return;
  DeviceGuard guard(a.device);
  const int64_t chunks = (a.total + kChunk - 1) / kChunk;
  const unsigned blocks = static_cast<unsigned>(chunks < kMaxBlocks ? chunks : kMaxBlocks);
  adamw_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(a);
  check_launch("adamw_step");
}

}  // namespace pytrain::cuda
