// Mixture-of-experts token permutation kernels (CPU; CUDA runs Triton, kernels/moe_permute_triton.py).
// Python validates, allocates and derives every index (pytrain/kernels/moe_permute.py); these only compute.
//
// Layout: T tokens, k routing slots per token, N kept assignments, H hidden. row_of (T, k) int64 maps
// assignment (t, j) to its row of the expert-grouped (N, H) buffer, -1 when the assignment was dropped;
// each row 0..N-1 is named by exactly one assignment (Python checks this for row_of it did not make).
#pragma once
#include <cstdint>

namespace pytrain {

// Counting sort of the assignments by expert: rows grouped by expert ascending, in flat (t * k + j) order
// within an expert, so the permutation is stable.
struct MoERouteArgs {
  const void* expert_ids = nullptr;     // (T * k,) int32 or int64, each in [-1, num_experts)
  int id_bytes = 8;                     // 4 or 8
  int64_t assignments = 0;              // T * k
  int64_t num_experts = 0;
  int64_t* row_of = nullptr;            // out (T * k,)
  int64_t* tokens_per_expert = nullptr; // out (num_experts,)
  int64_t* workspace = nullptr;         // (parallelism, num_experts): per-thread counts, then write cursors
  int parallelism = 1;                  // threads
};

// Row moves between token order (T, H) and expert order (N, H), fp32 math, one rounding to the dtype.
//   moe_scatter: rows_out[row_of[t, j]] = w[t, j] * tokens_in[t]   (w = 1 when weights is null)
//                with rows_in and grad_weights set, also grad_weights[t, j] = dot(tokens_in[t], rows_in[row]):
//                permute's forward, unpermute's backward (grad_y -> grad_expert_out and grad_weights).
//   moe_gather:  tokens_out[t] = sum_j w[t, j] * rows_in[row_of[t, j]]   (dropped slots add nothing):
//                unpermute's forward, permute's backward (the sum over a token's copies).
struct MoERowsArgs {
  const void* tokens_in = nullptr;  // (T, H)
  const void* rows_in = nullptr;    // (N, H)
  void* tokens_out = nullptr;       // (T, H)
  void* rows_out = nullptr;         // (N, H)
  const int64_t* row_of = nullptr;  // (T, k)
  const float* weights = nullptr;   // (T, k) fp32, or null: every weight 1
  float* grad_weights = nullptr;    // (T, k) fp32, or null: not wanted (0 for dropped slots)
  int64_t tokens = 0, top_k = 0, hidden = 0;
  int dtype = 0;                    // of the (T, H) and (N, H) buffers
  int parallelism = 1;              // threads
};

namespace cpu {
void moe_route(const MoERouteArgs& args);
void moe_scatter(const MoERowsArgs& args);
void moe_gather(const MoERowsArgs& args);
}  // namespace cpu

}  // namespace pytrain
