// Cross-entropy kernel interface (fused softmax + NLL), shared by the CPU (pytrain::cpu) and CUDA
// (pytrain::cuda) implementations. Also serves the vocab-parallel loss: per-row partial statistics of a
// vocab shard, and the gradient of a shard given the group's logsumexp.
#pragma once
#include <cstdint>

namespace pytrain {

// Per-token loss (label t, V = total_vocab, s = label_smoothing, z = z_loss, lse = logsumexp of the row):
//   loss = lse - (1 - s) * x[t] - (s / V) * sum(x) + z * lse^2        (0 where label == ignore_index)
// and its gradient, scaled by grad_scale * row_scale[row]:
//   grad[j] = softmax[j] * (1 + 2 z lse) - (1 - s) * [j == t] - s / V
// Raw views of contiguous buffers; every buffer is allocated by the caller (Python).
struct CrossEntropyArgs {
  const void* logits = nullptr;     // (rows, vocab), dtype logits_dtype
  const int64_t* labels = nullptr;  // (rows,) global class ids; labels outside this shard only skip the target
  float* loss = nullptr;            // (rows,) forward output: per-token loss
  float* lse = nullptr;             // (rows,) forward output; input of cross_entropy_gradient
  float* partial_stats = nullptr;   // (rows, 4) when set, forward writes only: max, sum exp(x - max),
                                    //   x[label - vocab_start] (0 outside the shard), sum(x)
  void* grad = nullptr;             // (rows, vocab) logits dtype, may alias logits; null: no gradient
  const float* row_scale = nullptr; // (rows,) optional per-row gradient multiplier (reduction="none")
  float* workspace = nullptr;       // CPU forward with grad: (parallelism, vocab) fp32 scratch rows
  float grad_scale = 1.f;           // gradient multiplier for every row (1 / valid tokens for "mean")
  int64_t rows = 0, vocab = 0;
  int64_t vocab_start = 0;          // first class id of this shard (vocab-parallel), else 0
  int64_t total_vocab = 0;          // classes over all shards (V above)
  int64_t ignore_index = -100;
  float label_smoothing = 0.f, z_loss = 0.f;
  int logits_dtype = 0;
  int parallelism = 1;              // CPU: threads
  void* stream = nullptr;           // CUDA: the cudaStream_t to launch on ...
  int device = 0;                   // ... on this device
};

namespace cpu {
// Writes loss and lse (and grad when set), or only partial_stats when that is set.
void cross_entropy_forward(const CrossEntropyArgs& args);
// Writes grad from lse (the whole group's logsumexp for a vocab shard).
void cross_entropy_gradient(const CrossEntropyArgs& args);
}  // namespace cpu

namespace cuda {
void cross_entropy_forward(const CrossEntropyArgs& args);
void cross_entropy_gradient(const CrossEntropyArgs& args);
}  // namespace cuda

}  // namespace pytrain
