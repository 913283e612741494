// Rotary embeddings on NVIDIA GPUs: a grid-stride loop over tokens, one block per token at a time; the
// block's threads walk the (head, pair) index of q then k so neighbouring threads touch neighbouring
// elements. cos/sin come from the caller's fp32 table (L1/L2 resident). fp32 math for every dtype.
#include "cuda/cuda_types.cuh"
#include "rotary.h"

namespace pytrain::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 30;

// Rotates one (x1, x2) pair of head `head` of one token; in and out may be the same memory.
template <typename T, bool kInterleaved>
__device__ __forceinline__ void rotate_pair(const T* in, T* out, int head, int i, int dim, float c, float s) {
  const int i1 = head * dim + (kInterleaved ? 2 * i : i);
  const int i2 = i1 + (kInterleaved ? 1 : dim / 2);
  const float x1 = to_float(in[i1]), x2 = to_float(in[i2]);
  out[i1] = from_float<T>(x1 * c - x2 * s);
  out[i2] = from_float<T>(x2 * c + x1 * s);
}

template <typename T, bool kInterleaved>
__global__ void rotary_kernel(RotaryArgs a) {
  // Within a token, indices fit in int (Python caps head_dim and the head counts): 32-bit division is cheap.
  const int dim = static_cast<int>(a.head_dim), half = dim / 2;
  const int q_pairs = static_cast<int>(a.q_heads) * half, pairs = static_cast<int>(a.q_heads + a.k_heads) * half;
  const int64_t tokens = a.batch * a.seq;
  const float sign = a.inverse ? -1.f : 1.f;
  for (int64_t token = blockIdx.x; token < tokens; token += gridDim.x) {
    const int64_t b = token / a.seq, s = token % a.seq;
    const int64_t position = a.positions ? a.positions[b * a.positions_stride_batch + s] : s;
    const float* cos = a.cos_sin + position * a.head_dim;
    const T* q_in = static_cast<const T*>(a.q_in) + b * a.q_in_stride_batch + s * a.q_in_stride_seq;
    T* q_out = static_cast<T*>(a.q_out) + b * a.q_out_stride_batch + s * a.q_out_stride_seq;
    const T* k_in = static_cast<const T*>(a.k_in) + b * a.k_in_stride_batch + s * a.k_in_stride_seq;
    T* k_out = static_cast<T*>(a.k_out) + b * a.k_out_stride_batch + s * a.k_out_stride_seq;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
      const bool is_q = p < q_pairs;
      const int local = is_q ? p : p - q_pairs;
      const int head = local / half, i = local % half;
      const float c = __ldg(cos + i), sn = sign * __ldg(cos + half + i);
      if (is_q) {
        rotate_pair<T, kInterleaved>(q_in, q_out, head, i, dim, c, sn);
      } else {
        rotate_pair<T, kInterleaved>(k_in, k_out, head, i, dim, c, sn);
      }
    }
  }
}

template <typename T>
void launch(const RotaryArgs& a) {
  const int64_t tokens = a.batch * a.seq;
  const unsigned blocks = static_cast<unsigned>(tokens < kMaxBlocks ? tokens : kMaxBlocks);
  auto stream = static_cast<cudaStream_t>(a.stream);
  if (a.interleaved) {
    rotary_kernel<T, true><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    rotary_kernel<T, false><<<blocks, kThreads, 0, stream>>>(a);
  }
  check_launch("rotary");
}

}  // namespace

void rotary(const RotaryArgs& a) {
  if (a.batch * a.seq == 0 || a.q_heads + a.k_heads == 0) return;
  DeviceGuard guard(a.device);
  switch (a.dtype) {
    case kFloat32: return launch<float>(a);
    case kBFloat16: return launch<__nv_bfloat16>(a);
    case kFloat16: return launch<__half>(a);
  }
  bad_dtype("rotary", a.dtype);
}

}  // namespace pytrain::cuda
