// RMSNorm kernel interface, shared by the CPU (pytrain::cpu) and CUDA (pytrain::cuda) implementations.
#pragma once
#include <cstdint>

namespace pytrain {

// Raw views of contiguous (rows, hidden) tensors; every buffer is allocated by the caller (Python).
struct RMSNormArgs {
  const void* x = nullptr;           // forward input; in backward the normalized input (the sum, with a residual)
  const void* weight = nullptr;      // (hidden,), dtype x_dtype or float32
  void* y = nullptr;                 // forward output, dtype x_dtype
  float* rstd = nullptr;             // (rows,) 1/rms: written by forward (may be null), read by backward
  const void* residual = nullptr;    // forward (optional): normalize x + residual ...
  void* residual_out = nullptr;      // ... and write that sum here (the next residual stream)
  const void* dresidual_out = nullptr;  // backward (optional): gradient reaching residual_out, added to dx
  const void* dy = nullptr;          // backward input
  void* dx = nullptr;                // backward output
  float* dweight_partial = nullptr;  // (parallelism, hidden) zero-filled; the caller sums over dim 0
  int64_t rows = 0, hidden = 0;
  float eps = 1e-5f;
  int x_dtype = 0, weight_dtype = 0;
  int parallelism = 1;               // CPU: threads; CUDA: backward blocks (= rows of dweight_partial)
  void* stream = nullptr;            // CUDA: the cudaStream_t to launch on ...
  int device = 0;                    // ... on this device
};

namespace cpu {
void rms_norm_forward(const RMSNormArgs& args);
void rms_norm_backward(const RMSNormArgs& args);
}  // namespace cpu

namespace cuda {
void rms_norm_forward(const RMSNormArgs& args);
void rms_norm_backward(const RMSNormArgs& args);
}  // namespace cuda

}  // namespace pytrain
