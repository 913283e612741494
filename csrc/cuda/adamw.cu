// Fused AdamW on NVIDIA GPUs: the list's elements, all tensors end to end, in chunks of kChunk; a grid-stride
// loop over chunks, each block finding the chunk's first tensor once (a binary search in the table) and its
// threads walking the chunk with coalesced loads, stepping to the next tensor at its end. One read and one
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

template <typename M>
__device__ __forceinline__ void write_model(void* model, int64_t i, float value) {
  static_cast<M*>(model)[i] = from_float<M>(value);
}

__global__ void adamw_kernel(AdamWArgs a) {
  const int64_t n = a.tensors;
  const int64_t* row = a.table;
  const int64_t* start = row + kAdamWStart * n;
  const int64_t* numel = row + kAdamWNumel * n;
  for (int64_t chunk = blockIdx.x * kChunk; chunk < a.total; chunk += gridDim.x * kChunk) {
    const int64_t chunk_end = chunk + kChunk < a.total ? chunk + kChunk : a.total;
    int64_t t = tensor_holding(start, n, chunk);
    for (int64_t element = chunk + threadIdx.x; element < chunk_end; element += blockDim.x) {
      while (element >= start[t] + numel[t]) ++t;
      const int64_t i = element - start[t];
      float* p = reinterpret_cast<float*>(row[kAdamWParam * n + t]);
      const float* g = reinterpret_cast<const float*>(row[kAdamWGrad * n + t]);
      float* m = reinterpret_cast<float*>(row[kAdamWExpAvg * n + t]);
      float* v = reinterpret_cast<float*>(row[kAdamWExpAvgSq * n + t]);
      const float grad = g[i] * a.grad_scale;
      const float decayed = p[i] * a.param_scale;
      const float avg = m[i] + a.one_minus_beta1 * (grad - m[i]);
      const float avg_sq = v[i] * a.beta2 + a.one_minus_beta2 * grad * grad;
      const float denom = sqrtf(avg_sq) / a.bias_correction2_sqrt + a.eps;
      const float updated = decayed + a.neg_step_size * avg / denom;
      m[i] = avg;
      v[i] = avg_sq;
      p[i] = updated;
      void* model = reinterpret_cast<void*>(row[kAdamWModel * n + t]);
      if (model) {
        switch (static_cast<int>(row[kAdamWModelDtype * n + t])) {
          case kFloat32: write_model<float>(model, i, updated); break;
          case kBFloat16: write_model<__nv_bfloat16>(model, i, updated); break;
          case kFloat16: write_model<__half>(model, i, updated); break;
        }
      }
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
