// SwiGLU kernel interface (the gated MLP's activation), shared by the CPU (pytrain::cpu) and CUDA
// (pytrain::cuda) implementations:
//   forward:  out = silu(gate) * up,  silu(x) = x * sigmoid(x)
//   backward: dgate = dout * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))),  dup = dout * silu(gate)
// Elementwise over contiguous buffers of one dtype, fp32 math, one rounding per output.
#pragma once
#include <cstdint>

namespace pytrain {

// Every buffer is allocated by the caller (Python).
struct SwiGLUArgs {
  const void* gate = nullptr;
  const void* up = nullptr;
  void* out = nullptr;         // forward output
  const void* dout = nullptr;  // backward input
  void* dgate = nullptr;       // backward outputs
  void* dup = nullptr;
  int64_t numel = 0;
  int dtype = 0;
  int parallelism = 1;     // CPU: threads
  void* stream = nullptr;  // CUDA: the cudaStream_t to launch on ...
  int device = 0;          // ... on this device
};

namespace cpu {
void swiglu_forward(const SwiGLUArgs& args);
void swiglu_backward(const SwiGLUArgs& args);
}  // namespace cpu

namespace cuda {
void swiglu_forward(const SwiGLUArgs& args);
void swiglu_backward(const SwiGLUArgs& args);
}  // namespace cuda

}  // namespace pytrain
