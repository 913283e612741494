// Fused multi-tensor AdamW step, shared by the CPU (pytrain::cpu) and CUDA (pytrain::cuda) implementations.
//
// torch.optim.AdamW's update (decoupled weight decay, bias correction), one pass per element over a list of
// fp32 tensors, all in fp32:
//   g  = grad * grad_scale                         (gradient clipping's factor, 1 without)
//   p  = param * param_scale                       (param_scale = 1 - lr * weight_decay)
//   m  = m + one_minus_beta1 * (g - m)             (torch's lerp)
//   v  = v * beta2 + one_minus_beta2 * g * g
//   param = p + neg_step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)
// and, where the tensor has a model copy (a bf16 / fp16 model's parameter), model = param rounded to its
// dtype in the same pass. Bias corrections and step sizes are computed by the caller in double, as torch does.
#pragma once
#include <cstdint>

namespace pytrain {

// The tensors are described by an int64 table the caller fills, row-major (kAdamWTableRows, tensors), in
// memory of the tensors' device. Element i of the whole list is element i - start[t] of the tensor t with
// start[t] <= i < start[t] + numel[t]; starts ascend (prefix sums of numel).
enum AdamWTableRow : int {
  kAdamWParam = 0,   // fp32 master weights, updated in place
  kAdamWGrad,        // fp32 gradients, read only
  kAdamWExpAvg,      // fp32 first moments, updated in place
  kAdamWExpAvgSq,    // fp32 second moments, updated in place
  kAdamWModel,       // the model copy written from the updated param, or 0 for none
  kAdamWModelDtype,  // its dtype code (dtype.h)
  kAdamWStart,
  kAdamWNumel,
  kAdamWTableRows,
};

struct AdamWArgs {
  const int64_t* table = nullptr;
  int64_t tensors = 0;  // columns of the table
  int64_t total = 0;    // elements over all tensors: start[tensors - 1] + numel[tensors - 1]
  float grad_scale = 1.f, param_scale = 1.f, one_minus_beta1 = 0.1f, beta2 = 0.999f, one_minus_beta2 = 0.001f;
  float neg_step_size = 0.f, bias_correction2_sqrt = 1.f, eps = 1e-8f;
  int parallelism = 1;     // CPU: threads
  void* stream = nullptr;  // CUDA: the cudaStream_t to launch on ...
  int device = 0;          // ... on this device
};

namespace cpu {
void adamw_step(const AdamWArgs& args);
}  // namespace cpu

namespace cuda {
void adamw_step(const AdamWArgs& args);
}  // namespace cuda

}  // namespace pytrain
