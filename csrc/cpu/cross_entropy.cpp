// Cross-entropy on the CPU: rows split over threads; per row a max pass streams the row in, a second
// pass (from L2) sums the exponentials and, when a gradient is wanted, keeps them in a per-thread fp32
// row of the workspace, from which a third pass writes the gradient. fp32 accumulation for every dtype.
// Python validates and allocates (pytrain/kernels/cross_entropy.py); this file only computes.
#include "cross_entropy.h"

#include <cmath>
#include <limits>

#include "cpu/cpu_types.h"
#include "cpu/fast_exp.h"
#include "cpu/stream_store.h"

namespace pytrain::cpu {
namespace {

constexpr int64_t kMinElementsPerThread = 1 << 15;

struct RowStats {
  float max, sum_exp, target, sum;  // sum_exp is relative to max; target is 0 outside the shard
  int64_t target_index;             // label - vocab_start, or -1 when the label is ignored or outside the shard
};

// Pass 1: the row's max. Pass 2 (the row is in L2 now): sum of exp(x - max), and of x for label
// smoothing; with `exps` set it also keeps each exp(x - max) there, so the gradient needs no second exp.
template <typename T>
__attribute__((always_inline)) inline RowStats row_stats(const CrossEntropyArgs& a, const T* x, int64_t label,
                                                         float* exps) {
  const int64_t n = a.vocab;
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(x[i]);
    m = v > m ? v : m;
  }
  const float shift = m == -std::numeric_limits<float>::infinity() ? 0.f : m;  // an all -inf row: sum 0, lse -inf
  float s = 0.f, sum = 0.f;
  if (exps) {
#pragma omp simd reduction(+ : s, sum)
    for (int64_t i = 0; i < n; ++i) {
      const float v = to_float(x[i]);
      const float e = fast_exp(v - shift);
      exps[i] = e;
      s += e;
      sum += v;
    }
  } else if (a.label_smoothing != 0.f) {
#pragma omp simd reduction(+ : s, sum)
    for (int64_t i = 0; i < n; ++i) {
      const float v = to_float(x[i]);
      s += fast_exp(v - shift);
      sum += v;
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += fast_exp(to_float(x[i]) - shift);
  }
  const int64_t t = label - a.vocab_start;
  const bool in_shard = label != a.ignore_index && t >= 0 && t < n;
  return {m, s, in_shard ? to_float(x[t]) : 0.f, sum, in_shard ? t : -1};
}

// The gradient is kept for the backward pass, long after this op: a large one streams past the cache.
template <typename T>
__attribute__((always_inline)) inline bool streams_grad(const CrossEntropyArgs& a) {
  return a.rows * a.vocab * static_cast<int64_t>(sizeof(T)) >= kStreamMinBytes;
}

// grad = scale * (softmax * (1 + 2 z lse) - s / V - (1 - s) [j == t]) from softmax = exps * exp_to_softmax.
template <typename T>
__attribute__((always_inline)) inline void grad_from_exps(const CrossEntropyArgs& a, const float* exps, T* grad,
                                                          float exp_to_softmax, float lse, float scale,
                                                          int64_t target_index) {
  const float softmax_scale = scale * (1.f + 2.f * a.z_loss * lse);
  const float k = exp_to_softmax * softmax_scale;
  const float uniform = scale * a.label_smoothing / static_cast<float>(a.total_vocab);
  store_row(grad, a.vocab, streams_grad<T>(a), [&](int64_t i) { return from_float<T>(exps[i] * k - uniform); });
  if (target_index >= 0) {
    grad[target_index] = from_float<T>(exps[target_index] * k - uniform - scale * (1.f - a.label_smoothing));
  }
}

// The same from the logits and a given lse (vocab-parallel: lse of the whole group); grad may alias x.
template <typename T>
__attribute__((always_inline)) inline void grad_from_logits(const CrossEntropyArgs& a, const T* x, T* grad, float lse,
                                                            float scale, float target, int64_t target_index) {
  const float softmax_scale = scale * (1.f + 2.f * a.z_loss * lse);
  const float uniform = scale * a.label_smoothing / static_cast<float>(a.total_vocab);
  store_row(grad, a.vocab, streams_grad<T>(a), [&](int64_t i) {
    return from_float<T>(fast_exp(to_float(x[i]) - lse) * softmax_scale - uniform);
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

template <typename T>
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
    const RowStats st = row_stats(a, x, label, grad ? exps : nullptr);
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
      grad_from_exps(a, exps, grad, 1.f / st.sum_exp, lse, scale, st.target_index);
    }
  }
}

template <typename T>
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
    grad_from_logits(a, x, grad, a.lse[row], a.grad_scale * (a.row_scale ? a.row_scale[row] : 1.f),
                     in_shard ? to_float(x[t]) : 0.f, in_shard ? t : -1);
  }
}

#define PYTRAIN_CROSS_ENTROPY_VARIANT(NAME, T)                                                            \
  PYTRAIN_CLONES void forward_##NAME(const CrossEntropyArgs& a, int64_t b, int64_t e, int k) {   \
    forward_rows<T>(a, b, e, k);                                                                 \
  }                                                                                              \
  PYTRAIN_CLONES void gradient_##NAME(const CrossEntropyArgs& a, int64_t b, int64_t e, int k) {  \
    gradient_rows<T>(a, b, e, k);                                                                \
  }
PYTRAIN_CROSS_ENTROPY_VARIANT(f32, float)
PYTRAIN_CROSS_ENTROPY_VARIANT(bf16, bf16)
PYTRAIN_CROSS_ENTROPY_VARIANT(f16, fp16)
#undef PYTRAIN_CROSS_ENTROPY_VARIANT

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
  run_rows(a, pick(a.logits_dtype, forward_f32, forward_bf16, forward_f16));
}

void cross_entropy_gradient(const CrossEntropyArgs& a) {
  run_rows(a, pick(a.logits_dtype, gradient_f32, gradient_bf16, gradient_f16));
}

}  // namespace pytrain::cpu
