// pytrain._C_cuda: the CUDA kernels, linked to the static CUDA runtime, so importing needs no GPU.
#include <cuda_runtime.h>

#include "bindings.h"

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pytrain CUDA kernels (raw-pointer interface; use pytrain.kernels)";
  pytrain::def_rms_norm(m, pytrain::cuda::rms_norm_forward, pytrain::cuda::rms_norm_backward);
  m.def("device_count", [] {
    int count = 0;
    return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
  });
}
