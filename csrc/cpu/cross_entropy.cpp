// Cross-entropy on the CPU: rows split over threads; per row a max pass streams the row in, a second
// pass (from L2) sums the exponentials and, when a gradient is wanted, keeps them in a per-thread fp32
// row of the workspace, from which a third pass writes the gradient. fp32 accumulation for every dtype.
// Each pass has a generic loop (compiled as target clones; it also takes every row's tail) and, for 16-bit
// logits, an AVX2 one over whole blocks of 16 (vec_avx2.h); which serves what: above the dispatch, at the end.
// Python validates and allocates (pytrain/kernels/cross_entropy.py); this file only computes.
#include "cross_entropy.h"

#include <cmath>
#include <limits>
#include <type_traits>

#include "cpu/cpu_types.h"
#include "cpu/fast_exp.h"
#include "cpu/stream_store.h"
#include "cpu/vec_avx2.h"

namespace pytrain::cpu {
namespace {

constexpr int64_t kMinElementsPerThread = 1 << 15;
constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

struct RowStats {
  float max, sum_exp, target, sum;  // sum_exp is relative to max; target is 0 outside the shard
  int64_t target_index;             // label - vocab_start, or -1 when the label is ignored or outside the shard
};

// ---------------------------------------------------------------------------------------------------------
// The passes over x[i, n). A NaN never becomes the max (`v > m` is false), so it reaches the sum instead.

template <typename T>
__attribute__((always_inline)) inline float row_max(const T* x, int64_t i, int64_t n, float m) {
#pragma omp simd reduction(max : m)
  for (int64_t j = i; j < n; ++j) {
    const float v = to_float(x[j]);
    m = v > m ? v : m;
  }
  return m;
}

// Adds exp(x - shift) to *sum_exp and (kSumX, for label smoothing) x to *sum_x; kKeep also keeps each
// exponential in exps, so that the gradient needs no second exp.
template <bool kKeep, bool kSumX, typename T>
__attribute__((always_inline)) inline void add_exps(const T* x, int64_t i, int64_t n, float shift, float* exps,
                                                    float* sum_exp, float* sum_x) {
  float s = 0.f, sum = 0.f;
#pragma omp simd reduction(+ : s, sum)
  for (int64_t j = i; j < n; ++j) {
    const float v = to_float(x[j]);
    const float e = fast_exp(v - shift);
    if constexpr (kKeep) exps[j] = e;
    s += e;
    if constexpr (kSumX) sum += v;
  }
  *sum_exp += s, *sum_x += sum;
}

// grad[j] = exps[j] * k - uniform.
template <typename T>
__attribute__((always_inline)) inline void grad_from_exps(const float* exps, T* grad, int64_t i, int64_t n, float k,
                                                          float uniform) {
#pragma omp simd
  for (int64_t j = i; j < n; ++j) grad[j] = from_float<T>(exps[j] * k - uniform);
}

// grad[j] = exp(x[j] - lse) * softmax_scale - uniform; grad may alias x.
template <typename T>
__attribute__((always_inline)) inline void grad_from_logits(const T* x, T* grad, int64_t i, int64_t n, float lse,
                                                            float softmax_scale, float uniform) {
#pragma omp simd
  for (int64_t j = i; j < n; ++j) grad[j] = from_float<T>(fast_exp(to_float(x[j]) - lse) * softmax_scale - uniform);
}

// The same passes with AVX2 over whole blocks of 16, the generic loop taking the tail. Sums run in two
// (max: four) accumulators. The exponentials are kept in load16<T>'s lane order (exp_slot finds one), which
// grad_from_exps_avx2's stores put back in element order.
template <typename T>
PYTRAIN_AVX2 float row_max_avx2(const T* x, int64_t n) {
  __m256 m[4];
  for (__m256& v : m) v = _mm256_set1_ps(kMinusInf);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int k = 0; k < 2; ++k) {
      const avx2::F32x16 v = avx2::load16(x + i + 16 * k);
      m[2 * k] = _mm256_max_ps(v.a, m[2 * k]);
      m[2 * k + 1] = _mm256_max_ps(v.b, m[2 * k + 1]);
    }
  }
  const float block_max = avx2::max8(_mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])));
  return row_max(x, i, n, block_max);
}

template <bool kKeep, bool kSumX, typename T>
PYTRAIN_AVX2 void add_exps_avx2(const T* x, int64_t n, float shift, float* exps, float* sum_exp, float* sum_x) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 es[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, xs[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const avx2::F32x16 v = avx2::load16(x + i);
    const avx2::F32x16 e = {avx2::exp8(_mm256_sub_ps(v.a, s)), avx2::exp8(_mm256_sub_ps(v.b, s))};
    if constexpr (kKeep) avx2::store16(exps + i, e);
    es[0] = _mm256_add_ps(es[0], e.a), es[1] = _mm256_add_ps(es[1], e.b);
    if constexpr (kSumX) xs[0] = _mm256_add_ps(xs[0], v.a), xs[1] = _mm256_add_ps(xs[1], v.b);
  }
  *sum_exp += avx2::sum8(_mm256_add_ps(es[0], es[1]));
  *sum_x += avx2::sum8(_mm256_add_ps(xs[0], xs[1]));
  add_exps<kKeep, kSumX>(x, i, n, shift, exps, sum_exp, sum_x);
}

// Where add_exps_avx2 kept element j's exponential.
template <typename T>
int64_t exp_slot(int64_t j, int64_t n) {
  const int64_t block = j - j % 16;
  return block + 16 <= n ? block + avx2::lane_of<T>(static_cast<int>(j % 16)) : j;
}

// kStream: non-temporal stores, to a 32-byte aligned grad.
template <bool kStream, typename T>
PYTRAIN_AVX2 void grad_from_exps_avx2(const float* exps, T* grad, int64_t n, float k, float uniform) {
  const __m256 kk = _mm256_set1_ps(k), u = _mm256_set1_ps(uniform);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const avx2::F32x16 e = avx2::load16(exps + i);
    avx2::store16<kStream>(grad + i, {_mm256_fmsub_ps(e.a, kk, u), _mm256_fmsub_ps(e.b, kk, u)});
  }
  grad_from_exps(exps, grad, i, n, k, uniform);
}

template <bool kStream, typename T>
PYTRAIN_AVX2 void grad_from_logits_avx2(const T* x, T* grad, int64_t n, float lse, float softmax_scale, float uniform) {
  const __m256 l = _mm256_set1_ps(lse), c = _mm256_set1_ps(softmax_scale), u = _mm256_set1_ps(uniform);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const avx2::F32x16 v = avx2::load16(x + i);
    const __m256 a = avx2::exp8(_mm256_sub_ps(v.a, l)), b = avx2::exp8(_mm256_sub_ps(v.b, l));
    avx2::store16<kStream>(grad + i, {_mm256_fmsub_ps(a, c, u), _mm256_fmsub_ps(b, c, u)});
  }
  grad_from_logits(x, grad, i, n, lse, softmax_scale, uniform);
}

// ---------------------------------------------------------------------------------------------------------
// Rows.

// The gradient is kept for the backward pass, long after this op: a large one streams past the cache.
template <typename T>
__attribute__((always_inline)) inline bool streams_grad(const CrossEntropyArgs& a) {
  return a.rows * a.vocab * static_cast<int64_t>(sizeof(T)) >= kStreamMinBytes;
}

template <typename T, bool kAvx2>
__attribute__((always_inline)) inline RowStats row_stats(const CrossEntropyArgs& a, const T* x, int64_t label,
                                                         float* exps) {
  const int64_t n = a.vocab;
  float m;
  if constexpr (kAvx2) {
    m = row_max_avx2(x, n);
  } else {
    m = row_max(x, 0, n, kMinusInf);
  }
  const float shift = m == kMinusInf ? 0.f : m;  // an all -inf row: sum 0, lse -inf
  float s = 0.f, sum = 0.f;
  auto add = [&](auto keep, auto sum_x) {
    constexpr bool kKeep = decltype(keep)::value, kSumX = decltype(sum_x)::value;
    if constexpr (kAvx2) {
      add_exps_avx2<kKeep, kSumX>(x, n, shift, exps, &s, &sum);
    } else {
      add_exps<kKeep, kSumX>(x, 0, n, shift, exps, &s, &sum);
    }
  };
  if (exps) {
    add(std::true_type{}, std::true_type{});
  } else if (a.label_smoothing != 0.f) {
    add(std::false_type{}, std::true_type{});
  } else {
    add(std::false_type{}, std::false_type{});
  }
  const int64_t t = label - a.vocab_start;
  const bool in_shard = label != a.ignore_index && t >= 0 && t < n;
  return {m, s, in_shard ? to_float(x[t]) : 0.f, sum, in_shard ? t : -1};
}

// grad = scale * (softmax * (1 + 2 z lse) - s / V - (1 - s) [j == t]) from softmax = exps * exp_to_softmax.
template <typename T, bool kAvx2>
__attribute__((always_inline)) inline void write_grad_from_exps(const CrossEntropyArgs& a, const float* exps, T* grad,
                                                                float exp_to_softmax, float lse, float scale,
                                                                int64_t target_index) {
  const int64_t n = a.vocab;
  const float k = exp_to_softmax * scale * (1.f + 2.f * a.z_loss * lse);
  const float uniform = scale * a.label_smoothing / static_cast<float>(a.total_vocab);
  store_row_direct_or_blocks<kAvx2>(grad, n, streams_grad<T>(a), [&](auto stream, T* dst, int64_t first, int64_t len) {
    if constexpr (kAvx2) {
      grad_from_exps_avx2<decltype(stream)::value>(exps + first, dst, len, k, uniform);
    } else {
      grad_from_exps(exps + first, dst, 0, len, k, uniform);
    }
  });
  if (target_index >= 0) {
    const float e = exps[kAvx2 ? exp_slot<T>(target_index, n) : target_index];
    grad[target_index] = from_float<T>(e * k - uniform - scale * (1.f - a.label_smoothing));
  }
}

// The same from the logits and a given lse (vocab-parallel: lse of the whole group); grad may alias x.
template <typename T, bool kAvx2>
__attribute__((always_inline)) inline void write_grad_from_logits(const CrossEntropyArgs& a, const T* x, T* grad,
                                                                  float lse, float scale, float target,
                                                                  int64_t target_index) {
  const float softmax_scale = scale * (1.f + 2.f * a.z_loss * lse);
  const float uniform = scale * a.label_smoothing / static_cast<float>(a.total_vocab);
  store_row_direct_or_blocks<kAvx2>(grad, a.vocab, streams_grad<T>(a),
                                    [&](auto stream, T* dst, int64_t first, int64_t len) {
    if constexpr (kAvx2) {
      grad_from_logits_avx2<decltype(stream)::value>(x + first, dst, len, lse, softmax_scale, uniform);
    } else {
      grad_from_logits(x + first, dst, 0, len, lse, softmax_scale, uniform);
    }
  });
  if (target_index >= 0) {  // x[t] may be overwritten by now: use the saved target logit
    grad[target_index] =
        from_float<T>(fast_exp(target - lse) * softmax_scale - uniform - scale * (1.f - a.label_smoothing));
  }
}

template <typename T>
__attribute__((always_inline)) inline void zero_row(T* grad, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) grad[i] = from_float<T>(0.f);
}

template <typename T, bool kAvx2>
__attribute__((always_inline)) inline void forward_rows(const CrossEntropyArgs& a, int64_t begin, int64_t end,
                                                        int worker) {
  float* exps = a.grad ? a.workspace + worker * a.vocab : nullptr;
  for (int64_t row = begin; row < end; ++row) {
    const T* x = static_cast<const T*>(a.logits) + row * a.vocab;
    const int64_t label = a.labels[row];
    const bool ignored = label == a.ignore_index;
    T* grad = a.grad ? static_cast<T*>(a.grad) + row * a.vocab : nullptr;
    if (ignored && !a.partial_stats) {
      a.loss[row] = 0.f, a.lse[row] = 0.f;
      if (grad) zero_row(grad, a.vocab);
      continue;
    }
    const RowStats st = row_stats<T, kAvx2>(a, x, label, grad ? exps : nullptr);
    if (a.partial_stats) {
      float* out = a.partial_stats + 4 * row;
      out[0] = st.max, out[1] = st.sum_exp, out[2] = st.target, out[3] = st.sum;
      continue;
    }
    const float lse = st.max + std::log(st.sum_exp);
    const float s = a.label_smoothing;
    const float smoothing_term = s != 0.f ? s / static_cast<float>(a.total_vocab) * st.sum : 0.f;  // sum may be -inf
    a.loss[row] = lse - (1.f - s) * st.target - smoothing_term + a.z_loss * lse * lse;
    a.lse[row] = lse;
    if (grad) {
      const float scale = a.grad_scale * (a.row_scale ? a.row_scale[row] : 1.f);
      write_grad_from_exps<T, kAvx2>(a, exps, grad, 1.f / st.sum_exp, lse, scale, st.target_index);
    }
  }
}

template <typename T, bool kAvx2>
__attribute__((always_inline)) inline void gradient_rows(const CrossEntropyArgs& a, int64_t begin, int64_t end, int) {
  for (int64_t row = begin; row < end; ++row) {
    const T* x = static_cast<const T*>(a.logits) + row * a.vocab;
    T* grad = static_cast<T*>(a.grad) + row * a.vocab;
    const int64_t label = a.labels[row];
    if (label == a.ignore_index) {
      zero_row(grad, a.vocab);
      continue;
    }
    const int64_t t = label - a.vocab_start;
    const bool in_shard = t >= 0 && t < a.vocab;
    write_grad_from_logits<T, kAvx2>(a, x, grad, a.lse[row], a.grad_scale * (a.row_scale ? a.row_scale[row] : 1.f),
                                     in_shard ? to_float(x[t]) : 0.f, in_shard ? t : -1);
  }
}

// NAME: the generic loops, compiled for AVX-512, AVX2 and the baseline (PYTRAIN_CLONES); avx2_NAME: the AVX2
// loops. Measured on an AVX-512 CPU (Zen 4; 4096 x 32000, and 32 rows in cache), against the clones: fp16 ran
// 1.65-2.1x faster on the AVX2 loops (F16C converts 8 lanes in one instruction), the bf16 forward 1.0-1.1x, but
// the bf16 gradient from the logits 0.8-1.0x and fp32 0.8-0.9x (the AVX-512 clone does 16 lanes an
// instruction). So fp32 and bf16's gradient keep the clones.
#define PYTRAIN_CROSS_ENTROPY_GENERIC(NAME, T)                                                      \
  PYTRAIN_CLONES void forward_##NAME(const CrossEntropyArgs& a, int64_t b, int64_t e, int k) {     \
    forward_rows<T, false>(a, b, e, k);                                                            \
  }                                                                                                \
  PYTRAIN_CLONES void gradient_##NAME(const CrossEntropyArgs& a, int64_t b, int64_t e, int k) {    \
    gradient_rows<T, false>(a, b, e, k);                                                           \
  }
PYTRAIN_CROSS_ENTROPY_GENERIC(f32, float)
PYTRAIN_CROSS_ENTROPY_GENERIC(bf16, bf16)
PYTRAIN_CROSS_ENTROPY_GENERIC(f16, fp16)
#undef PYTRAIN_CROSS_ENTROPY_GENERIC
PYTRAIN_AVX2 void forward_avx2_bf16(const CrossEntropyArgs& a, int64_t b, int64_t e, int k) {
  forward_rows<bf16, true>(a, b, e, k);
}
PYTRAIN_AVX2 void forward_avx2_f16(const CrossEntropyArgs& a, int64_t b, int64_t e, int k) {
  forward_rows<fp16, true>(a, b, e, k);
}
PYTRAIN_AVX2 void gradient_avx2_f16(const CrossEntropyArgs& a, int64_t b, int64_t e, int k) {
  gradient_rows<fp16, true>(a, b, e, k);
}

using RowsFn = void (*)(const CrossEntropyArgs&, int64_t, int64_t, int);

RowsFn pick(int dtype, RowsFn f32, RowsFn bf, RowsFn h) {
  switch (dtype) {
    case kFloat32: return f32;
    case kBFloat16: return bf;
    case kFloat16: return h;
  }
  bad_dtype("cross_entropy", dtype);
}

void run_rows(const CrossEntropyArgs& a, RowsFn fn) {
  const int64_t min_rows = kMinElementsPerThread / (a.vocab > 0 ? a.vocab : 1) + 1;
  parallel_for(a.rows, a.parallelism, min_rows, [&](int64_t b, int64_t e, int k) { fn(a, b, e, k); });
}

}  // namespace

void cross_entropy_forward(const CrossEntropyArgs& a) {
  run_rows(a, avx2::enabled() ? pick(a.logits_dtype, forward_f32, forward_avx2_bf16, forward_avx2_f16)
                              : pick(a.logits_dtype, forward_f32, forward_bf16, forward_f16));
}

void cross_entropy_gradient(const CrossEntropyArgs& a) {
  run_rows(a, avx2::enabled() ? pick(a.logits_dtype, gradient_f32, gradient_bf16, gradient_avx2_f16)
                              : pick(a.logits_dtype, gradient_f32, gradient_bf16, gradient_f16));
}

}  // namespace pytrain::cpu
