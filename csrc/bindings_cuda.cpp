// pytrain._C_cuda: the CUDA kernels, linked to the static CUDA runtime, so importing needs no GPU.
#include <cuda_runtime.h>

#include "bind_adamw.h"
#include "bind_rotary.h"
#include "bind_cross_entropy.h"
#include "bind_swiglu.h"
#include "bindings.h"

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pytrain CUDA kernels (raw-pointer interface; use pytrain.kernels)";
  pytrain::def_rms_norm(m, pytrain::cuda::rms_norm_forward, pytrain::cuda::rms_norm_backward);
  pytrain::def_cross_entropy(m, pytrain::cuda::cross_entropy_forward, pytrain::cuda::cross_entropy_gradient);
  pytrain::def_rotary(m, pytrain::cuda::rotary);
  pytrain::def_swiglu(m, pytrain::cuda::swiglu_forward, pytrain::cuda::swiglu_backward);
  pytrain::def_adamw(m, pytrain::cuda::adamw_step);
  m.def("device_count", [] {
    int count = 0;
    return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
  });
}
