// Rotary embeddings on the CPU: tokens split over threads; per token one cos/sin table row (fp32) is read
// once and applied to every q and k head. fp32 math, one rounding to the output dtype.
// Python validates, allocates and builds the table (pytrain/kernels/rotary.py); this file only computes.
#include "rotary.h"

#include "cpu/cpu_types.h"

namespace pytrain::cpu {
namespace {

constexpr int64_t kMinElementsPerThread = 1 << 15;

// Rotates `heads` consecutive head vectors of one token: out = in * cos +- rotate_half(in) * sin.
// in and out may be the same memory (in-place): every element is read and written by one iteration only.
template <typename T, bool kInterleaved>
__attribute__((always_inline)) inline void rotate_heads(const T* in, T* out, int64_t heads, int64_t dim,
                                                        const float* __restrict__ cos, const float* __restrict__ sin) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const T* x = in + h * dim;
    T* y = out + h * dim;
    if constexpr (kInterleaved) {
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = to_float(x[2 * i]), x2 = to_float(x[2 * i + 1]);
        y[2 * i] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
        y[2 * i + 1] = from_float<T>(x2 * cos[i] + x1 * sin[i]);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
        y[i] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
        y[i + half] = from_float<T>(x2 * cos[i] + x1 * sin[i]);
      }
    }
  }
}

template <typename T, bool kInterleaved>
__attribute__((always_inline)) inline void rotate_tokens(const RotaryArgs& a, int64_t begin, int64_t end) {
  const int64_t dim = a.head_dim, half = dim / 2;
  float neg_sin[4096];  // inverse: sin(-angle) = -sin(angle); head_dim <= 8192 is checked in Python
  for (int64_t token = begin; token < end; ++token) {
    const int64_t b = token / a.seq, s = token % a.seq;
    const int64_t position = a.positions ? a.positions[b * a.positions_stride_batch + s] : s;
    const float* cos = a.cos_sin + position * dim;
    const float* sin = cos + half;
    if (a.inverse) {
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) neg_sin[i] = -sin[i];
      sin = neg_sin;
    }
    rotate_heads<T, kInterleaved>(static_cast<const T*>(a.q_in) + b * a.q_in_stride_batch + s * a.q_in_stride_seq,
                                  static_cast<T*>(a.q_out) + b * a.q_out_stride_batch + s * a.q_out_stride_seq,
                                  a.q_heads, dim, cos, sin);
    rotate_heads<T, kInterleaved>(static_cast<const T*>(a.k_in) + b * a.k_in_stride_batch + s * a.k_in_stride_seq,
                                  static_cast<T*>(a.k_out) + b * a.k_out_stride_batch + s * a.k_out_stride_seq,
                                  a.k_heads, dim, cos, sin);
  }
}

#define PYTRAIN_ROTARY_VARIANT(NAME, T)                                                                  \
  PYTRAIN_CLONES void half_##NAME(const RotaryArgs& a, int64_t b, int64_t e) { rotate_tokens<T, false>(a, b, e); } \
  PYTRAIN_CLONES void interleaved_##NAME(const RotaryArgs& a, int64_t b, int64_t e) { rotate_tokens<T, true>(a, b, e); }
PYTRAIN_ROTARY_VARIANT(f32, float)
PYTRAIN_ROTARY_VARIANT(bf16, bf16)
PYTRAIN_ROTARY_VARIANT(f16, fp16)
#undef PYTRAIN_ROTARY_VARIANT

using RotateFn = void (*)(const RotaryArgs&, int64_t, int64_t);

RotateFn pick(const RotaryArgs& a) {
  switch (a.dtype) {
    case kFloat32: return a.interleaved ? interleaved_f32 : half_f32;
    case kBFloat16: return a.interleaved ? interleaved_bf16 : half_bf16;
    case kFloat16: return a.interleaved ? interleaved_f16 : half_f16;
  }
  bad_dtype("rotary", a.dtype);
}

}  // namespace

void rotary(const RotaryArgs& a) {
  if (a.head_dim / 2 > 4096) throw std::invalid_argument("rotary: head_dim above 8192");
  RotateFn fn = pick(a);
  const int64_t tokens = a.batch * a.seq;
  const int64_t per_token = (a.q_heads + a.k_heads) * a.head_dim;
  const int64_t min_tokens = kMinElementsPerThread / (per_token > 0 ? per_token : 1) + 1;
  parallel_for(tokens, a.parallelism, min_tokens, [&](int64_t b, int64_t e, int) { fn(a, b, e); });
}

}  // namespace pytrain::cpu
