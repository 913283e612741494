// SwiGLU on NVIDIA GPUs: elementwise, a grid-stride loop with coalesced loads; fp32 math for every dtype.
#include "cuda/cuda_types.cuh"
#include "swiglu.h"

namespace pytrain::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

template <typename T>
__global__ void forward_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float g = to_float(gate[i]);
    out[i] = from_float<T>(g * sigmoid(g) * to_float(up[i]));
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ gate, const T* __restrict__ up, const T* __restrict__ dout,
                                T* __restrict__ dgate, T* __restrict__ dup, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float g = to_float(gate[i]), d = to_float(dout[i]);
    const float s = sigmoid(g);
    dgate[i] = from_float<T>(d * to_float(up[i]) * s * (1.f + g * (1.f - s)));
    dup[i] = from_float<T>(d * g * s);
  }
}

template <typename T>
void launch(const SwiGLUArgs& a, bool forward) {
  auto stream = static_cast<cudaStream_t>(a.stream);
  const int64_t needed = (a.numel + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(needed < kMaxBlocks ? needed : kMaxBlocks);
  if (forward) {
    forward_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(a.gate), static_cast<const T*>(a.up),
                                                       static_cast<T*>(a.out), a.numel);
  } else {
    backward_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(a.gate), static_cast<const T*>(a.up),
                                                        static_cast<const T*>(a.dout), static_cast<T*>(a.dgate),
                                                        static_cast<T*>(a.dup), a.numel);
  }
  check_launch(forward ? "swiglu_forward" : "swiglu_backward");
}

void dispatch(const SwiGLUArgs& a, bool forward) {
  if (a.numel == 0) return;
  DeviceGuard guard(a.device);
  switch (a.dtype) {
    case kFloat32: return launch<float>(a, forward);
    case kBFloat16: return launch<__nv_bfloat16>(a, forward);
    case kFloat16: return launch<__half>(a, forward);
  }
  bad_dtype("swiglu", a.dtype);
}

}  // namespace

void swiglu_forward(const SwiGLUArgs& a) { dispatch(a, true); }
void swiglu_backward(const SwiGLUArgs& a) { dispatch(a, false); }

}  // namespace pytrain::cuda
