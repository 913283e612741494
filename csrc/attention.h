// Attention over packed sequences on CPUs with bf16 dot-product units (AVX512-BF16), bf16 or fp32 in and out:
//   out = softmax(q k^T * scale) v within each sequence cu_seqlens[s]:cu_seqlens[s+1], optionally causal,
// GQA (heads a multiple of kv_heads). The backward recomputes the probabilities from the saved log-sum-exp
// (flash-attention's memory: nothing quadratic in the sequence length is kept between the passes).
// (The GPU runs pytrain's Triton kernels instead; see pytrain/kernels/flash_attn.py.)
#pragma once
#include <cstdint>

namespace pytrain {

// q, k, v, dout: (tokens, heads or kv_heads, head_dim) with any token and head strides (in elements) and a
// contiguous last dimension; out, dq, dk, dv: contiguous (tokens, heads, head_dim) allocated by the caller;
// lse: fp32 (heads, tokens). Every tensor is of `dtype` (bf16 or fp32) except lse.
struct AttentionArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_token_stride = 0, q_head_stride = 0;
  int64_t k_token_stride = 0, k_head_stride = 0;
  int64_t v_token_stride = 0, v_head_stride = 0;
  void* out = nullptr;  // forward output; a backward input
  float* lse = nullptr;
  const void* dout = nullptr;  // backward, contiguous like out
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  const int64_t* cu_seqlens = nullptr;  // num_seqs + 1 token offsets, host memory
  int64_t num_seqs = 0;
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  bool causal = false;
  float scale = 1.f;
  int dtype = 0;
  int parallelism = 1;  // threads
};

namespace cpu {
// Whether this CPU has the instructions the kernels need (AVX-512 F/BW/VL/DQ and BF16; fp32 too needs them only
// so that one check serves both); they throw if not.
bool attention_supported();
void attention_forward(const AttentionArgs& args);
void attention_backward(const AttentionArgs& args);
}  // namespace cpu

}  // namespace pytrain
