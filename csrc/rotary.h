// Rotary position embedding kernel interface, shared by the CPU (pytrain::cpu) and CUDA (pytrain::cuda)
// implementations. q and k are rotated in one call; the backward is the same call with `inverse` set.
#pragma once
#include <cstdint>

namespace pytrain {

// Raw views of q (batch, seq, q_heads, head_dim) and k (batch, seq, k_heads, head_dim); the packed layout
// (tokens, heads, head_dim) is batch = 1, seq = tokens. Within a token, heads and head_dim are contiguous;
// tokens are addressed by (batch, seq) strides in elements, so views of a fused qkv projection need no copy.
// Every buffer is allocated by the caller (Python); out may equal in (in-place) with the same strides.
struct RotaryArgs {
  const void* q_in = nullptr;
  void* q_out = nullptr;
  const void* k_in = nullptr;
  void* k_out = nullptr;
  int64_t q_in_stride_batch = 0, q_in_stride_seq = 0, q_out_stride_batch = 0, q_out_stride_seq = 0;
  int64_t k_in_stride_batch = 0, k_in_stride_seq = 0, k_out_stride_batch = 0, k_out_stride_seq = 0;
  // Position of token (b, s) = positions[b * positions_stride_batch + s]; null: the position is s.
  const int64_t* positions = nullptr;
  int64_t positions_stride_batch = 0;
  // (rows, head_dim) fp32 table: row p holds cos(p * f_i) for i < head_dim / 2, then sin(p * f_i).
  // Python guarantees every position is in [0, rows).
  const float* cos_sin = nullptr;
  int64_t batch = 0, seq = 0, q_heads = 0, k_heads = 0, head_dim = 0;
  bool interleaved = false;  // false: rotate (x[i], x[i + head_dim/2]) (LLaMA/NeoX); true: (x[2i], x[2i+1]) (GPT-J)
  bool inverse = false;      // rotate by -angle: the backward of the forward rotation
  int dtype = 0;
  int parallelism = 1;       // CPU: threads
  void* stream = nullptr;    // CUDA: the cudaStream_t to launch on ...
  int device = 0;            // ... on this device
};

namespace cpu {
void rotary(const RotaryArgs& args);
}  // namespace cpu

namespace cuda {
void rotary(const RotaryArgs& args);
}  // namespace cuda

}  // namespace pytrain
