// RMSNorm on the CPU: y = x / sqrt(mean(x^2) + eps) * w, rows split over threads, fp32 accumulation.
// With a residual, the input is first summed: s = x + residual (rounded to x's dtype, as an eager
// `x + residual` would be), s is written out for the next residual connection and normalized.
// Python validates and allocates (pytrain/kernels/rms_norm.py); this file only computes.
#include "rms_norm.h"

#include <cmath>
#include <memory>
#include <type_traits>

#include "cpu/cpu_types.h"
#include "cpu/stream_store.h"
#include "cpu/vec_avx2.h"

namespace pytrain::cpu {
namespace {

constexpr int64_t kMinElementsPerThread = 1 << 15;

// Row loops over [i, n), fp32 accumulation: the generic ones (the path for CPUs without AVX2) and AVX2
// ones that cover the longest prefix of whole steps and hand the rest to the generic loop. Per element
// both compute the same expression in the same order (bf16 and fp16 round alike), so they differ only in
// how a sum of squares is split into partial sums.
template <typename T>
__attribute__((always_inline)) inline float sum_squares(const T* x, int64_t i, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = i; j < n; ++j) {
    const float v = to_float(x[j]);
    sum += v * v;
  }
  return sum;
}

// s = x + r rounded to T; returns the sum of squares of that rounded s.
template <typename T>
__attribute__((always_inline)) inline float add_sum_squares(const T* x, const T* r, T* s, int64_t i, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = i; j < n; ++j) {
    s[j] = from_float<T>(to_float(x[j]) + to_float(r[j]));
    const float v = to_float(s[j]);
    sum += v * v;
  }
  return sum;
}

// y = x * rstd * w.
template <typename T, typename W>
__attribute__((always_inline)) inline void normalize(const T* x, const W* w, T* y, int64_t i, int64_t n, float rstd) {
#pragma omp simd
  for (int64_t j = i; j < n; ++j) y[j] = from_float<T>(to_float(x[j]) * rstd * to_float(w[j]));
}

// 32 elements a step in four independent accumulators: one FMA chain waits 4 cycles per step, where the
// loads and conversions of a step take one or two.
template <typename T>
PYTRAIN_AVX2 float sum_squares_avx2(const T* x, int64_t n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int k = 0; k < 2; ++k) {
      const avx2::F32x16 v = avx2::load16(x + i + 16 * k);
      acc[2 * k] = _mm256_fmadd_ps(v.a, v.a, acc[2 * k]);
      acc[2 * k + 1] = _mm256_fmadd_ps(v.b, v.b, acc[2 * k + 1]);
    }
  }
  const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  return avx2::sum8(sum) + sum_squares(x, i, n);
}

// The rounded sum is read back from the store just made (store-to-load forwarding: no memory traffic).
template <typename T>
PYTRAIN_AVX2 float add_sum_squares_avx2(const T* x, const T* r, T* s, int64_t n) {
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const avx2::F32x16 a = avx2::load16(x + i), b = avx2::load16(r + i);
    avx2::store16(s + i, {_mm256_add_ps(a.a, b.a), _mm256_add_ps(a.b, b.b)});
    const avx2::F32x16 v = avx2::load16(s + i);
    acc[0] = _mm256_fmadd_ps(v.a, v.a, acc[0]);
    acc[1] = _mm256_fmadd_ps(v.b, v.b, acc[1]);
  }
  return avx2::sum8(_mm256_add_ps(acc[0], acc[1])) + add_sum_squares(x, r, s, i, n);
}

// The weight as fp32 laid out as avx2::load16<T> lays out the elements it meets, for each whole block of
// 16 (the rest of a row takes the generic loop, with w itself): converted once per call, not per row.
// fp32 weights in that layout already are used as they are (lanes stays empty).
template <typename T, typename W>
const float* weight_lanes(const W* w, int64_t n, std::unique_ptr<float[]>& lanes) {
  if constexpr (std::is_same_v<W, float> && avx2::kInOrder<T>) return w;
  lanes.reset(new float[n]);
  for (int64_t i = 0; i + 16 <= n; i += 16) {
    for (int k = 0; k < 16; ++k) lanes[i + k] = to_float(w[i + avx2::lane_source<T>(k)]);
  }
  return lanes.get();
}

// y = x * rstd * w (kStream: with non-temporal stores, to a 32-byte aligned y); w_lanes: weight_lanes of
// w, from the same offset. Meanwhile the next row's inputs (next, next2, where not null) are fetched into
// L2, a line for each line of x: the hardware prefetcher alone leaves the next row's first pass waiting
// on memory, while this one runs out of L1.
template <bool kStream, typename T, typename W>
PYTRAIN_AVX2 void normalize_avx2(const T* x, const float* w_lanes, const W* w, T* y, int64_t n, float rstd,
                                 const T* next, const T* next2) {
  const __m256 r = _mm256_set1_ps(rstd);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    if (next) _mm_prefetch(reinterpret_cast<const char*>(next + i), _MM_HINT_T1);
    if (next2) _mm_prefetch(reinterpret_cast<const char*>(next2 + i), _MM_HINT_T1);
    const avx2::F32x16 v = avx2::load16(x + i);
    const __m256 wa = _mm256_loadu_ps(w_lanes + i), wb = _mm256_loadu_ps(w_lanes + i + 8);
    const avx2::F32x16 out = {_mm256_mul_ps(_mm256_mul_ps(v.a, r), wa), _mm256_mul_ps(_mm256_mul_ps(v.b, r), wb)};
    avx2::store16<kStream>(y + i, out);
  }
  normalize(x, w, y, i, n, rstd);
}

template <typename T, typename W, bool kResidual, bool kAvx2>
__attribute__((always_inline)) inline void forward_rows(const RMSNormArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.hidden;
  const W* w = static_cast<const W*>(a.weight);
  std::unique_ptr<float[]> lanes;
  const float* w_lanes = nullptr;
  if constexpr (kAvx2) w_lanes = weight_lanes<T>(w, n, lanes);
  // The residual sum is read back at once (in cache), so it keeps regular stores; y may stream.
  const bool stream = a.rows * n * static_cast<int64_t>(sizeof(T)) >= kStreamMinBytes;
  for (int64_t row = begin; row < end; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * n;
    const T* r = kResidual ? static_cast<const T*>(a.residual) + row * n : nullptr;
    const bool last = row + 1 == end;
    const T* next_x = last ? nullptr : x + n;
    const T* next_r = kResidual && !last ? r + n : nullptr;
    T* y = static_cast<T*>(a.y) + row * n;
    float sum_sq;
    if constexpr (kResidual) {
      T* s = static_cast<T*>(a.residual_out) + row * n;
      sum_sq = kAvx2 ? add_sum_squares_avx2(x, r, s, n) : add_sum_squares(x, r, s, 0, n);
      x = s;  // normalize the (rounded) sum, still in cache
    } else {
      sum_sq = kAvx2 ? sum_squares_avx2(x, n) : sum_squares(x, 0, n);
    }
    const float rstd = 1.f / std::sqrt(sum_sq / static_cast<float>(n) + a.eps);
    if (a.rstd) a.rstd[row] = rstd;
    // Streaming straight from the registers where the row allows it (32-byte aligned: any hidden that is a
    // multiple of 16, in a fresh tensor) skips the L1 block's second pass: a quarter of the bf16 time. Streamed
    // blocks are whole multiples of 16 elements long, so each starts a block of w_lanes.
    store_row_direct_or_blocks<kAvx2>(y, n, stream, [&](auto streamed, T* out, int64_t first, int64_t len) {
      if constexpr (kAvx2) {
        normalize_avx2<decltype(streamed)::value>(x + first, w_lanes + first, w + first, out, len, rstd,
                                                  next_x ? next_x + first : nullptr, next_r ? next_r + first : nullptr);
      } else {
        normalize(x + first, w + first, out, 0, len, rstd);
      }
    });
  }
}

// dx = rstd * (g - x_hat * mean(g * x_hat)) with g = dy * w, plus the gradient reaching the residual
// output when there is one (it flows straight to both summands); dw accumulates dy * x_hat per worker.
template <typename T, typename W, bool kResidual>
__attribute__((always_inline)) inline void backward_rows(const RMSNormArgs& a, int64_t begin, int64_t end, int worker) {
  const int64_t n = a.hidden;
  const W* w = static_cast<const W*>(a.weight);
  float* dw = a.dweight_partial + worker * n;
  for (int64_t row = begin; row < end; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * n;
    const T* dy = static_cast<const T*>(a.dy) + row * n;
    const T* ds = kResidual ? static_cast<const T*>(a.dresidual_out) + row * n : nullptr;
    T* dx = static_cast<T*>(a.dx) + row * n;
    const float rstd = a.rstd[row];
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < n; ++i) dot += to_float(dy[i]) * to_float(w[i]) * to_float(x[i]);
    const float mean_dot = dot * rstd / static_cast<float>(n);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float x_hat = to_float(x[i]) * rstd;
      const float g = to_float(dy[i]);
      float grad = rstd * (g * to_float(w[i]) - x_hat * mean_dot);
      if constexpr (kResidual) grad += to_float(ds[i]);
      dx[i] = from_float<T>(grad);
      dw[i] += g * x_hat;
    }
  }
}

// forward_NAME: the generic loops, for CPUs without AVX2 (target clones there gain nothing).
// forward_avx2_NAME: the AVX2 loops.
#define PYTRAIN_RMS_NORM_VARIANT(NAME, T, W)                                                           \
  void forward_##NAME(const RMSNormArgs& a, int64_t b, int64_t e) {                                    \
    a.residual ? forward_rows<T, W, true, false>(a, b, e) : forward_rows<T, W, false, false>(a, b, e); \
  }                                                                                                    \
  PYTRAIN_AVX2 void forward_avx2_##NAME(const RMSNormArgs& a, int64_t b, int64_t e) {                  \
    a.residual ? forward_rows<T, W, true, true>(a, b, e) : forward_rows<T, W, false, true>(a, b, e);   \
  }                                                                                                    \
  PYTRAIN_CLONES void backward_##NAME(const RMSNormArgs& a, int64_t b, int64_t e, int k) {             \
    a.dresidual_out ? backward_rows<T, W, true>(a, b, e, k) : backward_rows<T, W, false>(a, b, e, k);  \
  }
PYTRAIN_RMS_NORM_VARIANT(f32, float, float)
PYTRAIN_RMS_NORM_VARIANT(bf16, bf16, bf16)
PYTRAIN_RMS_NORM_VARIANT(bf16_wf32, bf16, float)
PYTRAIN_RMS_NORM_VARIANT(f16, fp16, fp16)
PYTRAIN_RMS_NORM_VARIANT(f16_wf32, fp16, float)
#undef PYTRAIN_RMS_NORM_VARIANT

using ForwardFn = void (*)(const RMSNormArgs&, int64_t, int64_t);
using BackwardFn = void (*)(const RMSNormArgs&, int64_t, int64_t, int);

template <typename Fn>
Fn pick(const RMSNormArgs& a, Fn f32, Fn bf, Fn bf_w32, Fn h, Fn h_w32) {
  const bool w32 = a.weight_dtype == kFloat32;
  if (!w32 && a.weight_dtype != a.x_dtype) bad_dtype("rms_norm weight", a.weight_dtype);
  switch (a.x_dtype) {
    case kFloat32: return f32;
    case kBFloat16: return w32 ? bf_w32 : bf;
    case kFloat16: return w32 ? h_w32 : h;
  }
  bad_dtype("rms_norm", a.x_dtype);
}

}  // namespace

void rms_norm_forward(const RMSNormArgs& a) {
  ForwardFn fn = avx2::enabled() ? pick<ForwardFn>(a, forward_avx2_f32, forward_avx2_bf16, forward_avx2_bf16_wf32,
                                                     forward_avx2_f16, forward_avx2_f16_wf32)
                                   : pick<ForwardFn>(a, forward_f32, forward_bf16, forward_bf16_wf32, forward_f16,
                                                     forward_f16_wf32);
  const int64_t min_rows = kMinElementsPerThread / a.hidden + 1;
  parallel_for(a.rows, a.parallelism, min_rows, [&](int64_t b, int64_t e, int) { fn(a, b, e); });
}

void rms_norm_backward(const RMSNormArgs& a) {
  BackwardFn fn = pick<BackwardFn>(a, backward_f32, backward_bf16, backward_bf16_wf32, backward_f16, backward_f16_wf32);
  const int64_t min_rows = kMinElementsPerThread / a.hidden + 1;
  parallel_for(a.rows, a.parallelism, min_rows, [&](int64_t b, int64_t e, int k) { fn(a, b, e, k); });
}

}  // namespace pytrain::cpu
