// RMSNorm on NVIDIA GPUs: one block per row (forward); a grid-stride over rows with per-block dweight
// partials (backward). fp32 accumulation for every input dtype.
#include "cuda/cuda_types.cuh"
#include "rms_norm.h"

namespace pytrain::cuda {
namespace {

constexpr int kThreads = 512;

// y = s * rstd * w for one row of s, read through a plain pointer (see forward_kernel).
template <typename T, typename W>
__device__ __forceinline__ void write_normalized(const T* s, const W* __restrict__ w, T* __restrict__ y, int64_t hidden,
                                                 float rstd) {
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) y[i] = from_float<T>(to_float(s[i]) * rstd * to_float(w[i]));
}

// With `residual`, normalizes s = x + residual (rounded to T) and writes s to residual_out. Each thread
// reads back only the elements it wrote, so no barrier is needed between the two loops; residual_out is a plain
// pointer (not __restrict__) so that read-back is an ordinary load: the read-only (non-coherent) path that
// __restrict__ lets the compiler use is undefined for memory the kernel itself writes.
template <typename T, typename W>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ residual, T* residual_out,
                               const W* __restrict__ w, T* __restrict__ y, float* __restrict__ rstd_out, int64_t hidden,
                               float eps) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  T* yr = y + row * hidden;
  float sum_sq = 0.f;
  if (residual) {
    const T* rr = residual + row * hidden;
    T* sr = residual_out + row * hidden;
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
      const T sum = from_float<T>(to_float(xr[i]) + to_float(rr[i]));
      sr[i] = sum;
      const float v = to_float(sum);
      sum_sq += v * v;
    }
    const float rstd = rsqrtf(block_sum(sum_sq, shared) / static_cast<float>(hidden) + eps);
    if (rstd_out && threadIdx.x == 0) rstd_out[row] = rstd;
    write_normalized<T, W>(sr, w, yr, hidden, rstd);
    return;
  }
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = to_float(xr[i]);
    sum_sq += v * v;
  }
  const float rstd = rsqrtf(block_sum(sum_sq, shared) / static_cast<float>(hidden) + eps);
  if (rstd_out && threadIdx.x == 0) rstd_out[row] = rstd;
  write_normalized<T, W>(xr, w, yr, hidden, rstd);
}

// dresidual_out (optional): the gradient reaching the residual output, added to dx.
template <typename T, typename W>
__global__ void backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ w,
                                const float* __restrict__ rstd, const T* __restrict__ dresidual_out, T* __restrict__ dx,
                                float* __restrict__ dw_partial, int64_t rows, int64_t hidden) {
  __shared__ float shared[32];
  float* dw = dw_partial + blockIdx.x * hidden;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * hidden;
    const T* dyr = dy + row * hidden;
    T* dxr = dx + row * hidden;
    const float r = rstd[row];
    float dot = 0.f;
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dot += to_float(dyr[i]) * to_float(w[i]) * to_float(xr[i]);
    const float mean_dot = block_sum(dot, shared) * r / static_cast<float>(hidden);
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
      const float x_hat = to_float(xr[i]) * r;
      const float g = to_float(dyr[i]);
      float grad = r * (g * to_float(w[i]) - x_hat * mean_dot);
      if (dresidual_out) grad += to_float(dresidual_out[row * hidden + i]);
      dxr[i] = from_float<T>(grad);
      dw[i] += g * x_hat;  // this block owns row blockIdx.x of the partials: no atomics
    }
  }
}

template <typename T, typename W>
void launch(const RMSNormArgs& a, bool forward) {
  auto stream = static_cast<cudaStream_t>(a.stream);
  const int threads = a.hidden >= kThreads ? kThreads : ((static_cast<int>(a.hidden) + 31) / 32) * 32;
  if (forward) {
    forward_kernel<T, W><<<static_cast<unsigned>(a.rows), threads, 0, stream>>>(
        static_cast<const T*>(a.x), static_cast<const T*>(a.residual), static_cast<T*>(a.residual_out),
        static_cast<const W*>(a.weight), static_cast<T*>(a.y), a.rstd, a.hidden, a.eps);
  } else {
    backward_kernel<T, W><<<a.parallelism, threads, 0, stream>>>(
        static_cast<const T*>(a.dy), static_cast<const T*>(a.x), static_cast<const W*>(a.weight), a.rstd,
        static_cast<const T*>(a.dresidual_out), static_cast<T*>(a.dx), a.dweight_partial, a.rows, a.hidden);
  }
  check_launch(forward ? "rms_norm_forward" : "rms_norm_backward");
}

void dispatch(const RMSNormArgs& a, bool forward) {
  if (a.rows == 0) return;
  DeviceGuard guard(a.device);
  const bool w32 = a.weight_dtype == kFloat32;
  if (!w32 && a.weight_dtype != a.x_dtype) bad_dtype("rms_norm weight", a.weight_dtype);
  switch (a.x_dtype) {
    case kFloat32: return launch<float, float>(a, forward);
    case kBFloat16: return w32 ? launch<__nv_bfloat16, float>(a, forward) : launch<__nv_bfloat16, __nv_bfloat16>(a, forward);
    case kFloat16: return w32 ? launch<__half, float>(a, forward) : launch<__half, __half>(a, forward);
  }
  bad_dtype("rms_norm", a.x_dtype);
}

}  // namespace

void rms_norm_forward(const RMSNormArgs& a) { dispatch(a, true); }
void rms_norm_backward(const RMSNormArgs& a) { dispatch(a, false); }

}  // namespace pytrain::cuda
