// Cross-entropy on NVIDIA GPUs: one block per row. Pass 1 keeps an online (max, sum of exponentials)
// per thread over 16-byte vector loads, merged across the block; pass 2 (when a gradient is wanted)
// re-reads the row (L2-resident for one block's row) and writes the gradient. fp32 accumulation.
#include <cfloat>

#include "cross_entropy.h"
#include "cuda/cuda_types.cuh"

namespace pytrain::cuda {
namespace {

constexpr int kThreads = 512;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Max over the block; every thread gets the result. `shared` holds at least 32 floats.
__device__ __forceinline__ float block_max(float v, float* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : -FLT_MAX;
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// exp(x - m) with x = m = -inf giving 0 rather than NaN.
__device__ __forceinline__ float exp_shift(float x, float m) {
  return x == m && isinf(m) ? (m > 0 ? 1.f : 0.f) : __expf(x - m);
}

// grad = scale * (softmax * (1 + 2 z lse) - s / V - (1 - s) [j == t]) over one row; grad may alias x
// (each element is read and written by the same thread).
template <typename T, int N>
__device__ __forceinline__ void write_grad_row(const T* x, T* grad, int64_t vocab, int64_t target_index, float lse,
                                               float softmax_scale, float uniform, float target_coef) {
  const Vec<T, N>* xv = reinterpret_cast<const Vec<T, N>*>(x);
  Vec<T, N>* gv = reinterpret_cast<Vec<T, N>*>(grad);
  for (int64_t i = threadIdx.x; i < vocab / N; i += blockDim.x) {
    Vec<T, N> in = xv[i], out;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float g = __expf(to_float(in.v[k]) - lse) * softmax_scale - uniform;
      if (i * N + k == target_index) g -= target_coef;
      out.v[k] = from_float<T>(g);
    }
    gv[i] = out;
  }
}

template <typename T, int N>
__global__ void forward_kernel(CrossEntropyArgs a) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x, vocab = a.vocab;
  const T* x = static_cast<const T*>(a.logits) + row * vocab;
  const int64_t label = a.labels[row];
  const int64_t t = label - a.vocab_start;
  const bool in_shard = label != a.ignore_index && t >= 0 && t < vocab;
  const float target = in_shard ? to_float(x[t]) : 0.f;  // read before any thread overwrites x (in place)

  float m = -INFINITY, s = 0.f, sum = 0.f;
  const Vec<T, N>* xv = reinterpret_cast<const Vec<T, N>*>(x);
  for (int64_t i = threadIdx.x; i < vocab / N; i += blockDim.x) {
    const Vec<T, N> in = xv[i];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float v = to_float(in.v[k]);
      if (v > m) {
        s = s * exp_shift(m, v) + 1.f;
        m = v;
      } else {
        s += exp_shift(v, m);
      }
      sum += v;
    }
  }
  const float row_max = block_max(m, shared);
  const float sum_exp = block_sum(s * exp_shift(m, row_max), shared);  // also orders pass 1 before pass 2
  const float row_sum = a.label_smoothing != 0.f ? block_sum(sum, shared) : 0.f;

  if (a.partial_stats) {
    if (threadIdx.x == 0) {
      float* out = a.partial_stats + 4 * row;
      out[0] = row_max, out[1] = sum_exp, out[2] = target, out[3] = row_sum;
    }
    return;
  }
  T* grad = a.grad ? static_cast<T*>(a.grad) + row * vocab : nullptr;
  if (label == a.ignore_index) {
    if (threadIdx.x == 0) a.loss[row] = 0.f, a.lse[row] = 0.f;
    if (grad) {
      for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) grad[i] = from_float<T>(0.f);
    }
    return;
  }
  const float lse = row_max + logf(sum_exp), ls = a.label_smoothing;
  if (threadIdx.x == 0) {
    a.loss[row] = lse - (1.f - ls) * target - ls / static_cast<float>(a.total_vocab) * row_sum + a.z_loss * lse * lse;
    a.lse[row] = lse;
  }
  if (grad) {
    const float scale = a.grad_scale * (a.row_scale ? a.row_scale[row] : 1.f);
    write_grad_row<T, N>(x, grad, vocab, in_shard ? t : -1, lse, scale * (1.f + 2.f * a.z_loss * lse),
                         scale * ls / static_cast<float>(a.total_vocab), scale * (1.f - ls));
  }
}

template <typename T, int N>
__global__ void gradient_kernel(CrossEntropyArgs a) {
  const int64_t row = blockIdx.x, vocab = a.vocab;
  const T* x = static_cast<const T*>(a.logits) + row * vocab;
  T* grad = static_cast<T*>(a.grad) + row * vocab;
  const int64_t label = a.labels[row];
  if (label == a.ignore_index) {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) grad[i] = from_float<T>(0.f);
    return;
  }
  const int64_t t = label - a.vocab_start;
  const float lse = a.lse[row], ls = a.label_smoothing;
  const float scale = a.grad_scale * (a.row_scale ? a.row_scale[row] : 1.f);
  write_grad_row<T, N>(x, grad, vocab, t >= 0 && t < vocab ? t : -1, lse, scale * (1.f + 2.f * a.z_loss * lse),
                       scale * ls / static_cast<float>(a.total_vocab), scale * (1.f - ls));
}

template <typename T, int N>
void launch(const CrossEntropyArgs& a, bool forward) {
  const int64_t vectors = a.vocab / N;
  const int threads = vectors >= kThreads ? kThreads : static_cast<int>(((vectors + 31) / 32) * 32);
  auto stream = static_cast<cudaStream_t>(a.stream);
  if (forward) {
    forward_kernel<T, N><<<static_cast<unsigned>(a.rows), threads < 32 ? 32 : threads, 0, stream>>>(a);
  } else {
    gradient_kernel<T, N><<<static_cast<unsigned>(a.rows), threads < 32 ? 32 : threads, 0, stream>>>(a);
  }
  check_launch(forward ? "cross_entropy_forward" : "cross_entropy_gradient");
}

// 16-byte vectors when every row starts 16-byte aligned (vocab a multiple of the vector, aligned
// buffers); otherwise element by element.
template <typename T>
void launch_vectorized(const CrossEntropyArgs& a, bool forward) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = a.vocab % kVec == 0 && reinterpret_cast<uintptr_t>(a.logits) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(a.grad) % 16 == 0;
  if (aligned) return launch<T, kVec>(a, forward);
  launch<T, 1>(a, forward);
}

void dispatch(const CrossEntropyArgs& a, bool forward) {
  if (a.rows == 0) return;
  DeviceGuard guard(a.device);
  switch (a.logits_dtype) {
    case kFloat32: return launch_vectorized<float>(a, forward);
    case kBFloat16: return launch_vectorized<__nv_bfloat16>(a, forward);
    case kFloat16: return launch_vectorized<__half>(a, forward);
  }
  bad_dtype("cross_entropy", a.logits_dtype);
}

}  // namespace

void cross_entropy_forward(const CrossEntropyArgs& a) { dispatch(a, true); }
void cross_entropy_gradient(const CrossEntropyArgs& a) { dispatch(a, false); }

}  // namespace pytrain::cuda
