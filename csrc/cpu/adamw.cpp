// Fused AdamW on the CPU: the list's elements, all tensors end to end, split into one contiguous range per
// thread; each range is walked tensor by tensor, one vectorized pass per piece reading param, grad and both
// moments once and writing them (and the model copy) once. Python validates and fills the table
// (pytrain/kernels/adamw.py); this file only computes.
#include "adamw.h"

#include <cmath>
#include <type_traits>

#include "cpu/cpu_types.h"

namespace pytrain::cpu {
namespace {

// Below this, another thread costs more than it saves (the update moves ~30 bytes per element).
constexpr int64_t kMinElementsPerThread = 1 << 16;

struct Piece {
  float* param;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  void* model;
  int64_t n;
};

template <typename M>
__attribute__((always_inline)) inline void update(const AdamWArgs& a, const Piece& t) {
  float* __restrict__ p = t.param;
  const float* __restrict__ g = t.grad;
  float* __restrict__ m = t.exp_avg;
  float* __restrict__ v = t.exp_avg_sq;
  M* __restrict__ model = static_cast<M*>(t.model);
#pragma omp simd
  for (int64_t i = 0; i < t.n; ++i) {
    const float grad = g[i] * a.grad_scale;
    const float decayed = p[i] * a.param_scale;
    const float avg = m[i] + a.one_minus_beta1 * (grad - m[i]);
    const float avg_sq = v[i] * a.beta2 + a.one_minus_beta2 * grad * grad;
    const float denom = std::sqrt(avg_sq) / a.bias_correction2_sqrt + a.eps;
    const float updated = decayed + a.neg_step_size * avg / denom;
    m[i] = avg;
    v[i] = avg_sq;
    p[i] = updated;
    if constexpr (!std::is_same_v<M, void>) model[i] = from_float<M>(updated);
  }
}

// The update without a model copy is update<void>; `void` has no from_float, hence the constexpr guard above.
PYTRAIN_CLONES void update_master_only(const AdamWArgs& a, const Piece& t) { update<void>(a, t); }
PYTRAIN_CLONES void update_f32(const AdamWArgs& a, const Piece& t) { update<float>(a, t); }
PYTRAIN_CLONES void update_bf16(const AdamWArgs& a, const Piece& t) { update<bf16>(a, t); }
PYTRAIN_CLONES void update_f16(const AdamWArgs& a, const Piece& t) { update<fp16>(a, t); }

// The last tensor whose start is <= element (empty tensors share their start with the next one: the walk
// below steps over them).
int64_t tensor_holding(const int64_t* start, int64_t tensors, int64_t element) {
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

void update_range(const AdamWArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.tensors;
  const int64_t* row = a.table;
  const int64_t* start = row + kAdamWStart * n;
  const int64_t* numel = row + kAdamWNumel * n;
  for (int64_t t = tensor_holding(start, n, begin); t < n && start[t] < end; ++t) {
    const int64_t lo = begin > start[t] ? begin - start[t] : 0;
    const int64_t hi = end < start[t] + numel[t] ? end - start[t] : numel[t];
    if (lo >= hi) continue;
    auto at = [&](int which) { return reinterpret_cast<float*>(row[which * n + t]) + lo; };
    void* model = reinterpret_cast<void*>(row[kAdamWModel * n + t]);
    const int model_dtype = static_cast<int>(row[kAdamWModelDtype * n + t]);
    if (model) {
      const int64_t bytes = model_dtype == kFloat32 ? 4 : 2;
      model = static_cast<char*>(model) + lo * bytes;
    }
    const Piece piece{at(kAdamWParam), at(kAdamWGrad), at(kAdamWExpAvg), at(kAdamWExpAvgSq), model, hi - lo};
    if (!model) {
      update_master_only(a, piece);
      continue;
    }
    switch (model_dtype) {  // checked in adamw_step, before any thread starts
      case kFloat32: update_f32(a, piece); break;
      case kBFloat16: update_bf16(a, piece); break;
      case kFloat16: update_f16(a, piece); break;
    }
  }
}

}  // namespace

void adamw_step(const AdamWArgs& a) {
  if (a.tensors == 0 || a.total == 0) return;
  for (int64_t t = 0; t < a.tensors; ++t) {
    const int code = static_cast<int>(a.table[kAdamWModelDtype * a.tensors + t]);
    if (a.table[kAdamWModel * a.tensors + t] && code != kFloat32 && code != kBFloat16 && code != kFloat16)
      bad_dtype("adamw_step model", code);
  }
  parallel_for(a.total, a.parallelism, kMinElementsPerThread, [&](int64_t b, int64_t e, int) { update_range(a, b, e); });
}

}  // namespace pytrain::cpu
