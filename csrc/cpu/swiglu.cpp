// SwiGLU on the CPU: elementwise, the elements split into one contiguous range per thread; one vectorized
// pass reads gate and up (and dout) once and writes each output once, fp32 math for every dtype.
// Python validates and allocates (pytrain/kernels/swiglu.py); this file only computes.
#include "swiglu.h"

#include "cpu/cpu_types.h"
#include "cpu/fast_exp.h"

namespace pytrain::cpu {
namespace {

constexpr int64_t kMinElementsPerThread = 1 << 15;

__attribute__((always_inline)) inline float sigmoid(float x) { return 1.f / (1.f + fast_exp(-x)); }

template <typename T>
__attribute__((always_inline)) inline void forward_range(const SwiGLUArgs& a, int64_t begin, int64_t end) {
  const T* __restrict__ gate = static_cast<const T*>(a.gate);
  const T* __restrict__ up = static_cast<const T*>(a.up);
  T* __restrict__ out = static_cast<T*>(a.out);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float g = to_float(gate[i]);
    out[i] = from_float<T>(g * sigmoid(g) * to_float(up[i]));
  }
}

template <typename T>
__attribute__((always_inline)) inline void backward_range(const SwiGLUArgs& a, int64_t begin, int64_t end) {
  const T* __restrict__ gate = static_cast<const T*>(a.gate);
  const T* __restrict__ up = static_cast<const T*>(a.up);
  const T* __restrict__ dout = static_cast<const T*>(a.dout);
  T* __restrict__ dgate = static_cast<T*>(a.dgate);
  T* __restrict__ dup = static_cast<T*>(a.dup);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float g = to_float(gate[i]), d = to_float(dout[i]);
    const float s = sigmoid(g);
    dgate[i] = from_float<T>(d * to_float(up[i]) * s * (1.f + g * (1.f - s)));
    dup[i] = from_float<T>(d * g * s);
  }
}

#define PYTRAIN_SWIGLU_VARIANT(NAME, T)                                                                            \
  PYTRAIN_CLONES void forward_##NAME(const SwiGLUArgs& a, int64_t b, int64_t e) { forward_range<T>(a, b, e); }   \
  PYTRAIN_CLONES void backward_##NAME(const SwiGLUArgs& a, int64_t b, int64_t e) { backward_range<T>(a, b, e); }
PYTRAIN_SWIGLU_VARIANT(f32, float)
PYTRAIN_SWIGLU_VARIANT(bf16, bf16)
PYTRAIN_SWIGLU_VARIANT(f16, fp16)
#undef PYTRAIN_SWIGLU_VARIANT

using RangeFn = void (*)(const SwiGLUArgs&, int64_t, int64_t);

void run(const SwiGLUArgs& a, RangeFn f32, RangeFn bf, RangeFn h) {
  RangeFn fn = nullptr;
  switch (a.dtype) {
    case kFloat32: fn = f32; break;
    case kBFloat16: fn = bf; break;
    case kFloat16: fn = h; break;
    default: bad_dtype("swiglu", a.dtype);
  }
  parallel_for(a.numel, a.parallelism, kMinElementsPerThread, [&](int64_t b, int64_t e, int) { fn(a, b, e); });
}

}  // namespace

void swiglu_forward(const SwiGLUArgs& a) { run(a, forward_f32, forward_bf16, forward_f16); }
void swiglu_backward(const SwiGLUArgs& a) { run(a, backward_f32, backward_bf16, backward_f16); }

}  // namespace pytrain::cpu
