// RMSNorm on the CPU: y = x / sqrt(mean(x^2) + eps) * w, rows split over threads, fp32 accumulation.
// With a residual, the input is first summed: s = x + residual (rounded to x's dtype, as an eager
// `x + residual` would be), s is written out for the next residual connection and normalized.
// Python validates and allocates (pytrain/kernels/rms_norm.py); this file only computes.
#include "rms_norm.h"

#include <cmath>

#include "cpu/cpu_types.h"
#include "cpu/stream_store.h"

namespace pytrain::cpu {
namespace {

constexpr int64_t kMinElementsPerThread = 1 << 15;

template <typename T, typename W, bool kResidual>
__attribute__((always_inline)) inline void forward_rows(const RMSNormArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.hidden;
  const W* w = static_cast<const W*>(a.weight);
  // The residual sum is read back at once (in cache), so it keeps regular stores; y may stream.
  const bool stream = a.rows * n * static_cast<int64_t>(sizeof(T)) >= kStreamMinBytes;
  for (int64_t row = begin; row < end; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * n;
    T* y = static_cast<T*>(a.y) + row * n;
    float sum_sq = 0.f;
    if constexpr (kResidual) {
      const T* r = static_cast<const T*>(a.residual) + row * n;
      T* s = static_cast<T*>(a.residual_out) + row * n;
#pragma omp simd reduction(+ : sum_sq)
      for (int64_t i = 0; i < n; ++i) {
        const T sum = from_float<T>(to_float(x[i]) + to_float(r[i]));
        s[i] = sum;
        const float v = to_float(sum);
        sum_sq += v * v;
      }
      x = s;  // normalize the (rounded) sum, still in cache
    } else {
#pragma omp simd reduction(+ : sum_sq)
      for (int64_t i = 0; i < n; ++i) {
        const float v = to_float(x[i]);
        sum_sq += v * v;
      }
    }
    const float rstd = 1.f / std::sqrt(sum_sq / static_cast<float>(n) + a.eps);
    if (a.rstd) a.rstd[row] = rstd;
    store_row(y, n, stream, [&](int64_t i) { return from_float<T>(to_float(x[i]) * rstd * to_float(w[i])); });
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

#define PYTRAIN_RMS_NORM_VARIANT(NAME, T, W)                                                           \
  PYTRAIN_CLONES void forward_##NAME(const RMSNormArgs& a, int64_t b, int64_t e) {                     \
    a.residual ? forward_rows<T, W, true>(a, b, e) : forward_rows<T, W, false>(a, b, e);               \
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
  ForwardFn fn = pick<ForwardFn>(a, forward_f32, forward_bf16, forward_bf16_wf32, forward_f16, forward_f16_wf32);
  const int64_t min_rows = kMinElementsPerThread / a.hidden + 1;
  parallel_for(a.rows, a.parallelism, min_rows, [&](int64_t b, int64_t e, int) { fn(a, b, e); });
}

void rms_norm_backward(const RMSNormArgs& a) {
  BackwardFn fn = pick<BackwardFn>(a, backward_f32, backward_bf16, backward_bf16_wf32, backward_f16, backward_f16_wf32);
  const int64_t min_rows = kMinElementsPerThread / a.hidden + 1;
  parallel_for(a.rows, a.parallelism, min_rows, [&](int64_t b, int64_t e, int k) { fn(a, b, e, k); });
}

}  // namespace pytrain::cpu
