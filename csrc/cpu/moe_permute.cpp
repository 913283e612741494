// Mixture-of-experts token permutation on the CPU: a threaded counting sort for the routing index and
// row moves threaded over tokens (each token's rows go to distinct expert rows, so threads never share
// an output row). Python validates and allocates (pytrain/kernels/moe_permute.py); this file only computes.
#include "moe_permute.h"

#include <algorithm>

#include "cpu/cpu_types.h"

namespace pytrain::cpu {
namespace {

// A thread costs 100-300 us to start and join on the project's shared 2-core machine (measured), as long as
// ~1M row elements take to move: below that one thread is faster (bench/test_moe_kernels_bench.py).
constexpr int64_t kMinElementsPerThread = 1 << 20;
constexpr int64_t kMinAssignmentsPerThread = 1 << 18;
constexpr int64_t kChunk = 1024;  // hidden elements accumulated at a time in fp32 (on the stack)

template <typename Id>
void route(const MoERouteArgs& a) {
  const Id* ids = static_cast<const Id*>(a.expert_ids);
  const int64_t E = a.num_experts;
  std::fill(a.workspace, a.workspace + a.parallelism * E, int64_t{0});
  // Both passes split [0, assignments) identically, so worker w's counts describe the chunk it then writes.
  parallel_for(a.assignments, a.parallelism, kMinAssignmentsPerThread, [&](int64_t b, int64_t e, int w) {
    int64_t* counts = a.workspace + w * E;
    for (int64_t i = b; i < e; ++i)
      if (ids[i] >= 0) ++counts[ids[i]];
  });
  // Expert-major exclusive scan over (expert, worker): a worker's first row of an expert follows the rows
  // of that expert's earlier chunks, which keeps the flat order within each expert.
  int64_t next = 0;
  for (int64_t ex = 0; ex < E; ++ex) {
    const int64_t first = next;
    for (int w = 0; w < a.parallelism; ++w) {
      const int64_t count = a.workspace[w * E + ex];
      a.workspace[w * E + ex] = next;
      next += count;
    }
    a.tokens_per_expert[ex] = next - first;
  }
  parallel_for(a.assignments, a.parallelism, kMinAssignmentsPerThread, [&](int64_t b, int64_t e, int w) {
    int64_t* cursor = a.workspace + w * E;
    for (int64_t i = b; i < e; ++i) a.row_of[i] = ids[i] >= 0 ? cursor[ids[i]]++ : -1;
  });
}

template <typename T>
__attribute__((always_inline)) inline void scatter_tokens(const MoERowsArgs& a, int64_t begin, int64_t end) {
  const int64_t H = a.hidden, k = a.top_k;
  const bool dots = a.grad_weights != nullptr;
  for (int64_t t = begin; t < end; ++t) {
    const T* src = static_cast<const T*>(a.tokens_in) + t * H;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = a.row_of[t * k + j];
      if (row < 0) {
        if (dots) a.grad_weights[t * k + j] = 0.f;
        continue;
      }
      const float w = a.weights ? a.weights[t * k + j] : 1.f;
      T* dst = static_cast<T*>(a.rows_out) + row * H;
      if (dots) {
        const T* other = static_cast<const T*>(a.rows_in) + row * H;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t h = 0; h < H; ++h) {
          const float g = to_float(src[h]);
          dst[h] = from_float<T>(w * g);
          dot += g * to_float(other[h]);
        }
        a.grad_weights[t * k + j] = dot;
      } else if (w == 1.f) {
        std::memcpy(dst, src, H * sizeof(T));  // permute's forward: a plain copy
      } else {
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) dst[h] = from_float<T>(w * to_float(src[h]));
      }
    }
  }
}

template <typename T>
__attribute__((always_inline)) inline void gather_tokens(const MoERowsArgs& a, int64_t begin, int64_t end) {
  const int64_t H = a.hidden, k = a.top_k;
  float acc[kChunk];
  for (int64_t t = begin; t < end; ++t) {
    T* dst = static_cast<T*>(a.tokens_out) + t * H;
    for (int64_t h0 = 0; h0 < H; h0 += kChunk) {
      const int64_t n = std::min(kChunk, H - h0);
      std::fill(acc, acc + n, 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = a.row_of[t * k + j];
        if (row < 0) continue;
        const float w = a.weights ? a.weights[t * k + j] : 1.f;
        const T* src = static_cast<const T*>(a.rows_in) + row * H + h0;
#pragma omp simd
        for (int64_t h = 0; h < n; ++h) acc[h] += w * to_float(src[h]);
      }
#pragma omp simd
      for (int64_t h = 0; h < n; ++h) dst[h0 + h] = from_float<T>(acc[h]);
    }
  }
}

// The hot loops compiled per dtype and per target (AVX-512, AVX2, baseline), chosen at load time.
#define PYTRAIN_MOE_VARIANT(NAME, T)                                                                     \
  PYTRAIN_CLONES void scatter_##NAME(const MoERowsArgs& a, int64_t b, int64_t e) { scatter_tokens<T>(a, b, e); } \
  PYTRAIN_CLONES void gather_##NAME(const MoERowsArgs& a, int64_t b, int64_t e) { gather_tokens<T>(a, b, e); }
PYTRAIN_MOE_VARIANT(f32, float)
PYTRAIN_MOE_VARIANT(bf16, bf16)
PYTRAIN_MOE_VARIANT(f16, fp16)
#undef PYTRAIN_MOE_VARIANT

template <typename Fn>
void run_over_tokens(const MoERowsArgs& a, const char* op, Fn f32, Fn bf, Fn h) {
  Fn fn = nullptr;
  switch (a.dtype) {
    case kFloat32: fn = f32; break;
    case kBFloat16: fn = bf; break;
    case kFloat16: fn = h; break;
    default: bad_dtype(op, a.dtype);
  }
  const int64_t min_tokens = kMinElementsPerThread / std::max<int64_t>(1, a.hidden * a.top_k) + 1;
  parallel_for(a.tokens, a.parallelism, min_tokens, [&](int64_t b, int64_t e, int) { fn(a, b, e); });
}

}  // namespace

void moe_route(const MoERouteArgs& a) {
  if (a.id_bytes == 4) {
    route<int32_t>(a);
  } else if (a.id_bytes == 8) {
    route<int64_t>(a);
  } else {
    throw std::invalid_argument("moe_route: expert ids must be 4 or 8 bytes, got " + std::to_string(a.id_bytes));
  }
}

void moe_scatter(const MoERowsArgs& a) {
  using Fn = void (*)(const MoERowsArgs&, int64_t, int64_t);
  run_over_tokens<Fn>(a, "moe_scatter", scatter_f32, scatter_bf16, scatter_f16);
}

void moe_gather(const MoERowsArgs& a) {
  using Fn = void (*)(const MoERowsArgs&, int64_t, int64_t);
  run_over_tokens<Fn>(a, "moe_gather", gather_f32, gather_bf16, gather_f16);
}

}  // namespace pytrain::cpu
